"""Incremental re-memorization: teach a trained model the images added since it was trained.

Retraining from scratch each time images arrive costs as much as the first training; here the
model continues from its own weights on the new images plus a replayed sample of old ones (so
it does not forget them), with its identifier map extended (existing ids never change) and the
ids of removed images retired (the trie no longer has them, so they are never returned again).
A removal alone needs no training: the same weights are saved with the smaller map.

Evaluation is split into old images (those the base model already had) and new ones, with the
same :func:`grace.evaluation.evaluate`, so the registry gate can ask both questions: are the new
images memorized and retrievable, and did old-image recall drop by no more than a tolerance.
Forgetting is measured apples to apples: candidate and base answer the old queries from the same
gallery, the old images; the old queries against the grown gallery are reported beside it, since
new images that fit an old caption push old answers out of the top K even without forgetting.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from grace.configuration_grace import TrainConfig
from grace.errors import GraceError
from grace.identifiers import IdentifierMap
from grace.modeling_grace import GraceModel
from grace.records import ImageRecord
from grace.training_grace import MetricsCallback

# old images in the old gallery (what the gate compares with the base), in the whole gallery
OLD, OLD_WHOLE, NEW, BASE_OLD = "old_", "old_whole_gallery_", "new_", "base_old_"
SPLIT_METRICS = ("grace_R@1", "grace_R@5", "grace_R@10", "memorization", "queries", "images")


# schemes whose every identifier is one token of its own: only their new rows can train alone
OWN_TOKEN_SCHEMES = ("atomic",)
# training settings of an update that trains only the new rows (ReplayConfig.rows_training):
# a fresh row needs far larger steps than fine-tuning every weight does, and four memorize
# examples of each new image an epoch (the cached old answers weighing four too) take new-image
# memorization from 0.93-1.00 to 0.99-1.00 over three increments for ~10 % more CPU
# (BENCHMARKS.md)
ROWS_TRAINING = {"lr": 1e-2, "epochs": 10, "warmup_steps": 10, "memorize_repeats": 4}


@dataclass(frozen=True)
class ReplayConfig:
    """Which weights an update trains, and how many old images it trains again beside the new.

    ``None`` fields are chosen for the base's identifiers by :meth:`resolve` (the best measured
    setting, ``BENCHMARKS.md``): ``only_new_ids`` on for ids that are tokens of their own
    (atomic), off otherwise; ``ratio`` 0 when every old image is a cached negative (replay then
    adds cost and nothing else), else 1. ``ratio`` old images per new image, at least
    ``minimum`` (capped by how many there are).
    """

    ratio: float | None = None
    minimum: int = 8
    seed: int = 0
    # train only the new identifiers' embedding rows, the rest of the model frozen, so the old
    # images' scores stay exactly as they were (replayed images serve as negatives)
    only_new_ids: bool | None = None
    # with only_new_ids: every old image that is not replayed is a negative too, from hidden
    # states the frozen model computes once (grace.cached_negatives), so no new id takes an
    # old image's memorize or retrieve answer; False: only the replayed sample
    all_old_negatives: bool = True
    # with only_new_ids: TrainConfig fields that replace the update's training settings (the
    # pipeline's are for training every weight); {} trains the rows with the settings as given
    rows_training: dict[str, Any] = field(default_factory=lambda: dict(ROWS_TRAINING))

    def __post_init__(self) -> None:
        if (self.ratio is not None and self.ratio < 0) or self.minimum < 0:
            raise ValueError("replay ratio and minimum must be >= 0")

    def resolve(self, scheme: str) -> ReplayConfig:
        """These settings for a base whose identifiers are of ``scheme``, no field left None."""
        only_new = scheme in OWN_TOKEN_SCHEMES if self.only_new_ids is None else self.only_new_ids
        ratio = self.ratio
        if ratio is None:
            ratio = 0.0 if only_new and self.all_old_negatives else 1.0
        return replace(self, ratio=ratio, only_new_ids=bool(only_new))


@dataclass
class UpdatePlan:
    """What changed between the base model's images and the set now, by image key.

    ``refreshed``: kept images whose captions or split changed (trained again, same ids).
    ``replay``: the old images sampled for replay (filled by :func:`training_set`).
    """

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refreshed: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    replay: list[str] = field(default_factory=list)

    @property
    def needs_training(self) -> bool:
        return bool(self.added or self.refreshed)

    @property
    def changes(self) -> int:
        return len(self.added) + len(self.removed) + len(self.refreshed)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> UpdatePlan:
        return cls(**{k: list(d.get(k, [])) for k in cls.__dataclass_fields__})

    def summary(self) -> dict[str, int]:
        return {k: len(v) for k, v in self.to_dict().items()}


def plan_update(base: GraceModel, records: Sequence[ImageRecord]) -> UpdatePlan:
    """Compare the base model's images (its id map and manifest) with the set ``records``."""
    now = {r.key: r for r in records}
    before = {r.key: r for r in base.records}
    live = base.id_map.ids
    kept = [k for k in now if k in live]
    refreshed = [
        k
        for k in kept
        if k in before
        and (before[k].captions != now[k].captions or before[k].split != now[k].split)
    ]
    return UpdatePlan(
        added=[k for k in now if k not in live],
        removed=[k for k in live if k not in now],
        refreshed=refreshed,
        kept=kept,
    )


def update_identifiers(
    id_map: IdentifierMap,
    plan: UpdatePlan,
    records: Sequence[ImageRecord],
    *,
    embedder: Any = None,
    root: str | os.PathLike | None = None,
) -> IdentifierMap:
    """Retire the removed images' ids, then give the added images new ones; old ids stay."""
    out = id_map.remove(plan.removed) if plan.removed else id_map
    added = set(plan.added)
    fresh = [r for r in records if r.key in added]
    if fresh:
        out = out.extend(fresh, embedder=embedder, root=root)
    return out


def training_set(
    records: Sequence[ImageRecord], plan: UpdatePlan, replay: ReplayConfig
) -> list[ImageRecord]:
    """New and refreshed images, plus a seeded sample of the other old images (``plan.replay``);
    ``replay`` resolved (:meth:`ReplayConfig.resolve`)."""
    if replay.ratio is None:
        raise ValueError("resolve the replay settings for the base's identifier scheme first")
    focus = set(plan.added) | set(plan.refreshed)
    old = [r for r in records if r.key not in focus and r.key in set(plan.kept)]
    # int(): settings that crossed KFP (a protobuf Struct) arrive as floats
    want = max(round(replay.ratio * len(focus)), int(replay.minimum)) if focus else 0
    sample = random.Random(replay.seed).sample(old, min(want, len(old)))
    plan.replay = [r.key for r in sample]
    chosen = focus | set(plan.replay)
    return [r for r in records if r.key in chosen]


def continue_training(
    base_dir: str | os.PathLike,
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    id_map: IdentifierMap,
    plan: UpdatePlan,
    out_model: str | os.PathLike,
    config: TrainConfig,
    replay: ReplayConfig = ReplayConfig(),
    callback: MetricsCallback | None = None,
    progress: bool = False,
) -> GraceModel:
    """Train the saved model at ``base_dir`` further on the plan's training set; save the result
    with the whole set (``records``) and ``id_map`` to ``out_model``.

    With nothing new to learn (removals only), the base weights are saved as they are: the
    smaller map alone keeps retired images out of every answer.
    """
    from grace.training_grace import train

    live = [r for r in records if r.key in id_map.ids]
    replay = replay.resolve(id_map.scheme)
    if not plan.needs_training:
        base = GraceModel.load(base_dir)
        info = {**base.info, "steps": 0, "complete": True, "incremental": plan.summary(),
                "replay": asdict(replay)}  # fmt: skip
        gm = GraceModel(base.model, base.processor, id_map, live, base.prompts, info)
        gm.save(out_model)
        return gm
    subset = training_set(live, plan, replay)
    cfg = replace(config, backbone=os.fspath(base_dir), prompts=_prompts_of(base_dir))
    if replay.only_new_ids:
        if not id_map.new_tokens():
            raise GraceError(
                f"only_new_ids trains the new identifiers' own token rows, and {id_map.scheme!r} "
                "identifiers have none: use atomic ids, or only_new_ids=false"
            )
        rows = {**replay.rows_training, "train_rows_from": _vocabulary_size(base_dir)}
        cfg = TrainConfig.from_dict({**cfg.to_dict(), **rows})
    negatives: list[ImageRecord] = []
    if replay.only_new_ids and replay.all_old_negatives:
        trained_on, kept = {r.key for r in subset}, set(plan.kept)
        negatives = [r for r in live if r.key in kept and r.key not in trained_on]
    out_model = Path(out_model)
    out_model.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_model.parent, prefix=".incremental-") as scratch:
        trained = train(subset, root, id_map, scratch, cfg, callback, progress=progress,
                        negatives=negatives)  # fmt: skip
    info = {**trained.info, "incremental": plan.summary(), "base": os.fspath(base_dir),
            "replay": asdict(replay)}  # fmt: skip
    gm = GraceModel(trained.model, trained.processor, id_map, live, trained.prompts, info)
    gm.save(out_model)
    return gm


def _vocabulary_size(base_dir: str | os.PathLike) -> int:
    """Tokens of the base model's tokenizer: tokens an update adds get the ids after them (and
    their embedding rows, whether the table grows or had spare padded rows)."""
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(os.fspath(base_dir), local_files_only=True))


def _prompts_of(base_dir: str | os.PathLike):
    """The prompts the base model was trained with (a continued run must ask the same way)."""
    import json

    from grace.configuration_grace import Prompts
    from grace.modeling_grace import GRACE_FILE

    meta = json.loads((Path(base_dir) / GRACE_FILE).read_text())
    return Prompts(**meta["prompts"])


def evaluate_old_new(
    candidate: GraceModel,
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    plan: UpdatePlan,
    *,
    base: GraceModel | None = None,
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
    from grace.evaluation import evaluate

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


def _within(gm: GraceModel, keys: set[str]) -> GraceModel:
    """``gm`` answering from the images ``keys`` only: its other ids left out of the trie (as
    ``evaluate(gallery="test")`` does), the weights shared."""
    others = [k for k in gm.id_map.ids if k not in keys]
    if not others:
        return gm
    return GraceModel(gm.model, gm.processor, gm.id_map.remove(others), gm.records, gm.prompts)


def _whole_set(m: dict[str, float]) -> dict[str, float]:
    """The whole set's metrics from the old and new parts in the whole gallery (recall weighted
    by queries, memorization by images), under the names the plain gate and reports use."""
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
