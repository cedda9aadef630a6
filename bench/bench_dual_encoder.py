"""Held-out text->image retrieval of the dual encoder on the demo set, per training budget.

Gallery: every image of the set; queries: the captions of test-split images (never trained on).
Prints a markdown table. Example (what BENCHMARKS.md reports):

    python bench/bench_dual_encoder.py --n 1000 --budgets 60 180 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from grace.data.records import ImageRecord
from grace.models.dual_encoder.configuration import DualEncoderConfig
from grace.models.dual_encoder.training import train_dual_encoder
from grace.models.embedders import dense_rank

KS = (1, 5, 10)


def recall_at_k(
    model, records: list[ImageRecord], root: Path, ks=KS, split: str = "test"
) -> dict[str, float]:
    """R@K of the captions of ``split`` images against the gallery of all images."""
    images = model.embed_images([root / r.path for r in records])
    queries = [(i, c) for i, r in enumerate(records) if r.split == split for c in r.captions]
    if not queries:
        raise SystemExit(f"no {split}-split captions to query with")
    texts = model.embed_texts([c for _, c in queries])
    gold = np.array([i for i, _ in queries])
    top = dense_rank(texts, images, max(ks))
    hit = top == gold[:, None]
    out = {f"R@{k}": float(hit[:, :k].any(axis=1).mean()) for k in ks}
    out["queries"] = len(queries)
    return out


def load_set(data: Path, n: int, seed: int) -> list[ImageRecord]:
    from grace.data.synth import synthesize

    return synthesize(data, n=n, seed=seed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, default=Path("/tmp/grace_bench_dual_encoder/data"))
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--set-seed", type=int, default=0)
    p.add_argument("--budgets", type=float, nargs="+", default=[60.0, 180.0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a DualEncoderConfig field (JSON value), e.g. --set image_size=64",
    )
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    overrides = {}
    for item in args.set:
        k, v = item.split("=", 1)
        try:
            overrides[k] = json.loads(v)
        except json.JSONDecodeError:
            overrides[k] = v
    base = replace(DualEncoderConfig(), seed=args.seed, num_threads=args.threads, **overrides)

    t0 = time.perf_counter()
    records = load_set(args.data, args.n, args.set_seed)
    set_s = time.perf_counter() - t0
    train = sum(r.split == "train" for r in records)
    print(f"set: {len(records)} images ({train} train) in {set_s:.1f} s")
    print(f"config overrides: {overrides or 'none (defaults)'}")

    rows = []
    for budget in args.budgets:
        steps = [0]
        cfg = replace(base, max_seconds=budget)
        t0 = time.perf_counter()
        model = train_dual_encoder(
            records,
            args.data,
            cfg,
            progress=False,
            callback=lambda s, m, steps=steps: steps.append(s),
        )
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        r = recall_at_k(model, records, args.data)
        eval_s = time.perf_counter() - t0
        rows.append(
            {"budget_s": budget, "steps": steps[-1], "train_s": train_s, "eval_s": eval_s, **r}
        )

    print()
    print("| budget (s) | steps | train (s) | R@1 | R@5 | R@10 | queries | eval (s) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['budget_s']:.0f} | {r['steps']} | {r['train_s']:.1f} | {r['R@1']:.3f} "
            f"| {r['R@5']:.3f} | {r['R@10']:.3f} | {r['queries']} | {r['eval_s']:.1f} |"
        )
    if args.json:
        args.json.write_text(json.dumps({"config": base.to_dict(), "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
