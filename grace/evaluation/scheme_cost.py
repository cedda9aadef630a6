"""What a query and a training step cost per identifier scheme, against the catalog's size.

The figures users get: the default ``lite`` backbone (random init: weights do not change the
cost) with identifier rows in its own table, and each scheme's ids made by the scheme's own code
at every size: ``structured`` (node tokens, the default) from a k-means tree of random
embeddings, ``atomic`` (one token per image: the root has N children, O(N) by definition) and
``numeric`` (digit tokens). A query is the trie beam search from a retrieve prompt (its MiniLM
sentence feature computed once, outside the timing); a training step is forward, backward and
optimizer step of a batch of memorize examples, scored among each position's trie children.
Dense retrieval scores N random unit vectors by brute force (torch) and with a FAISS flat index.

Every figure is a median over rounds in which the methods take turns, so a change of load hits
all alike. ``bench/bench_scaling.py`` writes BENCHMARKS.md#query-cost-by-catalog-size.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from grace.data.synth import synthesize
from grace.identifiers.structured import (
    DEFAULT_C,
    DEFAULT_K,
    node_tokens,
    structured_identifiers,
)
from grace.models.factory import build_backbone
from grace.models.lite.identifier_table import IdentifierTable
from grace.models.prompts import Prompts, retrieve_turn, user_turn
from grace.retrieval.beam_search import trie_beam_search
from grace.retrieval.trie import Trie

SCHEMES = ("structured", "atomic", "numeric")
K = 10  # images a dense query returns
EMBED_DIM = 384  # MiniLM's width: the dense side's vectors and the tree's embeddings


@dataclass
class SchemeCostConfig:
    """Settings of one scheme-cost benchmark.

    Args:
        sizes (`list[int]`): Catalog sizes (identifiers) to time.
        schemes (`list[str]`): Schemes to time, of ``SCHEMES``.
        num_beams (`int`): Beams of the search.
        batch_size (`int`): Queries per batched call, and examples per training step.
        queries (`int`): Distinct queries timed.
        repeats (`int`): Rounds; every figure is a median over them.
        train_steps (`int`): Training steps timed per round.
        threads (`int`): Torch (and FAISS) CPU threads.
        k (`int`): Branching of the structured tree.
        c (`int`): Leaf size of the structured tree.
        seed (`int`): Seed of the embeddings, ids and init.
    """

    sizes: list[int] = field(default_factory=lambda: [1_000, 10_000, 100_000, 1_000_000])
    schemes: list[str] = field(default_factory=lambda: list(SCHEMES))
    num_beams: int = 10
    batch_size: int = 16
    queries: int = 8
    repeats: int = 5
    train_steps: int = 3
    threads: int = 1
    k: int = DEFAULT_K
    c: int = DEFAULT_C
    seed: int = 0


def scheme_sequences(
    scheme: str, n: int, first_id_token: int, digit_tokens: list[int], cfg: SchemeCostConfig
) -> tuple[list[tuple[int, ...]], int, dict[str, float]]:
    """``n`` identifiers of ``scheme`` as token sequences, the identifier rows they need, stats.

    Identifier tokens are numbered from ``first_id_token`` (the text vocabulary's size).
    """
    rng = np.random.default_rng(cfg.seed)
    if scheme == "atomic":
        return [(first_id_token + i,) for i in range(n)], n, {}
    if scheme == "numeric":
        numbers = rng.permutation(max(n, 10 * n))[:n]  # the id space grows with the catalog
        seqs = [tuple(digit_tokens[int(d)] for d in str(int(x))) for x in numbers]
        return seqs, 0, {}
    if scheme != "structured":
        raise ValueError(f"unknown scheme {scheme!r}: one of {SCHEMES}")
    emb = rng.standard_normal((n, EMBED_DIM), dtype=np.float32)
    t0 = time.perf_counter()
    ids, _tree = structured_identifiers(emb, k=cfg.k, c=cfg.c, seed=cfg.seed)
    build = time.perf_counter() - t0
    rows: dict[str, int] = {}
    seqs = []
    for identifier in ids:
        seqs.append(
            tuple(first_id_token + rows.setdefault(t, len(rows)) for t in node_tokens(identifier))
        )
    return seqs, len(rows), {"tree_build_s": build}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


@dataclass
class _Bench:
    """The backbone and its inputs, built once; the identifier table swapped per case."""

    model: Any
    processor: Any
    single: list[dict[str, torch.Tensor]]
    batched: dict[str, torch.Tensor]
    train_prompt: dict[str, torch.Tensor]
    digits: list[int]


def _setup(cfg: SchemeCostConfig) -> _Bench:
    with tempfile.TemporaryDirectory() as tmp:
        records = synthesize(Path(tmp) / "d", n=max(64, cfg.queries), seed=cfg.seed)
        texts = [c for r in records for c in r.captions] + list("0123456789")
        model, processor = build_backbone("lite", texts, seed=cfg.seed)
        tok = processor.tokenizer
        tok.padding_side = "left"
        prompts = [retrieve_turn(processor, Prompts(), r.captions[0]) for r in records]
        prompts = prompts[: cfg.queries]
        single = [dict(processor(text=[p], return_tensors="pt")) for p in prompts]
        batched = dict(processor(text=(prompts * cfg.batch_size)[: cfg.batch_size],
                                 return_tensors="pt", padding=True))  # fmt: skip
        from PIL import Image

        image = Image.open(Path(tmp) / "d" / records[0].path).convert("RGB")
        turn = user_turn(processor, Prompts().memorize, with_image=True)
        train_prompt = dict(processor(text=[turn], images=[[image]], return_tensors="pt"))
    digits = [tok(d, add_special_tokens=False)["input_ids"][0] for d in "0123456789"]
    return _Bench(model.eval(), processor, single, batched, train_prompt, digits)


def _set_rows(model: Any, rows: int, seed: int) -> None:
    """Give ``model`` a fresh identifier table of ``rows`` random rows."""
    d, v = model.config.text_config.hidden_size, model.text_vocab_size
    table = IdentifierTable(rows, d, v)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed)
        table.inputs.normal_(0, 0.02, generator=gen)
        table.outputs.normal_(0, 0.02, generator=gen)
    model.identifiers = table
    model.config.identifier_rows = rows


def _train_batch(bench: _Bench, seqs: list[tuple[int, ...]], trie: Trie, size: int, seed: int):
    """A memorize batch: the image prompt, then ``size`` random identifiers + EOS as answers."""
    from grace.constants import IGNORE_INDEX
    from grace.training.choices import label_choices

    eos = bench.processor.tokenizer.eos_token_id
    pad = bench.processor.tokenizer.pad_token_id
    prompt = bench.train_prompt["input_ids"][0]
    pick = np.random.default_rng(seed).integers(0, len(seqs), size)
    answers = [list(seqs[i]) + [eos] for i in pick]
    width = len(prompt) + max(map(len, answers))
    ids = torch.full((size, width), pad)
    labels = torch.full((size, width), IGNORE_INDEX)
    mask = torch.zeros((size, width), dtype=torch.long)
    for row, answer in enumerate(answers):
        n = len(prompt) + len(answer)
        ids[row, : len(prompt)] = prompt
        ids[row, len(prompt) : n] = torch.tensor(answer)
        labels[row, len(prompt) : n] = torch.tensor(answer)
        mask[row, :n] = 1
    features = bench.train_prompt["image_features"].expand(size, *[-1] * (
        bench.train_prompt["image_features"].dim() - 1))  # fmt: skip
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "image_features": features.contiguous()}  # fmt: skip
    batch["label_choices"] = label_choices(labels, trie)
    return batch


def _train_step(model: Any, batch: dict[str, torch.Tensor]) -> Callable[[], None]:
    from grace.training.engine import make_engine
    from grace.training.loop import _param_groups

    model.train()
    engine = make_engine(model, _param_groups(model, 0.01), lr=1e-4, grad_clip=1.0)

    def step() -> None:
        loss = engine.model(**batch).loss
        engine.backward(loss)
        engine.step()

    return step


def _dense(n: int, queries: int, batch: int, threads: int, seed: int) -> dict[str, Callable]:
    """Brute-force torch and FAISS flat top-k over ``n`` random unit vectors."""
    gen = torch.Generator().manual_seed(seed)
    db = torch.nn.functional.normalize(torch.randn(n, EMBED_DIM, generator=gen), dim=1)
    q1 = torch.nn.functional.normalize(torch.randn(1, EMBED_DIM, generator=gen), dim=1)
    qb = torch.nn.functional.normalize(torch.randn(batch, EMBED_DIM, generator=gen), dim=1)
    out = {
        "dense_single": lambda: torch.topk(q1 @ db.T, K),
        "dense_batched": lambda: torch.topk(qb @ db.T, K),
    }
    try:
        import faiss
    except ImportError:
        return out
    faiss.omp_set_num_threads(threads)
    index = faiss.IndexFlatIP(EMBED_DIM)
    index.add(db.numpy())
    q1n, qbn = q1.numpy(), qb.numpy()
    out["faiss_single"] = lambda: index.search(q1n, K)
    out["faiss_batched"] = lambda: index.search(qbn, K)
    return out


def _time(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1000


def run_scheme_cost(cfg: SchemeCostConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Per-query and per-step milliseconds of every scheme and of dense retrieval at each size.

    Returns ``{"config": ..., "rows": [...]}``: one row per (scheme, size) with ``single_ms``,
    ``batched_ms`` (per query), ``train_step_ms``, ``train_example_ms``, ``id_rows``,
    ``max_fanout``, ``depth``, ``bytes_per_id`` (identifier table, fp32) and, per size, the
    dense figures (``dense_*``, ``faiss_*``).
    """
    torch.set_num_threads(cfg.threads)
    bench = _setup(cfg)
    tok = bench.processor.tokenizer
    v, eos, pad = bench.model.text_vocab_size, tok.eos_token_id, tok.pad_token_id
    d = bench.model.config.text_config.hidden_size
    kw = dict(num_beams=cfg.num_beams, pad_token_id=pad)
    rows: list[dict[str, Any]] = []
    for n in cfg.sizes:
        dense = _dense(n, cfg.queries, cfg.batch_size, cfg.threads, cfg.seed)
        dense_times = {name: [] for name in dense}
        for scheme in cfg.schemes:
            seqs, id_rows, stats = scheme_sequences(scheme, n, v, bench.digits, cfg)
            trie = Trie(seqs, eos_token_id=eos)
            steps = max(map(len, seqs)) + 1
            degree = trie.degree(np.arange(trie.num_nodes))
            _set_rows(bench.model, id_rows, cfg.seed)
            batch = _train_batch(bench, seqs, trie, cfg.batch_size, cfg.seed)
            bench.model.eval()

            def single(i: int, trie=trie, steps=steps) -> None:
                trie_beam_search(bench.model, bench.single[i % len(bench.single)], trie,
                                 max_new_tokens=steps, **kw)  # fmt: skip

            def batched(trie=trie, steps=steps) -> None:
                trie_beam_search(bench.model, bench.batched, trie, max_new_tokens=steps, **kw)

            single(0), batched()  # warm-up: fused weights, caches
            times: dict[str, list[float]] = {"single": [], "batched": [], "train": []}
            for _ in range(cfg.repeats):  # queries and dense scans take turns, round by round
                times["single"].append(
                    _median([_time(lambda i=i: single(i)) for i in range(cfg.queries)])
                )
                times["batched"].append(_time(batched) / cfg.batch_size)
                for name, fn in dense.items():
                    per = cfg.batch_size if "batched" in name else 1
                    dense_times[name].append(_time(fn) / per)
            # training last: it changes the weights, which the search's fused copy would rebuild
            step = _train_step(bench.model, batch)
            step()  # warm-up: the optimizer's state
            for _ in range(cfg.repeats):
                times["train"].append(_median([_time(step) for _ in range(cfg.train_steps)]))
            bench.model.eval()
            row = {
                "scheme": scheme,
                "ids": n,
                "single_ms": _median(times["single"]),
                "batched_ms": _median(times["batched"]),
                "train_step_ms": _median(times["train"]),
                "train_example_ms": _median(times["train"]) / cfg.batch_size,
                "id_rows": id_rows,
                "bytes_per_id": 2 * d * 4 * id_rows / n,
                "max_fanout": int(degree.max()),
                "depth": steps - 1,
                **stats,
            }
            rows.append(row)
            log(
                f"{scheme:>10} {n:>9,} ids: single {row['single_ms']:.1f} ms, batched "
                f"{row['batched_ms']:.2f} ms/query, train step {row['train_step_ms']:.1f} ms "
                f"(fan-out <= {row['max_fanout']}, {steps - 1} tokens)"
            )
            del trie, seqs, batch, step
        rows.append({"scheme": "dense", "ids": n,
                     **{f"{k}_ms": _median(t) for k, t in dense_times.items()}})  # fmt: skip
        del dense
    return {"config": cfg.__dict__, "rows": rows}


def ratio_table(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per scheme: each size's cost over the smallest size's (single, batched, train step)."""
    out = []
    by_scheme: dict[str, list[dict[str, Any]]] = {}
    for r in result["rows"]:
        if r["scheme"] != "dense":
            by_scheme.setdefault(r["scheme"], []).append(r)
    for scheme, rs in by_scheme.items():
        base = min(rs, key=lambda r: r["ids"])
        for r in sorted(rs, key=lambda r: r["ids"]):
            out.append({
                "scheme": scheme, "ids": r["ids"],
                "single": r["single_ms"] / base["single_ms"],
                "batched": r["batched_ms"] / base["batched_ms"],
                "train": r["train_step_ms"] / base["train_step_ms"],
            })  # fmt: skip
    return out


# The bar for "flat": the largest catalog over the smallest, same run.
FLAT_QUERY_RATIO, FLAT_TRAIN_RATIO = 1.10, 1.20


def markdown_report(result: dict[str, Any], scheme: str = "structured") -> str:
    """The benchmark's tables as markdown, and whether ``scheme`` stayed flat.

    Per-size costs, dense retrieval, the ratios to the smallest size; flat means the largest
    size over the smallest <= ``FLAT_QUERY_RATIO`` per query and ``FLAT_TRAIN_RATIO`` per step.

    Args:
        result (`dict`): What ``run_scheme_cost`` returns.
        scheme (`str`): The scheme whose targets are checked (the default scheme).
    """
    lines = [
        "| scheme | ids | single ms | batched ms/query | train step ms | ms/example | id rows "
        "| bytes/id | max fan-out | tokens/id |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        if r["scheme"] == "dense":
            continue
        lines.append(
            f"| {r['scheme']} | {r['ids']:,} | {r['single_ms']:.1f} | {r['batched_ms']:.2f} | "
            f"{r['train_step_ms']:.1f} | {r['train_example_ms']:.2f} | {r['id_rows']:,} | "
            f"{r['bytes_per_id']:.0f} | {r['max_fanout']:,} | {r['depth']} |"
        )
    lines += ["", f"Dense retrieval over N random unit vectors (dim {EMBED_DIM}), top-{K}:", ""]
    lines += ["| ids | torch single ms | torch batched ms/query | FAISS flat single ms | "
              "FAISS flat batched ms/query |", "|---|---|---|---|---|"]  # fmt: skip
    nan = float("nan")
    for r in result["rows"]:
        if r["scheme"] == "dense":
            lines.append(
                f"| {r['ids']:,} | {r.get('dense_single_ms', nan):.2f} | "
                f"{r.get('dense_batched_ms', nan):.3f} | {r.get('faiss_single_ms', nan):.2f} | "
                f"{r.get('faiss_batched_ms', nan):.3f} |"
            )
    ratios = ratio_table(result)
    lines += ["", "Cost at each size over the cost at the smallest, same run:", ""]
    lines += ["| scheme | ids | single | batched | train step |", "|---|---|---|---|---|"]
    for r in ratios:
        lines.append(
            f"| {r['scheme']} | {r['ids']:,} | {r['single']:.2f} | {r['batched']:.2f} | "
            f"{r['train']:.2f} |"
        )
    mine = [r for r in ratios if r["scheme"] == scheme]
    if len(mine) > 1:
        top = mine[-1]
        query_ok = max(top["single"], top["batched"]) <= FLAT_QUERY_RATIO
        train_ok = top["train"] <= FLAT_TRAIN_RATIO
        lines += [
            "",
            f"Targets, {scheme} at {top['ids']:,} over {mine[0]['ids']:,} ids: query "
            f"single {top['single']:.2f}, batched {top['batched']:.2f} (<= {FLAT_QUERY_RATIO}: "
            f"{'met' if query_ok else 'MISSED'}); training step {top['train']:.2f} "
            f"(<= {FLAT_TRAIN_RATIO}: {'met' if train_ok else 'MISSED'}).",
        ]
    return "\n".join(lines) + "\n"


def log_to_mlflow(result: dict[str, Any], tracking_uri: str | None) -> str:
    """One MLflow run: the settings as params, each scheme's costs as metrics stepped by ids.

    Args:
        result (`dict`): What ``run_scheme_cost`` returns.
        tracking_uri (`str`, *optional*): Where to log; ``None``: MLflow's configured URI.

    Returns:
        `str`: The run's id.
    """
    import mlflow

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("grace-bench")
    with mlflow.start_run(run_name="scheme-cost") as run:
        mlflow.log_params({k: str(v) for k, v in result["config"].items()})
        for r in result["rows"]:
            metrics = {f"{r['scheme']}_{k}": float(v) for k, v in r.items()
                       if k.endswith("_ms") and np.isfinite(v)}  # fmt: skip
            mlflow.log_metrics(metrics, step=int(r["ids"]))
        return run.info.run_id
