"""Incremental re-memorization against a full retrain, and forgetting over successive increments.

A base model is trained from scratch on ``--n`` demo images (``grace.synth``, ``--backbone``,
``--scheme`` ids, memorize + retrieve in one run). Then 10 % new images arrive:

* full retrain: from scratch on the whole set, the base's settings;
* incremental: ``grace.incremental`` continues from the base on the new images plus a replay
  sample of old ones (``--variants``: ratio, lr, all weights or the new ids' rows only),
  ``--inc-epochs`` epochs.

Reported: wall time and CPU time of each training (``time.process_time``, the compute), old-image
R@10 against the base on the same images, new-image memorization. Then two more increments of
10 % each continue from the previous incremental model; old-image R@10 is compared with the
model each started from and with the original base on its original images (does forgetting
accumulate?). Library calls only (no kfp), so it measures training, not process start-up. ::

    python bench/bench_incremental.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from benchmarks_md import write_section  # bench/ is on sys.path

from grace.configuration_grace import TinyBackboneConfig, TrainConfig
from grace.identifiers import assign_identifiers
from grace.incremental import (
    ReplayConfig,
    continue_training,
    evaluate_old_new,
    plan_update,
    update_identifiers,
)
from grace.modeling_grace import GraceModel
from grace.synth import synthesize
from grace.training_grace import train

# Half the default tiny backbone (as tests/conftest.py): on 2 shared CPU cores the default one
# does not memorize 100+ images from scratch within a benchmark's budget.
SMALL = TinyBackboneConfig(
    vision_hidden=64, vision_layers=1, text_hidden=128, text_layers=2, vocab_size=600
)


def config(epochs: int, lr: float, warmup: int, args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        backbone=args.backbone,
        tiny=SMALL if args.small else TinyBackboneConfig(),
        epochs=epochs,
        batch_size=args.batch,
        lr=lr,
        warmup_steps=warmup,
        describe_task=False,
        caption_task=False,
        checkpoint_every=0,
        num_threads=1,
    )


def timed(fn, *args, **kwargs):
    w, c = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - w, time.process_time() - c


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images of the base set")
    p.add_argument("--increments", type=int, default=3)
    p.add_argument("--fraction", type=float, default=0.1, help="new images per increment")
    p.add_argument("--epochs", type=int, default=40, help="epochs of a from-scratch training")
    p.add_argument("--lr", type=float, default=1e-3, help="lr of a from-scratch training")
    p.add_argument("--warmup", type=int, default=50, help="warm-up steps from scratch")
    p.add_argument("--backbone", default="tiny", help="lite or tiny (what the tables say)")
    p.add_argument("--scheme", default="numeric", help="identifier scheme")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--small", action="store_true", help="half-size tiny backbone")
    p.add_argument("--inc-epochs", type=int, default=20, help="epochs of an increment")
    p.add_argument(
        "--variants",
        type=_variants,
        default="1:1e-3,4:3e-4",
        help="increment settings RATIO:LR[:new],... (replayed old images per new one, lr; "
        "'new': train only the new atomic ids' rows, the rest frozen)",
    )
    p.add_argument("--no-full", action="store_true", help="skip the full-retrain comparison")
    p.add_argument("--write", type=Path, help="put the section in this markdown file")
    p.add_argument("--work", type=Path, help="keep models here (default: a temp folder)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    step = math.ceil(args.n * args.fraction)
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        root = work / "data"
        records = synthesize(root, n=args.n + step * args.increments, seed=0)
        sets = [records[: args.n + step * i] for i in range(args.increments + 1)]
        full_cfg = config(args.epochs, args.lr, args.warmup, args)

        def log(msg: str) -> None:
            print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

        base_ids = assign_identifiers(sets[0], args.scheme)
        _, base_wall, base_cpu = timed(
            train, sets[0], root, base_ids, work / "base", full_cfg, progress=False
        )
        base_dir = work / "base" / "model"
        original = GraceModel.load(base_dir)
        log(f"base on {args.n}: {base_wall:.0f} s")
        rows = []
        if not args.no_full:
            plan = plan_update(original, sets[1])
            ids = assign_identifiers(sets[1], args.scheme)
            full, wall, cpu = timed(
                train, sets[1], root, ids, work / "full", full_cfg, progress=False
            )
            fm = evaluate_old_new(full, sets[1], root, plan, base=original)
            rows.append(_row(fm, "full retrain (= increment 1)", sets[1], len(sets[1]), full,
                             wall, cpu, fm))  # fmt: skip
            log(f"full retrain: {wall:.0f} s")
        for ratio, lr, only_new in args.variants:
            replay = ReplayConfig(ratio=ratio, only_new_ids=only_new)
            inc_cfg = config(args.inc_epochs, lr, min(args.warmup, 10), args)
            prev_dir, prev = base_dir, original
            for i in range(1, args.increments + 1):
                plan = plan_update(prev, sets[i])
                id_map = update_identifiers(prev.id_map, plan, sets[i])
                out = work / f"inc-{ratio:g}-{lr:g}-{only_new}-{i}"
                cand, wall, cpu = timed(
                    continue_training, prev_dir, sets[i], root, id_map, plan, out, inc_cfg,
                    replay,
                )  # fmt: skip
                m = evaluate_old_new(cand, sets[i], root, plan, base=prev)
                first = plan_update(original, sets[i])  # the original base's images
                vs_original = evaluate_old_new(cand, sets[i], root, first, base=original)
                name = f"increment {i} ({_variant_name(ratio, lr, only_new)})"
                trained = len(plan.added) + len(plan.replay)
                rows.append(_row(m, name, sets[i], trained, cand, wall, cpu, vs_original))
                log(f"{name}: {wall:.0f} s")
                prev_dir, prev = out, cand
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/bench_incremental.py", *given])
    text = report(rows, command, args, base_wall, base_cpu)
    print(text)
    if args.write:
        write_section(args.write, "incremental", text)


def _row(m, name, records, trained, gm, wall, cpu, vs_original) -> dict:
    return {
        **m,
        "run": name,
        "images": len(records),
        "trained": trained,
        "steps": gm.info["steps"],
        "wall": wall,
        "cpu": cpu,
        "orig_old_R@10": vs_original["old_grace_R@10"],
        "orig_base_R@10": vs_original["base_old_grace_R@10"],
    }


def _variants(text: str) -> list[tuple[float, float, bool]]:
    """``1:1e-3,4:3e-4:new`` -> [(replay ratio, lr, only new ids' rows), ...]"""
    out = []
    for v in text.split(","):
        ratio, lr, *mode = v.split(":")
        if mode not in ([], ["new"]):
            raise argparse.ArgumentTypeError(f"variant {v!r}: expected RATIO:LR or RATIO:LR:new")
        out.append((float(ratio), float(lr), bool(mode)))
    return out


def _variant_name(ratio: float, lr: float, only_new: bool) -> str:
    return f"replay {ratio:g}, lr {lr:g}{', new ids only' if only_new else ''}"


def report(rows, command: str, args, base_wall: float, base_cpu: float) -> str:
    lines = [
        "## Incremental re-memorization (`grace/incremental.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, 1 torch thread; load average "
        f"{os.getloadavg()[0]:.2f} when it finished (2 cores shared with other jobs).",
        "",
        f"Demo set (`grace.synth`, seed 0), base of {args.n} images trained from scratch "
        f"({args.epochs} epochs, lr {args.lr:g}, warm-up {args.warmup}, "
        f"backbone `{args.backbone}`{' (half-size)' if args.small else ''}, `{args.scheme}` ids, "
        f"batch {args.batch}, memorize + "
        f"retrieve; {base_wall:.0f} s wall, {base_cpu:.0f} s CPU). Each increment adds "
        f"{args.fraction:.0%} new images and continues from the previous model for "
        f"{args.inc_epochs} epochs on them plus a replayed sample of old images (ratio per new "
        "image and lr in the run's name; at least 8; *new ids only*: every weight but the new "
        "atomic ids' embedding rows frozen, `ReplayConfig.only_new_ids`). Old images: those "
        "the model it "
        "started from had; R@10 on their "
        "held-out captions, gallery = every live image. Δ: against the model the run "
        "started from, on the same images; Δ orig: against the original base on its "
        f"{args.n} images.",
        "",
        "| run | images | trained on | steps | wall s | CPU s | old R@10 | Δ old R@10 "
        "| Δ orig | new R@10 | new memorization | old memorization |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['images']} | {r['trained']} | {r['steps']} | {r['wall']:.0f} "
            f"| {r['cpu']:.0f} | {r['old_grace_R@10']:.3f} | "
            f"{100 * r['old_grace_R@10_change']:+.1f} pt | "
            f"{100 * (r['orig_old_R@10'] - r['orig_base_R@10']):+.1f} pt | "
            f"{r.get('new_grace_R@10', float('nan')):.3f} | "
            f"{r.get('new_memorization', float('nan')):.3f} | {r['old_memorization']:.3f} |"
        )
    full = next((r for r in rows if r["run"].startswith("full")), None)
    lines += ["", f"One query is {100 / rows[0]['old_queries']:.1f} pt of old-image R@10 here.", ""]
    for ratio, lr, only_new in args.variants:
        label = _variant_name(ratio, lr, only_new)
        mine = [r for r in rows if r["run"].endswith(f"({label})")]
        inc = mine[0]
        if full:
            lines.append(
                f"- {label}: increment 1 against a full retrain: wall "
                f"{inc['wall'] / full['wall']:.0%}, CPU {inc['cpu'] / full['cpu']:.0%} (target "
                f"<= 25 %); old-image R@10 {100 * inc['old_grace_R@10_change']:+.1f} pt (target "
                f">= -1 pt); new-image memorization {inc['new_memorization']:.1%} (target >= 99 %)."
            )
        worst = min(100 * (r["orig_old_R@10"] - r["orig_base_R@10"]) for r in mine)
        lines.append(
            f"- {label}: over {len(mine)} increments the original images' "
            f"R@10 moved by at worst {worst:+.1f} pt against the original base (tolerance -1 pt)."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
