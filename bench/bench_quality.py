"""Quality of GRACE on the demo set under a fixed wall-clock budget, beside the dual encoder.

For each identifier scheme: assign ids, train GRACE for ``--seconds`` (``TrainConfig.max_seconds``),
then evaluate with :func:`grace.evaluation.metrics.evaluate` (memorization of every image, held-out
R@1/5/10 over the gallery of all images; queries are the captions of test-split images, which
GRACE only ever saw as pixels). The dual encoder baseline is trained once for the same budget
and scored in the same harness; structured ids are clustered on its image embeddings. Example
(what BENCHMARKS.md reports):

    python bench/bench_quality.py --seconds 300 --write BENCHMARKS.md

Quick check: ``--seconds 60 --schemes atomic --max-queries 200``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import transformers
from benchmarks_md import cpus, write_section  # bench/ is on sys.path

from grace.cli._errors import parse_params
from grace.data.synth import synthesize
from grace.evaluation.metrics import evaluate
from grace.identifiers import assign_identifiers
from grace.models.dual_encoder.configuration import DualEncoderConfig
from grace.models.embedders import make_embedder
from grace.training import train
from grace.training.config import TrainConfig

SCHEMES = ("numeric", "structured", "atomic")
TARGET_MEMORIZATION = 0.99


def train_config(seconds: float, threads: int, overrides: dict) -> TrainConfig:
    """The defaults, then ``--set`` (``lite.KEY`` sets a backbone field), then the budget.

    The budget is the wall clock: the default epoch count (40) would end a run early once
    training is fast enough (the lite backbone made 40 epochs in 256 s), so epochs are
    unbounded unless ``--set epochs=N`` says otherwise, and the schedule anneals by time."""
    budget = {"max_seconds": seconds, "num_threads": threads, "checkpoint_every": 0}
    unbounded = {"epochs": 10_000}
    return TrainConfig.from_dict({**TrainConfig().to_dict(), **unbounded, **overrides, **budget})


def two_steps(records, data, id_map, out: Path, cfg: TrainConfig, share: float, callback):
    """The pipeline's memorize step (memorize only, ``share`` of the budget), then its retrieve
    step from that model (memorize + retrieve, the rest): the paper's two steps in one budget."""
    first = replace(cfg, retrieve_task=False, max_seconds=share * cfg.max_seconds)
    train(records, data, id_map, out / "memorize", first, callback=callback, progress=False)
    second = replace(
        cfg, backbone=str(out / "memorize" / "model"), max_seconds=(1 - share) * cfg.max_seconds
    )
    return train(records, data, id_map, out / "retrieve", second, callback=callback, progress=False)


def run_scheme(scheme, records, data, work, cfg, embedder, max_queries, params, share) -> dict:
    t0 = time.perf_counter()
    id_map = assign_identifiers(
        records,
        scheme,
        params=params.get(scheme),
        embedder=embedder if scheme == "structured" else None,
        root=data,
    )
    ids_s = time.perf_counter() - t0
    log: list[tuple[int, dict]] = []
    out = work / scheme
    shutil.rmtree(out, ignore_errors=True)  # train() resumes from what it finds there
    t0 = time.perf_counter()
    if share > 0:
        phases: list[list] = []

        def callback(s: int, m: dict) -> None:
            if s == 1:
                phases.append([])
            phases[-1].append((s, m))

        gm = two_steps(records, data, id_map, out, cfg, share, callback)
        offset, epochs = 0, 0.0
        for phase in phases:  # one curve: steps and epochs add up over the two steps
            log += [(s + offset, {**m, "epoch": m["epoch"] + epochs}) for s, m in phase]
            offset, epochs = log[-1][0], log[-1][1]["epoch"]
    else:
        gm = train(
            records, data, id_map, out, cfg, callback=lambda s, m: log.append((s, m)),
            progress=False,
        )  # fmt: skip
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    res = evaluate(gm, records, data, gallery="all", dense=embedder, max_queries=max_queries)
    eval_s = time.perf_counter() - t0
    steps, last = log[-1] if log else (0, {})
    tokens = [len(s) for s in gm.index.sequences]
    return {
        "scheme": scheme,
        "ids_s": ids_s,
        "train_s": train_s,
        "eval_s": eval_s,
        "steps": steps,
        "epochs": last.get("epoch", 0.0),
        "samples_per_s": last.get("samples_per_second", 0.0),
        "tokens_per_id": float(np.mean(tokens)),
        "params_m": sum(p.numel() for p in gm.model.parameters()) / 1e6,
        "load": os.getloadavg()[0],
        **res.metrics,
    }


def report(rows: list[dict], dense: dict, args, command: str, cfg: TrainConfig) -> str:
    def f3(x: float) -> str:
        return f"{x:.3f}"

    loads = [r["load"] for r in rows]
    lines = [
        "## Retrieval quality on the demo set (`bench/bench_quality.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpus()}, "
        f"Python {platform.python_version()}, torch {torch.__version__} "
        f"({args.threads} threads), transformers {transformers.__version__}; load average "
        f"{statistics.median(loads):.2f} (median at the end of each run; shared machine).",
        "",
        f"Set: `grace.data.synth.synthesize(n={args.n}, seed={args.set_seed})`, "
        f"{int(rows[0]['images'])} images, {int(rows[0]['queries'])} held-out queries (captions "
        "of test-split images, gallery: all images). GRACE backbone: "
        f"`{cfg.backbone}` ({rows[0]['params_m']:.1f}M parameters); every run gets "
        f"{args.seconds:.0f} s of training (`TrainConfig.max_seconds`"
        + (
            f"; as the pipeline trains: memorize only for {args.memorize_share:.0%} of it, then "
            "memorize + retrieve from that model"
            if args.memorize_share
            else "; one run mixing memorize and retrieve"
        )
        + f"); the dual encoder gets the "
        f"same {args.dense_seconds:.0f} s. Structured ids are clustered on that dual encoder's "
        "image embeddings, so their total budget is both trainings.",
        "",
        "| model | ids | tokens/id | steps | epochs | samples/s | memorization | mem. train "
        "| mem. test | R@1 | R@5 | R@10 | valid ids | ms/query | train s | eval s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| GRACE | {r['scheme']} | {r['tokens_per_id']:.1f} | {r['steps']} "
            f"| {r['epochs']:.1f} | {r['samples_per_s']:.0f} | {f3(r['memorization'])} "
            f"| {f3(r.get('memorization_train', float('nan')))} "
            f"| {f3(r.get('memorization_test', float('nan')))} | {f3(r['grace_R@1'])} "
            f"| {f3(r['grace_R@5'])} | {f3(r['grace_R@10'])} | {f3(r['valid_id_rate'])} "
            f"| {r['latency_ms_per_query']:.1f} | {r['train_s']:.0f} | {r['eval_s']:.0f} |"
        )
    lines.append(
        f"| dual encoder | (dense) | | | | | | | | {f3(dense['R@1'])} "
        f"| {f3(dense['R@5'])} | {f3(dense['R@10'])} | | | {dense['train_s']:.0f} | |"
    )
    lines += ["", f"Targets ({args.seconds:.0f} s budget):"]
    for r in rows:
        mem_ok = r["memorization"] >= TARGET_MEMORIZATION
        r10_ok = r["grace_R@10"] >= dense["R@10"]
        lines.append(
            f"- {r['scheme']}: memorization {f3(r['memorization'])} "
            f"(>= {TARGET_MEMORIZATION}: {'met' if mem_ok else 'MISSED'}); R@10 "
            f"{f3(r['grace_R@10'])} vs dense {f3(dense['R@10'])}: "
            f"{'met' if r10_ok else 'MISSED'}."
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/grace_bench_quality"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--set-seed", type=int, default=0)
    p.add_argument("--seconds", type=float, default=300.0, help="GRACE training budget per run")
    p.add_argument("--dense-seconds", type=float, help="dual encoder budget (default: --seconds)")
    p.add_argument("--schemes", default=",".join(SCHEMES), help=f"some of {SCHEMES}")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on 2 cores shared with other jobs, 2 threads oversubscribe)",
    )
    p.add_argument("--max-queries", type=int, help="score only the first N held-out queries")
    p.add_argument(
        "--memorize-share",
        type=float,
        default=0.0,
        help="train as the pipeline does: memorize only for this share of the budget, then "
        "memorize + retrieve from that model (0: one mixed run)",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a TrainConfig field (JSON value), tiny.FIELD for the backbone",
    )
    p.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="SCHEME.KEY=VALUE",
        help="an identifier scheme parameter, e.g. structured.c=10",
    )
    p.add_argument("--write", type=Path, help="put the table in this markdown file's section")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    args.dense_seconds = args.dense_seconds or args.seconds
    torch.set_num_threads(args.threads)
    overrides = parse_params(args.set, "--set")
    cfg = train_config(args.seconds, args.threads, overrides)
    params: dict[str, dict] = {}
    for key, value in parse_params(args.param).items():
        scheme, name = key.split(".", 1)
        params.setdefault(scheme, {})[name] = value

    data = args.work / "data"
    records = synthesize(data, n=args.n, seed=args.set_seed)
    print(f"set: {len(records)} images; overrides: {overrides or 'none'}", file=sys.stderr)

    t0 = time.perf_counter()
    embedder = make_embedder(
        "dual-encoder",
        records,
        data,
        config=replace(
            DualEncoderConfig(), max_seconds=args.dense_seconds, num_threads=args.threads
        ),
        progress=False,
    )
    dense_train_s = time.perf_counter() - t0

    rows = []
    for scheme in args.schemes.split(","):
        t0 = time.perf_counter()
        work = args.work / "runs"
        row = run_scheme(
            scheme, records, data, work, cfg, embedder, args.max_queries, params,
            args.memorize_share,
        )  # fmt: skip
        rows.append(row)
        print(
            f"{scheme}: {json.dumps({k: v for k, v in row.items()}, default=float)} "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )
    r0 = rows[0]
    dense = {
        "R@1": r0["dense_R@1"],
        "R@5": r0["dense_R@5"],
        "R@10": r0["dense_R@10"],
        "train_s": dense_train_s,
    }
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    text = report(rows, dense, args, command, cfg)
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps({"config": cfg.to_dict(), "rows": rows, "dense": dense}, indent=2) + "\n"
        )
    if args.write:
        write_section(args.write, "quality", text)


if __name__ == "__main__":
    main()
