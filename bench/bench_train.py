"""Training throughput of GRACE's memorize and retrieve tasks on the tiny backbone, with and
without DeepSpeed (ZeRO-2 on CPU, one process, gloo), and the peak RSS of each run.

Each case runs ``grace.training.train`` in its own subprocess (so peak RSS is its own) on a
demo set of ``--images`` images with ``numeric`` ids, only the memorize and retrieve tasks, for
``--steps`` optimizer steps; samples/s per task is the median over its steps after ``--warmup``
(a step's samples: the batch size). Example (what BENCHMARKS.md reports):

    python bench/bench_train.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from benchmarks_md import cpus, write_section  # bench/ is on sys.path

ZERO2 = Path(__file__).resolve().parent.parent / "configs" / "deepspeed" / "zero2.json"


def run_case(deepspeed: bool, threads: int, images: int, steps: int, warmup: int) -> dict:
    """One training run in this process; returns its per-task samples/s and peak RSS."""
    from grace.data.synth import synthesize
    from grace.identifiers import assign_identifiers
    from grace.training import train
    from grace.training.config import TrainConfig

    with tempfile.TemporaryDirectory() as tmp:
        records = synthesize(Path(tmp) / "d", n=images, seed=0)
        id_map = assign_identifiers(records, "numeric")
        cfg = TrainConfig(
            describe_task=False,
            caption_task=False,
            pseudo_queries="off",
            epochs=1000,
            batch_size=16,
            num_threads=threads,
            deepspeed=str(ZERO2) if deepspeed else None,
            checkpoint_every=0,
        )
        marks: list[tuple[float, str]] = []

        def callback(step: int, metrics: dict) -> None:
            task = next(k[5:] for k in metrics if k.startswith("loss_"))
            marks.append((time.perf_counter(), task))

        train(records, Path(tmp) / "d", id_map, Path(tmp) / "run", cfg, callback, False, steps)
    rates: dict[str, list[float]] = {}
    for (t0, _), (t1, task) in zip(marks[warmup:], marks[warmup + 1 :], strict=False):
        rates.setdefault(task, []).append(cfg.batch_size / (t1 - t0))
    return {
        "deepspeed": deepspeed,
        "threads": threads,
        "steps": len(marks),
        **{f"{task}_samples_per_s": statistics.median(v) for task, v in rates.items()},
        **{f"{task}_steps": len(v) for task, v in rates.items()},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def report(rows: list[dict], command: str, args: argparse.Namespace) -> str:
    lines = [
        "## Training throughput (`grace/training/loop.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpus()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}; load average {os.getloadavg()[0]:.2f} when it finished "
        "(2 cores shared with other jobs).",
        "",
        f"Tiny backbone (`TinyBackboneConfig()`), {args.images} demo images, `numeric` ids, "
        f"memorize + retrieve only, batch 16, {args.steps} steps per run; samples/s is the "
        f"median over each task's steps after the first {args.warmup}; peak RSS of the run's "
        "process (`ru_maxrss`). DeepSpeed: ZeRO-2 (`configs/deepspeed/zero2.json`), one CPU "
        "process with gloo.",
        "",
        "| engine | threads | memorize samples/s | retrieve samples/s | peak RSS MB |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {'DeepSpeed ZeRO-2' if r['deepspeed'] else 'plain AdamW'} | {r['threads']} "
            f"| {r.get('memorize_samples_per_s', float('nan')):.1f} "
            f"| {r.get('retrieve_samples_per_s', float('nan')):.1f} | {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts")
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--engines", default="plain,deepspeed")
    p.add_argument("--write", type=Path, help="put the table in this markdown file's section")
    p.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case, print JSON
    args = p.parse_args(argv)
    if args.case:
        engine, threads = args.case.split(":")
        row = run_case(engine == "deepspeed", int(threads), args.images, args.steps, args.warmup)
        print(json.dumps(row))
        return
    rows = []
    for engine in args.engines.split(","):
        for threads in args.threads.split(","):
            cmd = [sys.executable, __file__, "--case", f"{engine}:{threads}"]
            cmd += ["--images", str(args.images), "--steps", str(args.steps)]
            cmd += ["--warmup", str(args.warmup)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.exit(f"{engine}:{threads} failed:\n{done.stderr[-3000:]}")
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(rows[-1], file=sys.stderr, flush=True)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    text = report(rows, command, args)
    print(text)
    if args.write:
        write_section(args.write, "train", text)


if __name__ == "__main__":
    main()
