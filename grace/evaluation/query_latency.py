"""What a query costs against the number of images: trie beam search against dense retrieval.

GRACE's efficiency claim is that a query's cost does not grow with the catalog, while dense
retrieval scores every image. Weights do not matter for cost, so a random-init backbone (``tiny``
Idefics3, or ``lite``, the product's default) and a trie of ``n`` random distinct ids of the
``numeric`` scheme (one digit token each, drawn from the same space at every size so ids are
equally long) stand in for a trained model; beam search on random weights walks random paths
through the trie. A lite query also pays its frozen MiniLM sentence encoding, timed on its own
(uncached) beside the search. The dense side encodes the query with the dual encoder's text tower
and scores ``n`` random unit vectors (torch matmul + top-k; FAISS flat inner-product index too
when ``faiss`` imports).

Every figure is a median over several runs, the two sides timed in one process, one after the
other, so ratios are taken under the same load. ``bench/bench_query.py`` writes the tables of
BENCHMARKS.md; ``grace bench`` runs this and logs the plot to MLflow.
"""

from __future__ import annotations

import functools
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from grace.data.synth import synthesize
from grace.models.dual_encoder.configuration import DualEncoderConfig
from grace.models.dual_encoder.modeling import DualEncoder, build_vocab
from grace.models.factory import BUILT_IN, build_backbone
from grace.models.lite.frozen_encoders import sentence_features
from grace.models.prompts import Prompts, retrieve_turn
from grace.retrieval.beam_search import generate_beam_search, trie_beam_search
from grace.retrieval.trie import Trie

K = 10  # images returned per query, both sides


BACKBONES = tuple(BUILT_IN)


@dataclass
class QueryBenchConfig:
    """Settings of one query-latency benchmark.

    Args:
        backbone (`str`, *optional*, defaults to `"tiny"`):
            `"tiny"` or `"lite"` (the product's default, whose MiniLM encoding is timed too).
        sizes (`list[int]`, *optional*, defaults to `[1_000, 10_000, 100_000, 1_000_000]`):
            Catalog sizes (identifiers in the trie) to time.
        num_beams (`int`, *optional*, defaults to `10`):
            Beams of the GRACE search.
        batch_size (`int`, *optional*, defaults to `16`):
            Queries per call in the batched rows.
        queries (`int`, *optional*, defaults to `16`):
            Distinct queries timed (single-query rows take each in turn).
        repeats (`int`, *optional*, defaults to `7`):
            Rounds; every figure is a median over them.
        threads (`int`, *optional*, defaults to `1`):
            Torch (and FAISS) CPU threads.
        reference (`bool`, *optional*, defaults to `True`):
            Also time transformers' ``generate`` (the path before ``trie_beam_search``).
        id_space (`int`, *optional*, defaults to `1_000_000`):
            Ids are distinct random numbers below this.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the ids, the demo captions and the random init.
    """

    backbone: str = "tiny"
    sizes: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000, 1_000_000])
    num_beams: int = 10
    batch_size: int = 16
    queries: int = 16
    repeats: int = 7
    threads: int = 1
    reference: bool = True
    id_space: int = 1_000_000
    seed: int = 0


def numeric_id_sequences(
    tokenizer: Any, n: int, space: int, seed: int
) -> tuple[np.ndarray, list[tuple[int, ...]]]:
    """``n`` distinct random numbers below ``space`` and their ``numeric``-scheme token ids."""
    digit = [tokenizer(d, add_special_tokens=False)["input_ids"] for d in "0123456789"]
    if any(len(d) != 1 for d in digit):
        raise ValueError("the tokenizer does not give each digit one token")
    table = np.array([d[0] for d in digit])
    numbers = np.random.default_rng(seed).permutation(space)[:n]
    width = len(str(space - 1))
    text = np.char.zfill(numbers.astype(str), width)  # fixed width, then cut the leading zeros
    mat = table[np.frombuffer(text.astype(f"S{width}").tobytes(), np.uint8).reshape(n, width) - 48]
    lengths = np.char.str_len(numbers.astype(str))
    return numbers, [
        tuple(r[width - k :]) for r, k in zip(mat.tolist(), lengths.tolist(), strict=True)
    ]


def linear_flops(model: nn.Module, fn: Callable[[], object]) -> int:
    """Multiply-add FLOPs (x2) of every ``nn.Linear`` call while ``fn`` runs: the arithmetic."""
    total = 0

    def hook(mod: nn.Linear, args: tuple, out: torch.Tensor) -> None:
        nonlocal total
        total += 2 * out.numel() * mod.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, nn.Linear)]
    try:
        fn()
    finally:
        for h in handles:
            h.remove()
    return total


def linear_gflops(model: nn.Module, rows: int = 160, repeats: int = 30) -> float:
    """Rate (GFLOP/s) of this machine on the model's own ``nn.Linear`` weights.

    Each weight is applied to ``rows`` rows in turn as a decode step does (weights streamed from
    memory included); the median of ``repeats`` passes is the rate the arithmetic floor assumes.
    """
    weights = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    xs = {w.shape[1]: torch.randn(rows, w.shape[1]) for w in weights}
    flops = sum(2 * rows * w.numel() for w in weights)
    times = []
    with torch.no_grad():
        for _ in range(repeats):
            t0 = time.perf_counter()
            for w in weights:
                nn.functional.linear(xs[w.shape[1]], w)
            times.append(time.perf_counter() - t0)
    return flops / statistics.median(times) / 1e9


@dataclass
class Setup:
    """What one benchmark times: the backbone, its query prompts, and the dual encoder."""

    model: nn.Module
    processor: Any
    queries: list[str]
    prompts: list[str]
    dual: DualEncoder
    sentences: list[str] | None = None
    """What the lite backbone's MiniLM encodes for each query (None: no sentence encoder)."""


def build_setup(cfg: QueryBenchConfig) -> Setup:
    """Random-init backbone and dual encoder, with a tokenizer trained on demo captions."""
    with tempfile.TemporaryDirectory() as tmp:
        records = synthesize(Path(tmp) / "d", n=max(64, cfg.queries), seed=cfg.seed)
    texts = [c for r in records for c in r.captions]
    model, processor = build_backbone(cfg.backbone, texts, seed=cfg.seed)
    queries = [r.captions[0] for r in records][: cfg.queries]
    asks = [Prompts().retrieve.format(query=q) for q in queries]
    prompts = [retrieve_turn(processor, Prompts(), q) for q in queries]
    dual = DualEncoder(DualEncoderConfig(), build_vocab(texts)).eval()
    sentences = asks if cfg.backbone == "lite" else None  # the prompt's words, as it encodes
    return Setup(model.eval(), processor, queries, prompts, dual, sentences)


def _inputs(setup: Setup, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    setup.processor.tokenizer.padding_side = "left"
    return dict(setup.processor(text=list(prompts), return_tensors="pt", padding=True))


def _faiss():
    try:
        import faiss
    except ImportError:
        return None
    return faiss


def run_query_benchmark(
    cfg: QueryBenchConfig, log: Callable[[str], None] = print
) -> dict[str, Any]:
    """Per-query milliseconds of every method at every catalog size, the floor, the crossovers.

    Runs are interleaved (in each round, at each size, the methods take turns call by call, and
    the floor's matmul rate is measured once a round), so a change of load while it runs hits
    all columns alike; each figure is the median over rounds, and each ratio of a target the
    median of the ratios taken within a round.
    """
    torch.set_num_threads(cfg.threads)
    setup = build_setup(cfg)
    tok = setup.processor.tokenizer
    singles = [_inputs(setup, [p]) for p in setup.prompts]
    faiss = _faiss()
    if faiss is not None:
        faiss.omp_set_num_threads(cfg.threads)
    timed: dict[int, dict[str, list[Callable[[], object]]]] = {}
    steps: dict[int, int] = {}
    for n in cfg.sizes:
        _, seqs = numeric_id_sequences(tok, n, cfg.id_space, cfg.seed)
        steps[n] = max(map(len, seqs)) + 1
        timed[n] = _grace_methods(setup, Trie(seqs, eos_token_id=tok.eos_token_id), steps[n], cfg)
        timed[n].update(_dense_methods(setup, n, cfg, faiss))
        del seqs
        log(f"built {n:,} ids")
    nq = len(singles)
    times: dict[int, dict[str, list[float]]] = {n: {m: [] for m in timed[n]} for n in cfg.sizes}
    for calls in timed.values():  # warm-up
        for call in calls.values():
            for part in call:
                part()
    text = setup.model.model.text_model
    shapes = {"": cfg.num_beams, "_batched": cfg.batch_size * cfg.num_beams}
    rates: dict[str, dict[int, list[float]]] = {m: {n: [] for n in cfg.sizes} for m in shapes}
    order = np.random.default_rng(cfg.seed)
    for r in range(cfg.repeats):
        for n in cfg.sizes:
            for mode, shape in shapes.items():  # the floor's rate, under this size's load
                rates[mode][n].append(linear_gflops(text, rows=shape, repeats=10))
            # call by call, the methods take turns: load changes hit all of them alike; the
            # order is shuffled at every turn, so each follows every other equally often on
            # average (the first after a dense scan finds its weights evicted from the caches,
            # the next one finds them warm). A rotation would not do: it keeps each method
            # behind the same neighbour, which put the trie search always after a FAISS scan
            # and the plain search after the warm batched trie search.
            spent = dict.fromkeys(timed[n], 0.0)
            names = list(timed[n])
            for i in range(max(len(c) for c in timed[n].values())):
                for name in order.permutation(names):
                    call = timed[n][name]
                    if i < len(call):
                        t0 = time.perf_counter()
                        call[i]()
                        spent[name] += time.perf_counter() - t0
            for name, total in spent.items():
                times[n][name].append(1e3 * total / nq)
        log(f"round {r + 1}/{cfg.repeats} done")
    rows = []
    for n in cfg.sizes:
        row: dict[str, Any] = {"ids": n, "steps": steps[n]}
        row.update({f"{m}_ms": statistics.median(v) for m, v in times[n].items()})
        rows.append(row)
        log(
            "  ".join(
                f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()
            )
        )
    kw = dict(num_beams=cfg.num_beams, max_new_tokens=steps[cfg.sizes[0]])
    trie = trie_for_flops(tok)
    flops = linear_flops(
        setup.model,
        lambda: trie_beam_search(  # the module path: the fused one calls no nn.Linear
            setup.model, singles[0], trie, pad_token_id=tok.pad_token_id, fused_steps=False, **kw
        ),
    )
    return {
        "config": asdict(cfg),
        "rows": rows,
        **_floor(flops, times, rates),
        **_overheads(times),
        **_crossovers(rows),
    }


def trie_for_flops(tok: Any) -> Trie:
    """A 1K-id trie: the arithmetic of a query does not depend on the trie's size."""
    return Trie(numeric_id_sequences(tok, 1000, 1_000_000, 0)[1], eos_token_id=tok.eos_token_id)


def _grace_methods(
    setup: Setup, trie: Trie, steps: int, cfg: QueryBenchConfig
) -> dict[str, list[Callable[[], object]]]:
    """Each method as its calls: one per query, or one per batch of queries."""
    tok = setup.processor.tokenizer
    kw = dict(num_beams=cfg.num_beams, max_new_tokens=steps, pad_token_id=tok.pad_token_id)
    singles = [_inputs(setup, [p]) for p in setup.prompts]
    batches = [
        _inputs(setup, setup.prompts[i : i + cfg.batch_size])
        for i in range(0, len(setup.prompts), cfg.batch_size)
    ]
    model, eos = setup.model, tok.eos_token_id

    def over(xs, search, t=trie, **more):
        return [functools.partial(search, model, x, t, **kw, **more) for x in xs]

    methods = {
        "grace": over(singles, trie_beam_search),
        "grace_batched": over(batches, trie_beam_search),
        "plain": over(singles, trie_beam_search, None, eos_token_id=eos),
        "plain_batched": over(batches, trie_beam_search, None, eos_token_id=eos),
    }
    if cfg.reference:
        methods["generate"] = over(singles, generate_beam_search)
        methods["generate_batched"] = over(batches, generate_beam_search)
    if setup.sentences is not None:  # the sentence encoder, uncached (the processor caches)
        encode = functools.partial(sentence_features, encoder=setup.processor.text_encoder)
        texts, size = setup.sentences, cfg.batch_size
        methods["encode"] = [functools.partial(encode, [t]) for t in texts]
        methods["encode_batched"] = [
            functools.partial(encode, texts[i : i + size]) for i in range(0, len(texts), size)
        ]
    return methods


def _dense_methods(
    setup: Setup, n: int, cfg: QueryBenchConfig, faiss: Any
) -> dict[str, list[Callable[[], object]]]:
    """Dense brute force over ``n`` images: text tower + scores + top-k, single and batched."""
    dim = setup.dual.config.embed_dim
    gen = torch.Generator().manual_seed(cfg.seed)
    images = nn.functional.normalize(torch.randn(n, dim, generator=gen), dim=-1)
    ids = [setup.dual.tokenize([q]) for q in setup.queries]
    bids = [
        setup.dual.tokenize(setup.queries[i : i + cfg.batch_size])
        for i in range(0, len(setup.queries), cfg.batch_size)
    ]

    @torch.no_grad()
    def search(x: torch.Tensor) -> torch.Tensor:
        return torch.topk(setup.dual.encode_texts(x) @ images.T, K, dim=1).indices

    out = {
        "dense": [functools.partial(search, x) for x in ids],
        "dense_batched": [functools.partial(search, x) for x in bids],
    }
    if faiss is not None:
        index = faiss.IndexFlatIP(dim)
        index.add(images.numpy())

        @torch.no_grad()
        def fsearch(x: torch.Tensor) -> object:
            return index.search(setup.dual.encode_texts(x).numpy(), K)

        out["faiss"] = [functools.partial(fsearch, x) for x in ids]
        out["faiss_batched"] = [functools.partial(fsearch, x) for x in bids]
    return out


def _floor(
    flops: int,
    times: dict[int, dict[str, list[float]]],
    rates: dict[str, dict[int, list[float]]],
) -> dict[str, float]:
    """The arithmetic floor of one query, and how far each search is from it.

    The floor is the query's arithmetic at the rate of the text model's own matmuls at the shape
    each mode runs (``num_beams`` rows for one query, ``batch_size * num_beams`` batched; see
    ``linear_gflops``, measured at each size in each round). The distance is the median over
    sizes and rounds of GRACE's time over the floor of the same turn.
    """
    out: dict[str, float] = {"gflop_per_query": flops / 1e9}
    for mode, by_size in rates.items():
        pooled = [g for rate in by_size.values() for g in rate]
        out[f"gflops{mode}"] = statistics.median(pooled)
        out[f"floor{mode}_ms"] = flops / statistics.median(pooled) / 1e6
        out[f"grace{mode}_over_floor"] = statistics.median(
            ms * g * 1e6 / flops
            for n, rate in by_size.items()
            for ms, g in zip(times[n][f"grace{mode}"], rate, strict=True)
        )
    return out


def _overheads(times: dict[int, dict[str, list[float]]]) -> dict[str, float]:
    """Trie overhead, single and batched.

    The median over sizes and rounds of GRACE's time over the plain search's in the same round,
    minus one.
    """
    out = {}
    for mode in ("", "_batched"):
        ratios = [
            g / p
            for t in times.values()
            for g, p in zip(t[f"grace{mode}"], t[f"plain{mode}"], strict=True)
        ]
        out[f"trie_overhead{mode}"] = statistics.median(ratios) - 1
    return out


def crossover(sizes: Sequence[int], grace_ms: Sequence[float], dense_ms: Sequence[float]) -> float:
    """Catalog size where dense retrieval gets slower than GRACE (``inf``: not up to 1e9).

    Dense cost is fitted as ``a + b * n`` on the two largest sizes (it is linear in ``n`` once
    the scores dominate); GRACE's is the median over sizes (it is flat).
    """
    g = statistics.median(grace_ms)
    for i, n in enumerate(sizes):
        if dense_ms[i] >= g:
            if i == 0:
                return float(n)
            n0, d0 = sizes[i - 1], dense_ms[i - 1]
            return n0 + (g - d0) * (n - n0) / (dense_ms[i] - d0)
    (n0, n1), (d0, d1) = sizes[-2:], dense_ms[-2:]
    slope = (d1 - d0) / (n1 - n0)
    if slope <= 0:
        return float("inf")
    at = n1 + (g - d1) / slope
    return at if at <= 1e9 else float("inf")


def _crossovers(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Crossover of GRACE's search against each dense column.

    With a sentence encoder, also of the whole query (encoding + search: ``..._with_encoder``).
    """
    sizes = [r["ids"] for r in rows]
    out = {}
    for mode in ("", "_batched"):
        for dense in ("dense", "faiss"):
            if f"{dense}{mode}_ms" not in rows[0]:
                continue
            dense_ms = [r[f"{dense}{mode}_ms"] for r in rows]
            grace_ms = [r[f"grace{mode}_ms"] for r in rows]
            out[f"crossover_{dense}{mode}"] = crossover(sizes, grace_ms, dense_ms)
            if f"encode{mode}_ms" in rows[0]:
                whole = [g + r[f"encode{mode}_ms"] for g, r in zip(grace_ms, rows, strict=True)]
                out[f"crossover_{dense}{mode}_with_encoder"] = crossover(sizes, whole, dense_ms)
    return out
