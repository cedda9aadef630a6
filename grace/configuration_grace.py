"""Settings of a GRACE training run: backbone, tasks, optimisation, budget, checkpoints.

Plain dataclasses so a run's settings are logged as parameters and saved beside the model as is.
Defaults are for the tiny offline backbone on 2 CPU cores; the paper's GPU settings are noted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from typing import Any, get_type_hints

TINY_BACKBONE = "tiny"
LITE_BACKBONE = "lite"
PSEUDO_QUERY_SOURCES = ("auto", "nearest", "caption", "off")


@dataclass
class TinyBackboneConfig:
    """The offline default: an Idefics3 (SmolVLM architecture) from a config, random init.

    Idefics3's pixel shuffle cuts image tokens by ``scale_factor**2``: 64 px, patch 8 gives
    64 patches and 16 image tokens.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 256
    text_layers: int = 4
    heads: int = 4
    scale_factor: int = 2
    vocab_size: int = 2000

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


@dataclass
class LiteBackboneConfig:
    """The default: frozen pre-trained encoders (EfficientNet-Lite0 images, MiniLM sentences),
    MLP projectors and a small Llama decoder from random init (``grace.modeling_grace_lite``).

    One pooled image token at 128 px memorized 1000 images in a minute in the prototype; more
    cells (``image_grid`` 2 or 4) keep where things are in the picture at a higher cost.
    """

    image_size: int = 128
    image_grid: int = 1
    hidden: int = 256
    intermediate: int | None = None  # None: 2 x hidden
    layers: int = 2
    heads: int = 4
    vocab_size: int = 2000
    alignment_weight: float = 1.0  # query-image InfoNCE beside learning to retrieve
    # retrieve examples also learn the alignment's ranking of every image as soft id targets
    # (grace.alignment_distillation; numeric ids gained most: BENCHMARKS.md); 0: off
    distill_weight: float = 0.3
    text_encoder: str = "all-MiniLM-L6-v2"  # the packaged MiniLM, or a sentence encoder's path
    # the decoder also reads a query's words as tokens (off: only its MiniLM feature, a one-token
    # prompt; 3.5x the training samples/s, and structured ids memorized in 300 s: BENCHMARKS.md)
    query_words: bool = False


@dataclass
class Prompts:
    """Instructions of the four tasks (chat-template user turns; the answer follows)."""

    memorize: str = "Which identifier does this image have?"
    retrieve: str = "Which image shows: {query}"
    describe: str = "Describe image {identifier}."
    caption: str = "Describe this image."


@dataclass
class TrainConfig:
    """One run of learning to memorize + learning to retrieve.

    Paper settings on GPUs: lr 1e-4, 500 warm-up steps, weight decay 0.1, clipping 1.0, bf16,
    5 epochs, ZeRO-3. The defaults below are what the lite backbone needs on a CPU.
    """

    # "lite" (frozen encoders + small decoder), "tiny" (an Idefics3 from scratch), a local path
    # or a hub id (AutoModelForImageTextToText)
    backbone: str = LITE_BACKBONE
    lite: LiteBackboneConfig = field(default_factory=LiteBackboneConfig)
    tiny: TinyBackboneConfig = field(default_factory=TinyBackboneConfig)
    prompts: Prompts = field(default_factory=Prompts)
    # tasks: memorize (image -> id) is always on. A memorize-only run (retrieve_task False) is
    # the paper's first step; a run from its checkpoint with both on is the second.
    retrieve_task: bool = True  # query -> id
    describe_task: bool = True  # id -> caption: the "beyond retrieval" ability
    caption_task: bool = True  # image -> caption: what "caption" pseudo-queries are made with
    # pseudo-queries (grace.pseudo_queries): images without train captions get queries for
    # learning to retrieve. "nearest": train captions the model's query-image alignment puts
    # next to the image (lite); "caption": the model's own caption (needs caption_task);
    # "auto": nearest where the backbone aligns, else off; "off". An incremental update's come
    # from the captions it trains on (the new images' and the replayed ones').
    pseudo_queries: str = "auto"
    # made at the first epoch start where this share of the epochs, or of max_seconds, is done
    # (late enough for the alignment or the captions to be good)
    pseudo_query_at: float = 0.7
    pseudo_queries_per_image: int = 10  # nearest captions per image ("caption" makes one)
    # alignment distillation (lite backbones with distill_weight): a retrieve batch's teacher
    # ranks its own images plus a random sample of the rest, this many in all, so a step's cost
    # stays bounded as the catalog grows (the demo set's 1000 images fit whole)
    distill_gallery_size: int = 4096
    # task mix per epoch
    memorize_repeats: int = 1  # each image's memorize example appears this many times
    side_task_captions: int | None = None  # captions per image for describe/caption (None: all)
    # optimisation
    epochs: int = 40
    batch_size: int = 64
    # what both built-in backbones want: at 3e-3 the lite decoder memorized numeric ids only
    # once the cosine had annealed (0.795 in 300 s against 0.997 at 1e-3; BENCHMARKS.md, runs 46-49)
    lr: float = 1e-3
    warmup_steps: int = 50
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    bf16: bool = False
    seed: int = 0
    max_seconds: float | None = None  # stop early (and save) when the budget is spent
    num_threads: int | None = None
    deepspeed: str | None = None  # path of a DeepSpeed JSON config (ZeRO-2/3)
    # data-parallel processes on this machine, one per GPU (needs ``deepspeed``); batch_size is
    # the global batch, split between them. 1: train in this process.
    processes: int = 1
    # train only the input and output embedding rows from this token index on (the atomic ids an
    # incremental update added), every other weight frozen: the old images' scores cannot move
    train_rows_from: int | None = None
    # checkpoints
    checkpoint_every: int = 200  # optimizer steps; 0 disables intermediate checkpoints
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
    """Whole floats given for int fields become ints: settings that crossed JSON/protobuf
    (a KFP dict parameter is a protobuf Struct, whose numbers are all doubles) lose the type."""
    hints = get_type_hints(cls)
    out = dict(d)
    for k, v in d.items():
        ints = hints.get(k) in (int, int | None)
        if ints and isinstance(v, float) and v.is_integer():
            out[k] = int(v)
    return out
