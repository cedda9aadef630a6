"""Incremental re-memorization: teach a trained model the images added since it was trained.

The model continues from its own weights on the new images plus a replayed sample of old ones,
with its identifier map extended (existing ids never change) and the ids of removed images
retired (gone from the trie, never returned again). A removal alone needs no training: the same
weights are saved with the smaller map. Design: docs/incremental.md; evaluation of old vs new
images: :mod:`grace.evaluation.incremental`.
"""

from __future__ import annotations

import os
import random
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.identifiers import IdentifierMap
from grace.retrieval.retriever import GraceRetriever
from grace.training.config import TrainConfig
from grace.training.distributed import MetricsCallback

# schemes whose every identifier is one token of its own: only their new rows can train alone
OWN_TOKEN_SCHEMES = ("atomic",)


# training settings of an update that trains only the new rows (ReplayConfig.rows_training):
# a fresh row needs far larger steps than fine-tuning every weight does, and four memorize
# examples of each new image an epoch (the cached old answers weighing four too) make new-image
# memorization reliable for little more CPU (docs/experiments.md#incremental-rows-training)
ROWS_TRAINING = {"lr": 1e-2, "epochs": 10, "warmup_steps": 10, "memorize_repeats": 4}


@dataclass(frozen=True)
class ReplayConfig:
    """Which weights an update trains, and how many old images it trains again beside the new.

    ``None`` fields are chosen for the base's identifiers by :meth:`resolve`, the best measured
    setting (BENCHMARKS.md).

    Args:
        ratio (`float`, *optional*):
            Old images replayed per new image, at least ``minimum`` (capped by how many there
            are). `None`: 0 when every old image is a cached negative (replay then adds cost and
            nothing else), else 1.
        minimum (`int`, *optional*, defaults to `8`):
            Fewest old images replayed.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the replay sample.
        only_new_ids (`bool`, *optional*):
            Train only the new identifiers' embedding rows, the rest of the model frozen, so the
            old images' scores stay exactly as they were (replayed images serve as negatives).
            `None`: on for ids that are tokens of their own (atomic), off otherwise.
        all_old_negatives (`bool`, *optional*, defaults to `True`):
            With ``only_new_ids``: every old image that is not replayed is a negative too, from
            hidden states the frozen model computes once (:mod:`grace.training.cached_negatives`),
            so no new id takes an old image's memorize or retrieve answer; False: only the
            replayed sample.
        rows_training (`dict[str, Any]`, *optional*, defaults to `ROWS_TRAINING`):
            With ``only_new_ids``: TrainConfig fields that replace the update's training settings
            (the pipeline's are for training every weight); ``{}`` trains the rows with the
            settings as given.
    """

    ratio: float | None = None
    minimum: int = 8
    seed: int = 0
    only_new_ids: bool | None = None
    all_old_negatives: bool = True
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


def plan_update(base: GraceRetriever, records: Sequence[ImageRecord]) -> UpdatePlan:
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
    """New and refreshed images, plus a seeded sample of the other old images (``plan.replay``).

    ``replay`` must be resolved (:meth:`ReplayConfig.resolve`).
    """
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
) -> GraceRetriever:
    """Train the saved model at ``base_dir`` further on the plan's training set, and save it.

    The result is saved with the whole set (``records``) and ``id_map`` to ``out_model``. With
    nothing new to learn (removals only), the base weights are saved as they are: the smaller map
    alone keeps retired images out of every answer.

    Args:
        base_dir: The saved base model.
        records: The whole image set now.
        root: The image set's folder.
        id_map: The updated identifiers (:func:`update_identifiers`).
        plan: What changed (:func:`plan_update`); its ``replay`` is filled here.
        out_model: Where the updated model goes.
        config: Training settings (the backbone and prompts are the base's).
        replay: Replay settings, resolved here for ``id_map``'s scheme.
        callback: Called with ``(step, metrics)`` after each logged step.
        progress: Show a progress bar.

    Returns:
        The updated retriever, as saved under ``out_model``.
    """
    from grace.training import train

    live = [r for r in records if r.key in id_map.ids]
    replay = replay.resolve(id_map.scheme)
    if not plan.needs_training:
        base = GraceRetriever.load(base_dir)
        info = {
            **base.info,
            "steps": 0,
            "complete": True,
            "incremental": plan.summary(),
            "replay": asdict(replay),
        }
        gm = GraceRetriever(base.model, base.processor, id_map, live, base.prompts, info)
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
        trained = train(
            subset, root, id_map, scratch, cfg, callback, progress=progress, negatives=negatives
        )
    info = {
        **trained.info,
        "incremental": plan.summary(),
        "base": os.fspath(base_dir),
        "replay": asdict(replay),
    }
    gm = GraceRetriever(trained.model, trained.processor, id_map, live, trained.prompts, info)
    gm.save(out_model)
    return gm


def _vocabulary_size(base_dir: str | os.PathLike) -> int:
    """Tokens of the base model's tokenizer.

    Tokens an update adds get the ids after them (and their embedding rows, whether the table
    grows or had spare padded rows).
    """
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(os.fspath(base_dir), local_files_only=True))


def _prompts_of(base_dir: str | os.PathLike):
    """The prompts the base model was trained with (a continued run must ask the same way)."""
    import json

    from grace.models.prompts import Prompts
    from grace.retrieval.retriever import GRACE_FILE

    meta = json.loads((Path(base_dir) / GRACE_FILE).read_text())
    return Prompts(**meta["prompts"])
