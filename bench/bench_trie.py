"""Size, build time and per-step mask time of the array trie, against a naive dict-of-dicts trie.

Identifiers are seeded random unique token sequences of two kinds:

* ``random``: 3 to 6 tokens drawn from a vocabulary of 2,000 (the hard case for size: almost
  every identifier branches off at its second token);
* ``structured``: 3 levels of 30-way cluster tokens plus a position-in-cluster token, like
  hierarchical k-means identifiers (shared prefixes, a small fan-out).

The mask is timed per decoding step for 8 queries x 10 beams = 80 rows whose prefixes are cut
from live identifiers (finished rows padded past EOS). Example (what BENCHMARKS.md reports):

    python bench/bench_trie.py --write BENCHMARKS.md
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import transformers
from benchmarks_md import cpus, write_section  # bench/ is on sys.path

from grace.retrieval.trie import Trie, TrieLogitsProcessor

EOS = 3
PAD = 1
FIRST_TOKEN = 4  # 0..3 are special tokens
VOCAB = 2000
ROWS = 80  # 8 queries x 10 beams
DICT_MAX = 100_000  # the dict trie is only built up to this many identifiers


def random_ids(n: int, seed: int) -> list[tuple[int, ...]]:
    """``n`` unique sequences of 3-6 tokens from [FIRST_TOKEN, VOCAB)."""
    rng = np.random.default_rng(seed)
    m = int(n * 1.05) + 16
    lengths = rng.integers(3, 7, m)
    mat = rng.integers(FIRST_TOKEN, VOCAB, (m, 6))
    mat[np.arange(6)[None, :] >= lengths[:, None]] = -1
    mat = np.unique(mat, axis=0)
    mat = mat[rng.permutation(mat.shape[0])[:n]]
    lengths = (mat >= 0).sum(axis=1)
    return [tuple(r[:k]) for r, k in zip(mat.tolist(), lengths.tolist(), strict=True)]


def structured_ids(n: int, seed: int) -> list[tuple[int, ...]]:
    """``n`` ids: 3 cluster tokens (30-way each, own token range per level) + position."""
    rng = np.random.default_rng(seed)
    cluster = rng.integers(0, 30**3, n)
    order = np.argsort(cluster, kind="stable")
    sorted_c = cluster[order]
    starts = np.searchsorted(sorted_c, sorted_c, side="left")
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n) - starts
    levels = [(cluster // 30**k) % 30 + FIRST_TOKEN + 30 * (2 - k) for k in (2, 1, 0)]
    mat = np.stack([*levels, position + FIRST_TOKEN + 90], axis=1)
    return [tuple(r) for r in mat.tolist()]


KINDS: dict[str, Callable[[int, int], list[tuple[int, ...]]]] = {
    "random": random_ids,
    "structured": structured_ids,
}


class DictTrie:
    """The baseline: GENRE-style nested dicts, EOS a key to an empty dict."""

    def __init__(self, seqs: Sequence[Sequence[int]], eos: int) -> None:
        self.eos = eos
        self.root: dict = {}
        for s in seqs:
            node = self.root
            for t in s:
                child = node.get(t)
                if child is None:
                    child = node[t] = {}
                node = child
            node[eos] = {}

    def next_token_mask(self, prefixes: np.ndarray, vocab_size: int) -> torch.Tensor:
        mask = np.zeros((prefixes.shape[0], vocab_size), dtype=bool)
        for i, row in enumerate(prefixes.tolist()):
            node = self.root
            for t in row:
                node = node.get(t)
                if node is None:
                    break
            if node:
                mask[i, [t for t in node if t < vocab_size]] = True
        return torch.from_numpy(mask)


def decoding_prefixes(ids: list[tuple[int, ...]], seed: int) -> list[np.ndarray]:
    """Per decoding step, the ``(ROWS, step)`` prefixes of ``ROWS`` random live ids."""
    rng = np.random.default_rng(seed)
    picks = [ids[i] for i in rng.integers(0, len(ids), ROWS)]
    width = max(map(len, picks)) + 1
    mat = np.full((ROWS, width), PAD, dtype=np.int64)
    for r, s in enumerate(picks):
        mat[r, : len(s) + 1] = (*s, EOS)
    return [mat[:, :k] for k in range(width + 1)]


def median_time(fn: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_time(mask_fn: Callable[[np.ndarray], object], steps: list[np.ndarray], reps: int) -> float:
    """Median seconds of one decoding step's mask, over all steps and ``reps`` rounds."""
    times = []
    for _ in range(reps):
        for p in steps:
            t0 = time.perf_counter()
            mask_fn(p)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def traced(fn: Callable[[], object]) -> tuple[object, int, int]:
    """(result, bytes still held after, peak bytes during) of ``fn`` by tracemalloc.

    numpy reports its buffers to tracemalloc, so this covers the arrays and the build's temporaries.
    """
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    out = fn()
    current, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return out, current - base, peak - base


def bench_array(ids: list[tuple[int, ...]], steps: list[np.ndarray], vocab: int, reps: int) -> dict:
    row: dict = {"build_s": median_time(lambda: Trie(ids, eos_token_id=EOS), 3)}
    trie, held, peak = traced(lambda: Trie(ids, eos_token_id=EOS))
    row.update(nodes=trie.num_nodes, nbytes=trie.nbytes, held=held, build_peak=peak)
    row["mask_s"] = step_time(lambda p: trie.next_token_mask(p, vocab), steps, reps)
    proc = TrieLogitsProcessor(trie, prompt_length=0)
    scores = torch.randn(ROWS, vocab).log_softmax(-1)
    row["proc_s"] = step_time(lambda p: proc(torch.from_numpy(p), scores), steps, reps)
    return row


def bench_dict(ids: list[tuple[int, ...]], steps: list[np.ndarray], vocab: int, reps: int) -> dict:
    row: dict = {"dict_build_s": median_time(lambda: DictTrie(ids, EOS), 3)}
    trie, held, _ = traced(lambda: DictTrie(ids, EOS))
    row["dict_bytes"] = held
    row["dict_mask_s"] = step_time(lambda p: trie.next_token_mask(p, vocab), steps, reps)
    return row


def bench_one(kind: str, n: int, seed: int, reps: int) -> dict:
    ids = KINDS[kind](n, seed)
    vocab = max(VOCAB, max(max(s) for s in ids) + 1)
    steps = decoding_prefixes(ids, seed + 1)
    row: dict = {"kind": kind, "ids": len(ids), "tokens_per_id": np.mean([len(s) for s in ids])}
    row.update(bench_array(ids, steps, vocab, reps))
    if n <= DICT_MAX:
        row.update(bench_dict(ids, steps, vocab, reps))
    return row


def check_agreement(kind: str, n: int, seed: int) -> None:
    """The timed tries give the same masks (a smaller run, every step)."""
    ids = KINDS[kind](n, seed)
    trie, ref = Trie(ids, eos_token_id=EOS), DictTrie(ids, EOS)
    for p in decoding_prefixes(ids, seed + 1):
        if not torch.equal(trie.next_token_mask(p, VOCAB), ref.next_token_mask(p, VOCAB)):
            raise SystemExit(f"{kind}: array and dict tries disagree on prefixes {p.tolist()}")


def mb(b: float) -> str:
    return f"{b / 2**20:.2f}" if b < 10 * 2**20 else f"{b / 2**20:.1f}"


def ms(s: float) -> str:
    return f"{s * 1e3:.3f}" if s < 0.01 else f"{s * 1e3:.1f}"


def secs(s: float) -> str:
    return f"{s:.4f}" if s < 0.1 else f"{s:.2f}"


def report(rows: list[dict], command: str) -> str:
    lines = [
        "## Identifier trie (`grace/retrieval/trie.py`)",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpus()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}; "
        f"load average {os.getloadavg()[0]:.2f} when it finished.",
        "",
        "Array trie. *build* is the median of 3 builds from a list of tuples; *size* is "
        "`Trie.nbytes`; *build peak* is the peak memory allocated during a build (tracemalloc, "
        f"numpy buffers included; the input list excluded); *mask* is one `next_token_mask` "
        f"call for {ROWS} rows (8 queries x 10 beams), *processor* one `TrieLogitsProcessor` call "
        "on log-probabilities, both the median over decoding steps.",
        "",
        "| ids | kind | tokens/id | nodes | size MB | bytes/id | build s | build peak MB "
        "| mask ms/step | processor ms/step |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['ids']:,} | {r['kind']} | {r['tokens_per_id']:.2f} | {r['nodes']:,} "
            f"| {mb(r['nbytes'])} | {r['nbytes'] / max(r['ids'], 1):.1f} | {secs(r['build_s'])} "
            f"| {mb(r['build_peak'])} | {ms(r['mask_s'])} | {ms(r['proc_s'])} |"
        )
    both = [r for r in rows if "dict_bytes" in r]
    if both:
        lines += [
            "",
            "Against a GENRE-style dict-of-dicts trie on the same ids and the same prefixes "
            "(its memory: what the built dicts hold, by tracemalloc; ratios are dict / array).",
            "",
            "| ids | kind | dict build s | array build s | build ratio | dict MB | array MB "
            "| memory ratio | dict mask ms | array mask ms | mask ratio |",
            "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in both:
            lines.append(
                f"| {r['ids']:,} | {r['kind']} | {secs(r['dict_build_s'])} | {secs(r['build_s'])} "
                f"| {r['dict_build_s'] / r['build_s']:.1f}x | {mb(r['dict_bytes'])} "
                f"| {mb(r['nbytes'])} | {r['dict_bytes'] / r['nbytes']:.0f}x "
                f"| {ms(r['dict_mask_s'])} | {ms(r['mask_s'])} "
                f"| {r['dict_mask_s'] / r['mask_s']:.1f}x |"
            )
    big = [r for r in rows if r["ids"] >= 1_000_000]
    if big:
        lines += ["", "Targets for 1M ids: size <= 64 MB, build <= 5 s on this machine."]
        for r in big:
            ok = r["nbytes"] <= 64 * 2**20 and r["build_s"] <= 5
            lines.append(
                f"- {r['kind']}: {mb(r['nbytes'])} MB, built in {secs(r['build_s'])} s: "
                f"{'met' if ok else 'MISSED'}."
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--sizes", default="1000,100000,1000000", help="comma-separated id counts")
    p.add_argument("--quick", action="store_true", help="only 1K and 100K ids")
    p.add_argument("--kinds", default="random,structured", help=f"some of {sorted(KINDS)}")
    p.add_argument("--reps", type=int, default=20, help="rounds of decoding steps to time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", type=Path, help="put the tables in this markdown file's section")
    args = p.parse_args(argv)
    sizes = [1000, 100_000] if args.quick else [int(s) for s in args.sizes.split(",")]
    kinds = args.kinds.split(",")
    rows = []
    for kind in kinds:
        check_agreement(kind, 2000, args.seed)
        for n in sizes:
            t0 = time.perf_counter()
            rows.append(bench_one(kind, n, args.seed, args.reps))
            print(f"{kind} {n}: done in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    command = shlex.join(["python", *sys.argv]) if argv is None else shlex.join(argv)
    text = report(rows, command)
    print(text)
    if args.write:
        write_section(args.write, "trie", text)


if __name__ == "__main__":
    main()
