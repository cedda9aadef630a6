"""Settings of a GRACE training run: backbone, tasks, optimisation, budget, checkpoints.

Plain dataclasses so a run's settings are logged as parameters and saved beside the model as is.
Defaults are for the lite backbone on a CPU; the paper's GPU settings are noted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

from grace.constants import LITE_BACKBONE
from grace.models.prompts import Prompts
from grace.models.settings import LiteBackboneConfig, TinyBackboneConfig

PSEUDO_QUERY_SOURCES = ("auto", "nearest", "caption", "off")


@dataclass
class TrainConfig:
    """One run of learning to memorize + learning to retrieve.

    Paper settings on GPUs: lr 1e-4, 500 warm-up steps, weight decay 0.1, clipping 1.0, bf16,
    5 epochs, ZeRO-3. The defaults below are what the lite backbone needs on a CPU.

    Memorize (image -> id) is always on. A memorize-only run (``retrieve_task`` False) is the
    paper's first step; a run from its checkpoint with both tasks on is the second.

    Args:
        backbone (`str`, *optional*, defaults to `"lite"`):
            `"lite"` (frozen encoders + small decoder), `"tiny"` (an Idefics3 from scratch), a
            local path or a hub id (``AutoModelForImageTextToText``).
        lite (`LiteBackboneConfig`, *optional*):
            Shape of the lite backbone, used when ``backbone`` is `"lite"`.
        tiny (`TinyBackboneConfig`, *optional*):
            Shape of the tiny backbone, used when ``backbone`` is `"tiny"`.
        prompts (`Prompts`, *optional*):
            Instructions of the four tasks.
        retrieve_task (`bool`, *optional*, defaults to `True`):
            Train query -> id.
        describe_task (`bool`, *optional*, defaults to `True`):
            Train id -> caption: the "beyond retrieval" ability.
        caption_task (`bool`, *optional*, defaults to `True`):
            Train image -> caption: what `"caption"` pseudo-queries are made with.
        pseudo_queries (`str`, *optional*, defaults to `"auto"`):
            Where images without train captions get queries for learning to retrieve
            (:mod:`grace.training.pseudo_queries`): `"nearest"`, the train captions the model's
            query-image alignment puts next to the image (lite); `"caption"`, the model's own
            caption (needs ``caption_task``); `"auto"`, nearest where the backbone aligns, else
            off; `"off"`. An incremental update's come from the captions it trains on (the new
            images' and the replayed ones').
        pseudo_query_at (`float`, *optional*, defaults to `0.7`):
            Pseudo-queries are made at the first epoch start where this share of the epochs, or
            of ``max_seconds``, is done: late enough for the alignment or the captions to be good.
        pseudo_queries_per_image (`int`, *optional*, defaults to `10`):
            Nearest captions per image (`"caption"` makes one).
        distill_gallery_size (`int`, *optional*, defaults to `4096`):
            Images a retrieve batch's alignment-distillation teacher ranks (lite backbones with
            ``distill_weight``): its own images plus a random sample of the rest, so a step's
            cost stays bounded as the catalog grows.
        memorize_repeats (`int`, *optional*, defaults to `1`):
            Times each image's memorize example appears per epoch.
        side_task_captions (`int`, *optional*):
            Captions per image for the describe and caption tasks; `None`: all of them.
        epochs (`int`, *optional*, defaults to `40`):
            Passes over the task mix.
        batch_size (`int`, *optional*, defaults to `64`):
            Examples per optimizer step (the global batch when ``processes`` > 1).
        lr (`float`, *optional*, defaults to `1e-3`):
            Peak learning rate, what both built-in backbones want: at 3e-3 the lite decoder
            memorized numeric ids only once the cosine had annealed
            (docs/experiments.md#lite-learning-rate).
        warmup_steps (`int`, *optional*, defaults to `50`):
            Optimizer steps of linear warm-up before the cosine decay.
        weight_decay (`float`, *optional*, defaults to `0.1`):
            AdamW weight decay.
        grad_clip (`float`, *optional*, defaults to `1.0`):
            Maximum gradient norm.
        bf16 (`bool`, *optional*, defaults to `False`):
            Train in bfloat16.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the model's init, the task mix and the sampling.
        max_seconds (`float`, *optional*):
            Time budget: stop early (and save) when it is spent; `None`: no limit.
        num_threads (`int`, *optional*):
            Torch CPU threads while training; `None`: leave torch's setting alone.
        deepspeed (`str`, *optional*):
            Path of a DeepSpeed JSON config (ZeRO-2/3).
        processes (`int`, *optional*, defaults to `1`):
            Data-parallel processes on this machine, one per GPU (needs ``deepspeed``);
            ``batch_size`` is split between them. 1: train in this process.
        train_rows_from (`int`, *optional*):
            Train only the input and output embedding rows from this token index on (the atomic
            ids an incremental update added), every other weight frozen, so the old images'
            scores cannot move; `None`: train everything.
        checkpoint_every (`int`, *optional*, defaults to `200`):
            Optimizer steps between checkpoints; 0 disables intermediate checkpoints.
        keep_checkpoints (`int`, *optional*, defaults to `2`):
            Newest checkpoints kept on disk.
    """

    backbone: str = LITE_BACKBONE
    lite: LiteBackboneConfig = field(default_factory=LiteBackboneConfig)
    tiny: TinyBackboneConfig = field(default_factory=TinyBackboneConfig)
    prompts: Prompts = field(default_factory=Prompts)
    # tasks
    retrieve_task: bool = True
    describe_task: bool = True
    caption_task: bool = True
    # pseudo-queries and alignment distillation
    pseudo_queries: str = "auto"
    pseudo_query_at: float = 0.7
    pseudo_queries_per_image: int = 10
    distill_gallery_size: int = 4096
    # task mix per epoch
    memorize_repeats: int = 1
    side_task_captions: int | None = None
    # optimisation
    epochs: int = 40
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    max_seconds: float | None = None
    num_threads: int | None = None
    deepspeed: str | None = None
    processes: int = 1
    train_rows_from: int | None = None
    # checkpoints
    checkpoint_every: int = 200
    keep_checkpoints: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.lite, dict):
            self.lite = _nested(LiteBackboneConfig, self.lite, "lite")
        if isinstance(self.tiny, dict):
            self.tiny = _nested(TinyBackboneConfig, self.tiny, "tiny")
        if isinstance(self.prompts, dict):
            self.prompts = Prompts(**self.prompts)
        if min(self.epochs, self.batch_size, self.memorize_repeats, self.processes) < 1:
            raise ValueError("epochs, batch_size, memorize_repeats and processes must be >= 1")
        if self.side_task_captions is not None and self.side_task_captions < 1:
            raise ValueError("side_task_captions must be >= 1 (or None for all captions)")
        if self.pseudo_queries not in PSEUDO_QUERY_SOURCES:
            raise ValueError(
                f"pseudo_queries must be one of {PSEUDO_QUERY_SOURCES}, got {self.pseudo_queries!r}"
            )
        if not 0.0 < self.pseudo_query_at < 1.0:
            raise ValueError(f"pseudo_query_at must be in (0, 1), got {self.pseudo_query_at}")
        if self.pseudo_queries_per_image < 1:
            raise ValueError("pseudo_queries_per_image must be >= 1")
        if self.distill_gallery_size < 1:
            raise ValueError("distill_gallery_size must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Settings from a dict; ``"lite.hidden": 128`` style keys set one backbone field."""
        d = dict(d)
        for key in [k for k in d if "." in k]:
            group, name = key.split(".", 1)
            nested = d.get(group) or {}
            d[group] = {**(asdict(nested) if is_dataclass(nested) else nested), name: d.pop(key)}
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}")
        return cls(**_typed(cls, d))


def _nested(cls: type, d: dict[str, Any], group: str) -> Any:
    unknown = set(d) - {f.name for f in fields(cls)}
    if unknown:
        raise ValueError(f"unknown {group} settings {sorted(unknown)}")
    return cls(**_typed(cls, d))


def _typed(cls: type, d: dict[str, Any]) -> dict[str, Any]:
    """Turn whole floats given for int fields back into ints.

    Settings that crossed JSON/protobuf (a KFP dict parameter is a protobuf Struct, whose numbers
    are all doubles) lose the type.
    """
    hints = get_type_hints(cls)
    out = dict(d)
    for k, v in d.items():
        ints = hints.get(k) in (int, int | None)
        if ints and isinstance(v, float) and v.is_integer():
            out[k] = int(v)
    return out
