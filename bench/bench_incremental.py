"""Incremental re-memorization against a full retrain, and forgetting over successive increments.

A base model is trained from scratch on ``--n`` demo images (``grace.data.synth``, ``--backbone``,
``--scheme`` ids, memorize + retrieve in one run). Then 10 % new images arrive:

* full retrain: from scratch on the whole set, the base's settings;
* incremental: ``grace.incremental`` continues from the base on the new images plus a replay
  sample of old ones (``--variants``: ratio, lr, all weights or the new ids' rows only, with
  every old image a cached negative or only the replayed ones, memorize repeats),
  ``--inc-epochs`` epochs.

Reported: wall time and CPU time of each training (``time.process_time``, the compute), old-image
R@10 against the base on the same images and the same gallery (forgetting; what the gate
reads) and against every live image (forgetting plus the new images crowding old queries' top
10; the full retrain's figure is the reference for the crowding), new-image memorization. Then
two more increments of 10 % each continue from the previous incremental model; old-image R@10
is compared with the model each started from and with the original base on its original images
(does forgetting accumulate?). Library calls only (no kfp), so it measures training, not
process start-up. ::

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
from dataclasses import replace
from pathlib import Path

import torch
import transformers
from benchmarks_md import cpus, write_section  # bench/ is on sys.path

from grace.data.synth import synthesize
from grace.evaluation.incremental import evaluate_old_new
from grace.evaluation.metrics import evaluate
from grace.identifiers import assign_identifiers
from grace.models.settings import TinyBackboneConfig
from grace.retrieval.retriever import GraceRetriever
from grace.training import train
from grace.training.config import TrainConfig
from grace.training.incremental import (
    ReplayConfig,
    continue_training,
    plan_update,
    update_identifiers,
)

# Half the default tiny backbone (as tests/conftest.py): on 2 shared CPU cores the default one
# does not memorize 100+ images from scratch within a benchmark's budget.
SMALL = TinyBackboneConfig(
    vision_hidden=64, vision_layers=1, text_hidden=128, text_layers=2, vocab_size=600
)


def config(
    epochs: int, lr: float, warmup: int, args: argparse.Namespace, repeats: int = 1
) -> TrainConfig:
    return TrainConfig(
        backbone=args.backbone,
        tiny=SMALL if args.small else TinyBackboneConfig(),
        epochs=epochs,
        batch_size=args.batch,
        lr=lr,
        warmup_steps=warmup,
        memorize_repeats=repeats,
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
        help="increment settings RATIO:LR[:MODE[:REPEATS[:QUERIES]]],... (replayed old images "
        "per new one, lr; MODE 'new': train only the new atomic ids' rows, the rest frozen, "
        "every old image a cached negative; 'new-replayed': the same, only the replayed images "
        "as negatives; 'all': every weight; REPEATS: memorize_repeats, default 1; QUERIES: "
        "pseudo_queries auto, nearest or off, default auto)",
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
        original = GraceRetriever.load(base_dir)
        log(f"base on {args.n}: {base_wall:.0f} s")
        rows = []
        # the original base on its own images, scored once: what every "Δ orig" compares with
        reference = evaluate(original, sets[0], root).metrics
        if not args.no_full:
            plan = plan_update(original, sets[1])
            ids = assign_identifiers(sets[1], args.scheme)
            full, wall, cpu = timed(
                train, sets[1], root, ids, work / "full", full_cfg, progress=False
            )
            fm = evaluate_old_new(full, sets[1], root, plan, base=original)
            rows.append(_row(fm, "full retrain (= increment 1)", sets[1], len(sets[1]), full,
                             wall, cpu, fm, reference))  # fmt: skip
            log(f"full retrain: {wall:.0f} s")
        for variant in args.variants:
            ratio, lr, mode, repeats, queries = variant
            # rows_training={}: the variant's own lr and repeats, not the library's defaults
            replay = ReplayConfig(ratio=ratio, only_new_ids=mode != "all",
                                  all_old_negatives=mode == "new", rows_training={})  # fmt: skip
            inc_cfg = replace(config(args.inc_epochs, lr, min(args.warmup, 10), args, repeats),
                              pseudo_queries=queries)  # fmt: skip
            prev_dir, prev = base_dir, original
            for i in range(1, args.increments + 1):
                plan = plan_update(prev, sets[i])
                id_map = update_identifiers(prev.id_map, plan, sets[i])
                out = work / f"inc-{ratio:g}-{lr:g}-{mode}-x{repeats}-{queries}-{i}"
                cand, wall, cpu = timed(
                    continue_training, prev_dir, sets[i], root, id_map, plan, out, inc_cfg,
                    replay,
                )  # fmt: skip
                m = evaluate_old_new(cand, sets[i], root, plan, base=prev)
                if i == 1:
                    vs_original = m
                else:  # the original base's images; its own scores are the reference
                    vs_original = evaluate_old_new(cand, sets[i], root, plan_update(original,
                                                   sets[i]))  # fmt: skip
                name = f"increment {i} ({_variant_name(*variant)})"
                trained = len(plan.added) + len(plan.replay)
                rows.append(_row(m, name, sets[i], trained, cand, wall, cpu, vs_original,
                                 reference))  # fmt: skip
                log(f"{name}: {wall:.0f} s")
                prev_dir, prev = out, cand
    given = sys.argv[1:] if argv is None else argv
    command = shlex.join(["python", "bench/bench_incremental.py", *given])
    text = report(rows, command, args, base_wall, base_cpu)
    print(text)
    if args.write:
        write_section(args.write, "incremental", text)


def _row(m, name, records, trained, gm, wall, cpu, vs_original, reference) -> dict:
    """One table row; ``orig_*``: the original base's images, against its own ``reference``
    scores (old gallery, and the candidate's whole gallery)."""
    base = reference["grace_R@10"]
    return {
        **m,
        "run": name,
        "images": len(records),
        "trained": trained,
        "steps": gm.info["steps"],
        "wall": wall,
        "cpu": cpu,
        "orig_change": vs_original["old_grace_R@10"] - base,
        "orig_whole_change": vs_original["old_whole_gallery_grace_R@10"] - base,
    }


MODES = {"": "all", "all": "all", "new": "new", "new-replayed": "new-replayed"}
QUERIES = ("auto", "nearest", "off")


def _variants(text: str) -> list[tuple[float, float, str, int, str]]:
    """``1:1e-3,0:1e-2:new:4:nearest`` -> [(replay ratio, lr, mode, memorize repeats,
    pseudo-queries), ...]; mode ``all`` (every weight trained), ``new`` (new ids' rows, every
    old image a cached negative) or ``new-replayed``; repeats 1 and pseudo-queries ``auto``
    unless given."""
    out = []
    for v in text.split(","):
        ratio, lr, *rest = v.split(":")
        mode = rest[0] if rest else ""
        repeats = rest[1] if len(rest) > 1 else "1"
        queries = rest[2] if len(rest) > 2 else "auto"
        if (
            len(rest) > 3
            or mode not in MODES
            or not repeats.isdigit()
            or int(repeats) < 1
            or queries not in QUERIES
        ):
            raise argparse.ArgumentTypeError(
                f"variant {v!r}: expected RATIO:LR[:MODE[:REPEATS[:QUERIES]]], MODE all, new or "
                f"new-replayed, REPEATS >= 1, QUERIES one of {', '.join(QUERIES)}"
            )
        out.append((float(ratio), float(lr), MODES[mode], int(repeats), queries))
    return out


def _variant_name(
    ratio: float, lr: float, mode: str, repeats: int = 1, queries: str = "auto"
) -> str:
    what = {"all": "", "new": ", new ids only, all old negatives",
            "new-replayed": ", new ids only, replayed negatives"}[mode]  # fmt: skip
    times = f", memorize x{repeats}" if repeats > 1 else ""
    asked = f", pseudo-queries {queries}" if queries != "auto" else ""
    return f"replay {ratio:g}, lr {lr:g}{what}{times}{asked}"


def report(rows, command: str, args, base_wall: float, base_cpu: float) -> str:
    lines = [
        "## Incremental re-memorization (`grace/training/incremental.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpus()}, "
        f"Python {platform.python_version()}, torch {torch.__version__}, transformers "
        f"{transformers.__version__}, 1 torch thread; load average "
        f"{os.getloadavg()[0]:.2f} when it finished (2 cores shared with other jobs).",
        "",
        f"Demo set (`grace.data.synth`, seed 0), base of {args.n} images trained from scratch "
        f"({args.epochs} epochs, lr {args.lr:g}, warm-up {args.warmup}, "
        f"backbone `{args.backbone}`{' (half-size)' if args.small else ''}, `{args.scheme}` ids, "
        f"batch {args.batch}, memorize + "
        f"retrieve; {base_wall:.0f} s wall, {base_cpu:.0f} s CPU). Each increment adds "
        f"{args.fraction:.0%} new images and continues from the previous model for "
        f"{args.inc_epochs} epochs on them plus a replayed sample of old images (ratio per new "
        "image and lr in the run's name; at least 8; *new ids only*: every weight but the new "
        "atomic ids' embedding rows frozen, `ReplayConfig.only_new_ids`; *all old negatives*: "
        "every old image's memorize and training-query answers, cached once, are negatives for "
        "the new rows, `ReplayConfig.all_old_negatives`; *replayed negatives*: only the "
        "replayed sample; *memorize xK*: each image's memorize example K times an epoch, "
        "`TrainConfig.memorize_repeats`, the cached old images' memorize answers weighing K "
        "too; *pseudo-queries off / nearest*: the increment's `TrainConfig.pseudo_queries`, "
        "unnamed: `auto`, nearest train captions of the images it trains on, on lite). "
        "Old images: those the model it started from had; R@10 on their "
        "held-out captions. *Old gallery*: the candidate answers from the old images only, as "
        "the base did, so Δ is forgetting (what the incremental gate reads); *whole gallery*: "
        "from every live image, as a user searches, so Δ adds the new images crowding the old "
        "queries' top 10 (the full retrain's Δ is that crowding without any forgetting). Δ: "
        "against the model the run started from, on the same images; Δ orig: against the "
        f"original base on its {args.n} images. Memorization of old images: whole gallery.",
        "",
        "| run | images | trained on | steps | wall s | CPU s | old R@10, old gallery | Δ "
        "| Δ orig | old R@10, whole gallery | Δ | Δ orig | new R@10 | new memorization "
        "| old memorization |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['images']} | {r['trained']} | {r['steps']} | {r['wall']:.0f} "
            f"| {r['cpu']:.0f} | {r['old_grace_R@10']:.3f} | "
            f"{100 * r['old_grace_R@10_change']:+.1f} pt | {100 * r['orig_change']:+.1f} pt | "
            f"{r['old_whole_gallery_grace_R@10']:.3f} | "
            f"{100 * r['old_whole_gallery_grace_R@10_change']:+.1f} pt | "
            f"{100 * r['orig_whole_change']:+.1f} pt | "
            f"{r.get('new_grace_R@10', float('nan')):.3f} | "
            f"{r.get('new_memorization', float('nan')):.3f} | "
            f"{r['old_whole_gallery_memorization']:.3f} |"
        )
    full = next((r for r in rows if r["run"].startswith("full")), None)
    lines += ["", f"One query is {100 / rows[0]['old_queries']:.1f} pt of old-image R@10 here.", ""]
    if full:
        lines.append(
            "- full retrain: old-image R@10 "
            f"{100 * full['old_whole_gallery_grace_R@10_change']:+.1f} pt in the whole gallery "
            "against the base: the crowding reference."
        )
    for variant in args.variants:
        label = _variant_name(*variant)
        mine = [r for r in rows if r["run"].endswith(f"({label})")]
        inc = mine[0]
        if full:
            lines.append(
                f"- {label}: increment 1 against a full retrain: wall "
                f"{inc['wall'] / full['wall']:.0%}, CPU {inc['cpu'] / full['cpu']:.0%} (target "
                f"<= 25 %); old-image R@10 {100 * inc['old_grace_R@10_change']:+.1f} pt in the "
                f"old gallery (target >= -1 pt), "
                f"{100 * inc['old_whole_gallery_grace_R@10_change']:+.1f} pt in the whole "
                f"gallery; new-image memorization {inc['new_memorization']:.1%} (target >= 99 %)."
            )
        worst = min(r["orig_change"] for r in mine)
        worst_whole = min(r["orig_whole_change"] for r in mine)
        lines.append(
            f"- {label}: over {len(mine)} increments the original images' R@10 moved by at "
            f"worst {100 * worst:+.1f} pt in the old gallery against the original base "
            f"(tolerance -1 pt), {100 * worst_whole:+.1f} pt in the whole gallery."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
