"""Query and training-step cost per identifier scheme at 1K..1M ids: what users run.

Times the default ``lite`` backbone with the default scheme (structured ids, node tokens),
atomic and numeric ids, each made by its scheme's own code, side by side with dense brute force
and a FAISS flat index; see ``grace/evaluation/scheme_cost.py`` for the method. What
BENCHMARKS.md#query-cost-by-catalog-size reports:

    python bench/bench_scaling.py --threads 1 --write BENCHMARKS.md --json bench/scaling.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from bench_query import machine_line  # bench/ is on sys.path
from benchmarks_md import write_section

from grace.atomic_io import write_text
from grace.evaluation.scheme_cost import (
    SCHEMES,
    SchemeCostConfig,
    markdown_report,
    run_scheme_cost,
)


def markdown(result: dict, command: str) -> str:
    """The section: command, machine, method, then ``markdown_report``'s tables and targets."""
    cfg = result["config"]
    lines = [
        "## Query cost by catalog size (`grace/evaluation/scheme_cost.py`)",
        "",
        f"Command: `{command}`",
        "",
        machine_line(),
        "",
        f"`LiteBackboneConfig()` at random init, {cfg['threads']} thread, {cfg['num_beams']} "
        f"beams; single: median over {cfg['queries']} retrieve prompts, batched: "
        f"{cfg['batch_size']} prompts per call (ms per query); training step: "
        f"{cfg['batch_size']} memorize examples, forward + backward + optimizer step (AdamW on "
        "the dense weights, SparseAdam on the identifier rows). Structured ids come from a "
        f"k-means tree (k={cfg['k']}, c={cfg['c']}) of random 384-d embeddings built by the "
        "scheme's own code; numeric ids are random numbers below 10N. Each step of the search "
        "scores only the children of each beam's node (their output rows), and a training step "
        "only the gold path's siblings. Medians of "
        f"{cfg['repeats']} rounds in which the methods take turns. `bytes/id`: the identifier "
        "table (input and output rows, fp32) over the ids; `tokens/id`: the longest id.",
        "",
        markdown_report(result),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated id counts")
    p.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated schemes")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--write", type=Path, help="put the tables in this markdown file's section")
    p.add_argument("--json", type=Path, help="all figures as JSON")
    args = p.parse_args(argv)
    cfg = SchemeCostConfig(
        sizes=[int(s) for s in args.sizes.split(",")],
        schemes=args.schemes.split(","),
        num_beams=args.beams,
        batch_size=args.batch_size,
        queries=args.queries,
        repeats=args.repeats,
        threads=args.threads,
    )
    result = run_scheme_cost(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
    command = shlex.join(
        ["python", *(sys.argv if argv is None else ["bench/bench_scaling.py", *argv])]
    )
    text = markdown(result, command)
    print(text)
    if args.json:
        write_text(args.json, json.dumps(result, indent=1, default=str))
    if args.write:
        write_section(args.write, "scaling", text)


if __name__ == "__main__":
    main()
