"""Time and peak memory of building the structured-id tree, up to 1M embeddings.

Each size runs in a fresh process (so its peak RSS is its own): draw ``n`` clustered 384-d
embeddings, build the tree with ``structured_identifiers`` (the code ``grace ids assign`` runs),
then place ``--extend`` new images in it as ``grace ids extend`` does. What
BENCHMARKS.md#structured-tree-build reports:

    python bench/bench_tree.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import resource
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from bench_query import machine_line  # bench/ is on sys.path
from benchmarks_md import write_section

from grace.identifiers.structured import (
    DEFAULT_C,
    DEFAULT_K,
    _place_many,
    structured_identifiers,
    tree_stats,
)

DIM = 384  # MiniLM's width, as bench_scaling


def _embeddings(n: int, seed: int) -> np.ndarray:
    """``n`` unit vectors around ``n // 50`` random centres: clustered, like image features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((max(n // 50, 1), DIM), dtype=np.float32)
    emb = centres[rng.integers(0, len(centres), n)]
    emb += 0.5 * rng.standard_normal((n, DIM), dtype=np.float32)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    return emb


def _one(n: int, k: int, c: int, extend: int, seed: int, threads: int, out: mp.Queue) -> None:
    import faiss

    faiss.omp_set_num_threads(threads)
    emb = _embeddings(n, seed)
    rss_data = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    ids, tree = structured_identifiers(emb, k=k, c=c, seed=seed)
    build = time.perf_counter() - t0
    rss_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    new = _embeddings(extend, seed + 1)
    t0 = time.perf_counter()
    _place_many(tree, new, k=k, c=c)
    place = time.perf_counter() - t0
    stats = tree_stats(tree)
    state_mb = len(json.dumps(tree)) / 1e6
    out.put(
        {
            "n": n,
            "build_s": build,
            "peak_rss_mb": rss_build,
            "data_rss_mb": rss_data,
            "extend": extend,
            "place_ms_per_image": 1e3 * place / max(extend, 1),
            "state_mb": state_mb,
            "unique": len(set(ids)) == n,
            **stats,
        }
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="10000,100000,1000000")
    p.add_argument("--k", type=int, default=DEFAULT_K)
    p.add_argument("--c", type=int, default=DEFAULT_C)
    p.add_argument("--extend", type=int, default=1000, help="new images placed after the build")
    p.add_argument("--threads", type=int, default=2, help="FAISS threads (the machine's cores)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", type=Path, help="put the table in this markdown file's section")
    args = p.parse_args(argv)
    ctx = mp.get_context("spawn")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        q = ctx.Queue()
        proc = ctx.Process(
            target=_one, args=(n, args.k, args.c, args.extend, args.seed, args.threads, q)
        )
        proc.start()
        row = q.get()
        proc.join()
        rows.append(row)
        print(
            f"{n:>9,} embeddings: build {row['build_s']:.1f} s, "
            f"peak RSS {row['peak_rss_mb']:.0f} MB, "
            f"depth {row['max_depth']}, fan-out <= {row['max_fanout']}",
            file=sys.stderr,
            flush=True,
        )
    command = shlex.join(
        ["python", *(sys.argv if argv is None else ["bench/bench_tree.py", *argv])]
    )
    lines = [
        "## Structured tree build (`bench/bench_tree.py`)",
        "",
        f"Command: `{command}`",
        "",
        machine_line(),
        "",
        f"`structured_identifiers(emb, k={args.k}, c={args.c})` on N unit vectors (dim {DIM}) "
        "around N/50 random centres, each size in a fresh process: nodes up to 10,000 images are "
        "split with sklearn `KMeans(n_init=3)`, larger ones with FAISS k-means on a sample and an "
        f"exact assignment. Then {args.extend:,} new images placed as `grace ids extend` does. "
        "Peak RSS includes the embeddings themselves (`data RSS`: after drawing them).",
        "",
        "| embeddings | build s | peak RSS MB | data RSS MB | depth | max fan-out | leaves | "
        "place ms/image | tree state MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['n']:,} | {r['build_s']:.1f} | {r['peak_rss_mb']:.0f} | "
            f"{r['data_rss_mb']:.0f} | "
            f"{r['max_depth']} | {r['max_fanout']} | {r['leaves']:,} | "
            f"{r['place_ms_per_image']:.2f} | {r['state_mb']:.1f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        write_section(args.write, "tree", text)


if __name__ == "__main__":
    main()
