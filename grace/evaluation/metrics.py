"""Evaluation: text->image Recall@K on held-out queries, memorization accuracy, latency.

The dense baseline is scored in the same harness, so every report shows GRACE beside it.

Queries are the captions of test-split images (never trained on). The gallery is every
memorized image, or only the test split as in the paper's Flickr30K/COCO protocol.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.identifiers.base import ImageEmbedder
from grace.models.embedders import dense_rank
from grace.retrieval.retriever import GraceRetriever

KS = (1, 5, 10)


GALLERIES = ("all", "test")


def recall_at_k(
    ranked: Sequence[Sequence[str]], gold: Sequence[str], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Share of queries whose gold image is among the first K of its ranking."""
    if len(ranked) != len(gold):
        raise ValueError(f"{len(ranked)} rankings for {len(gold)} queries")
    if not gold:
        return {f"R@{k}": 0.0 for k in ks}
    return {
        f"R@{k}": float(np.mean([g in list(r)[:k] for r, g in zip(ranked, gold, strict=True)]))
        for k in ks
    }


@dataclass
class EvalResult:
    """The metrics of one evaluation, and the rankings they were computed from.

    Args:
        metrics (`dict[str, float]`):
            Recall (``grace_R@K``, ``dense_R@K``), memorization, latency and counts, by name.
        queries (`list[str]`, *optional*):
            The held-out queries, in order.
        gold (`list[str]`, *optional*):
            Each query's gold image key.
        grace_ranked (`list[list[str]]`, *optional*):
            GRACE's ranked image keys per query.
        dense_ranked (`list[list[str]]`, *optional*):
            The dense baseline's ranked image keys per query; `None`: no baseline was run.
    """

    metrics: dict[str, float]
    queries: list[str] = field(default_factory=list)
    gold: list[str] = field(default_factory=list)
    grace_ranked: list[list[str]] = field(default_factory=list)
    dense_ranked: list[list[str]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "queries": len(self.queries)}


def held_out_queries(records: Sequence[ImageRecord]) -> tuple[list[str], list[str]]:
    """(query, gold image key) for every caption of a test-split image."""
    pairs = [(c, r.key) for r in records if r.split == "test" for c in r.captions]
    return [q for q, _ in pairs], [k for _, k in pairs]


def check_gallery(gallery: str) -> None:
    """Refuse an unknown gallery before any expensive work (a baseline trains for a minute)."""
    if gallery not in GALLERIES:
        raise GraceError(f"gallery must be one of {GALLERIES}, got {gallery!r}")


def evaluate(
    gm: GraceRetriever,
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    *,
    gallery: str = "all",
    ks: Sequence[int] = KS,
    num_beams: int = 10,
    batch_size: int = 16,
    dense: ImageEmbedder | None = None,
    max_queries: int | None = None,
) -> EvalResult:
    """Score ``gm`` (and the ``dense`` baseline when given) on the set's held-out queries."""
    check_gallery(gallery)
    root = Path(root)
    live = [r for r in records if r.key in gm.id_map.ids]
    if gallery == "test":
        others = [r.key for r in live if r.split != "test"]
        gm = GraceRetriever(gm.model, gm.processor, gm.id_map.remove(others), live, gm.prompts)
        live = [r for r in live if r.split == "test"]
    queries, gold = held_out_queries(live)
    if max_queries is not None:
        queries, gold = queries[:max_queries], gold[:max_queries]
    k = max(ks)
    metrics: dict[str, float] = {"queries": float(len(queries)), "images": float(len(live))}

    t0 = time.perf_counter()
    hits = gm.retrieve(queries, k=k, num_beams=max(num_beams, k), batch_size=batch_size)
    metrics["latency_ms_per_query"] = 1000 * (time.perf_counter() - t0) / max(len(queries), 1)
    grace_ranked = [[h.key for h in row] for row in hits]
    metrics.update({f"grace_{m}": v for m, v in recall_at_k(grace_ranked, gold, ks).items()})
    metrics["valid_id_rate"] = float(
        np.mean([all(h.key in gm.id_map.ids for h in row) for row in hits]) if hits else 1.0
    )

    for split in sorted({r.split for r in live}):
        members = [r for r in live if r.split == split]
        found = gm.recall_identifiers([_load(root, r) for r in members], batch_size=batch_size)
        correct = [h is not None and h.key == r.key for h, r in zip(found, members, strict=True)]
        metrics[f"memorization_{split}"] = float(np.mean(correct))
    metrics["memorization"] = float(
        np.average(
            [metrics[f"memorization_{s}"] for s in sorted({r.split for r in live})],
            weights=[sum(r.split == s for r in live) for s in sorted({r.split for r in live})],
        )
    )

    dense_ranked = None
    if dense is not None and queries:
        img = dense.embed_images([root / r.path for r in live])
        txt = dense.embed_texts(queries)
        top = dense_rank(txt, img, k)
        dense_ranked = [[live[i].key for i in row] for row in top]
        metrics.update({f"dense_{m}": v for m, v in recall_at_k(dense_ranked, gold, ks).items()})
    return EvalResult(metrics, queries, gold, grace_ranked, dense_ranked)


def _load(root: Path, r: ImageRecord) -> Image.Image:
    with Image.open(root / r.path) as im:
        return im.convert("RGB")
