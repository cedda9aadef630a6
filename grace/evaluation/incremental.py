"""Evaluation of an incremental update: old and new images scored apart, beside the base model.

What the incremental gate reads (:class:`~grace.workflow.model_registry.IncrementalGate`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.retrieval.retriever import GraceRetriever

if TYPE_CHECKING:
    from grace.training.incremental import UpdatePlan

# old images in the old gallery (what the gate compares with the base), in the whole gallery
OLD, OLD_WHOLE, NEW, BASE_OLD = "old_", "old_whole_gallery_", "new_", "base_old_"

SPLIT_METRICS = ("grace_R@1", "grace_R@5", "grace_R@10", "memorization", "queries", "images")


def evaluate_old_new(
    candidate: GraceRetriever,
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    plan: UpdatePlan,
    *,
    base: GraceRetriever | None = None,
    num_beams: int = 10,
    max_queries: int | None = None,
) -> dict[str, float]:
    """Recall@K and memorization of the old and of the new images, side by side.

    Keys (``*`` is ``grace_R@1/5/10``, ``memorization``, ``queries``, ``images``):

    - ``old_*``: the candidate on the old images (``plan.kept``) with the old images as its
      gallery; ``base_old_*``: the base the same way. The same queries against the same
      gallery, so ``old_*_change`` (candidate minus base) is forgetting alone: what the
      incremental gate reads.
    - ``old_whole_gallery_*``: the candidate's old queries against every live image, as a user
      searches; its ``_change`` against ``base_old_*`` adds the new images' crowding of the old
      queries' top K (a full retrain shows that too).
    - ``new_*``: the new images, gallery = every live image.
    - ``grace_R@K``, ``memorization``, ...: the whole set, weighted from the two whole-gallery
      parts (old and new).
    """
    from grace.evaluation.metrics import evaluate

    kept, added = set(plan.kept), set(plan.added)
    old = [r for r in records if r.key in kept]
    new = [r for r in records if r.key in added]
    metrics: dict[str, float] = {}
    parts = [
        (OLD, old, _within(candidate, kept)),
        (OLD_WHOLE, old, candidate),
        (NEW, new, candidate),
        (BASE_OLD, old, _within(base, kept) if base else None),
    ]
    for prefix, subset, model in parts:
        if model is None or not subset:
            continue
        got = evaluate(model, subset, root, num_beams=num_beams, max_queries=max_queries).metrics
        metrics.update({prefix + k: v for k, v in got.items() if k in SPLIT_METRICS})
        if prefix in (OLD_WHOLE, NEW):
            metrics[prefix + "latency_ms_per_query"] = got["latency_ms_per_query"]
    metrics.update(_whole_set(metrics))
    for prefix in (OLD, OLD_WHOLE):
        for k in ("grace_R@1", "grace_R@5", "grace_R@10", "memorization"):
            if prefix + k in metrics and BASE_OLD + k in metrics:
                metrics[f"{prefix}{k}_change"] = metrics[prefix + k] - metrics[BASE_OLD + k]
    return metrics


def _within(gm: GraceRetriever, keys: set[str]) -> GraceRetriever:
    """``gm`` answering from the images ``keys`` only, the weights shared.

    Its other ids are left out of the trie, as ``evaluate(gallery="test")`` does.
    """
    others = [k for k in gm.id_map.ids if k not in keys]
    if not others:
        return gm
    return GraceRetriever(gm.model, gm.processor, gm.id_map.remove(others), gm.records, gm.prompts)


def _whole_set(m: dict[str, float]) -> dict[str, float]:
    """The whole set's metrics from the old and new parts in the whole gallery.

    Recall is weighted by queries, memorization by images; the names are those the plain gate
    and the reports use.
    """
    parts = [p for p in (OLD_WHOLE, NEW) if p + "images" in m]
    if not parts:
        raise GraceError("nothing to evaluate: the set has no image with a live identifier")
    out = {
        "queries": sum(m[p + "queries"] for p in parts),
        "images": sum(m[p + "images"] for p in parts),
    }
    q = out["queries"]
    for k in ("grace_R@1", "grace_R@5", "grace_R@10", "latency_ms_per_query"):
        out[k] = sum(m[p + k] * m[p + "queries"] for p in parts) / q if q else 0.0
    out["memorization"] = sum(m[p + "memorization"] * m[p + "images"] for p in parts) / max(
        out["images"], 1
    )
    return out
