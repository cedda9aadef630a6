"""Query latency against catalog size: GRACE's trie beam search against dense retrieval.

Times, per query, the trie beam search (``grace/retrieval/beam_search.py``), transformers'
``generate`` with the trie processor (what GRACE used before), the same search without the
trie, and dense brute force (torch, and a FAISS flat index when ``faiss`` imports) at 1K..1M
images, for each backbone
(``tiny`` Idefics3; ``lite``, the product's default, whose MiniLM query encoding is timed too)
and thread count; see ``grace/evaluation/query_latency.py`` for the method. What BENCHMARKS.md
reports:

    python bench/bench_query.py --threads 1 --write BENCHMARKS.md --plot bench/query_latency.png \
        --json bench/query_latency.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
from pathlib import Path

import numpy as np
import torch
import transformers
from benchmarks_md import cpus, write_section  # bench/ is on sys.path

from grace.atomic_io import write_text
from grace.evaluation.latency_report import markdown_report, plot_latency
from grace.evaluation.query_latency import QueryBenchConfig, run_query_benchmark


def machine_line() -> str:
    try:
        import faiss

        faiss_version = f", faiss-cpu {faiss.__version__}"
    except ImportError:
        faiss_version = ", faiss not installed"
    return (
        f"Machine: {cpus()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}{faiss_version}; "
        f"load average {os.getloadavg()[0]:.2f} when it finished (2 cores shared with other jobs)."
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,10000,100000,1000000", help="comma-separated id counts")
    p.add_argument("--threads", default="1", help="comma-separated torch thread counts")
    p.add_argument("--backbones", default="tiny,lite", help="comma-separated: tiny, lite")
    p.add_argument("--queries", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--beams", type=int, default=10)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--no-reference", action="store_true", help="skip timing generate")
    p.add_argument("--write", type=Path, help="put the tables in this markdown file's section")
    p.add_argument("--plot", type=Path, help="PNG of the first thread count's latencies")
    p.add_argument("--json", type=Path, help="all figures as JSON")
    args = p.parse_args(argv)
    results = []
    for threads, backbone in itertools.product(
        [int(t) for t in args.threads.split(",")], args.backbones.split(",")
    ):
        cfg = QueryBenchConfig(
            backbone=backbone,
            sizes=[int(s) for s in args.sizes.split(",")],
            num_beams=args.beams,
            batch_size=args.batch_size,
            queries=args.queries,
            repeats=args.repeats,
            threads=threads,
            reference=not args.no_reference,
        )
        results.append(
            run_query_benchmark(cfg, log=lambda s: print(s, file=sys.stderr, flush=True))
        )
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    text = "\n".join(
        [
            "## Query latency against catalog size (`grace/retrieval/beam_search.py`)",
            "",
            f"Command: `{command}`",
            "",
            machine_line(),
            "",
            "Random-init backbones, `tiny` (`TinyBackboneConfig()`: Idefics3, 4-layer 256-wide "
            "Llama text model) and `lite` (`LiteBackboneConfig()`, the product's default: frozen "
            "MiniLM sentence features projected into a 2-layer 256-wide Llama decoder), text "
            "prompts of the retrieve task on demo captions, and a trie of N distinct random ids "
            "of the `numeric` scheme drawn below 1,000,000 at every N (so ids are equally long: "
            "6 digits + EOS = 7 steps); dense: the dual encoder's text tower, then scores against "
            "N random unit vectors (dim 128) and top-10. Within a table all columns are timed in "
            "one process, the methods taking turns call by call, so ratios hold under the same "
            "load; the tables run one after the other.",
            "",
            markdown_report(results),
        ]
    )
    if args.plot:
        first = [r for r in results if r["config"]["threads"] == results[0]["config"]["threads"]]
        plot_latency(first, args.plot)
        text += f"\nPlot: `{args.plot.as_posix()}` ({results[0]['config']['threads']} thread).\n"
    print(text)
    if args.json:
        write_text(args.json, json.dumps(results, indent=1, default=str))
    if args.write:
        write_section(args.write, "query", text)


if __name__ == "__main__":
    main()
