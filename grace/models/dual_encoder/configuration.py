"""Settings of the small image-text dual encoder (architecture, vocabulary, training budget).

A plain dataclass, so it round-trips through the JSON saved beside the weights and can be logged
as run parameters as is. The defaults were picked on the demo set within the default time budget
(``bench/bench_dual_encoder.py``, BENCHMARKS.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

TEXT_ENCODERS = ("gru", "transformer")


@dataclass
class DualEncoderConfig:
    """Architecture and training settings of the dual encoder (:mod:`.modeling`).

    The image tower resizes RGB images to ``image_size`` and runs one conv block (two 3x3 convs
    + 2x2 pool) per width; the text tower is word embeddings + an order-aware encoder.

    Args:
        image_size (`int`, *optional*, defaults to `32`):
            Side in pixels images are resized to; divisible by ``2**len(widths)``.
        widths (`tuple[int, ...]`, *optional*, defaults to `(32, 64, 128)`):
            Channels of each conv block of the image tower.
        text_encoder (`str`, *optional*, defaults to `"gru"`):
            The text tower's encoder: `"gru"` or `"transformer"`.
        word_dim (`int`, *optional*, defaults to `128`):
            Width of the word embeddings.
        text_width (`int`, *optional*, defaults to `128`):
            Width of the text encoder.
        text_layers (`int`, *optional*, defaults to `1`):
            Layers of the text encoder.
        text_heads (`int`, *optional*, defaults to `4`):
            Attention heads of the transformer text encoder (must divide ``text_width``).
        max_words (`int`, *optional*, defaults to `32`):
            Words of a text kept; the rest are cut.
        min_word_count (`int`, *optional*, defaults to `1`):
            Occurrences in the captions a word needs to enter the vocabulary.
        embed_dim (`int`, *optional*, defaults to `128`):
            Width of the shared, L2-normalised embedding space.
        temperature (`float`, *optional*, defaults to `0.07`):
            Initial temperature; the logit scale 1/temperature is learned.
        max_logit_scale (`float`, *optional*, defaults to `100.0`):
            Upper clamp of the learned logit scale.
        steps (`int`, *optional*, defaults to `3000`):
            Upper bound on optimizer steps; ``max_seconds`` usually ends training first.
        max_seconds (`float`, *optional*, defaults to `60.0`):
            Training budget in seconds; `None`: only ``steps`` ends it.
        batch_size (`int`, *optional*, defaults to `256`):
            Image-caption pairs per step (at least 2: the other pairs are the negatives).
        lr (`float`, *optional*, defaults to `2e-3`):
            Peak learning rate.
        weight_decay (`float`, *optional*, defaults to `0.05`):
            AdamW weight decay.
        warmup_steps (`int`, *optional*, defaults to `20`):
            Optimizer steps of linear warm-up.
        shift_pixels (`int`, *optional*, defaults to `1`):
            Random translation of training images, kept small because positions are words in
            the captions.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the init and the batches.
        num_threads (`int`, *optional*):
            Torch intra-op threads while training; `None`: leave as is.
    """

    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    text_encoder: str = "gru"
    word_dim: int = 128
    text_width: int = 128
    text_layers: int = 1
    text_heads: int = 4
    max_words: int = 32
    min_word_count: int = 1
    embed_dim: int = 128
    temperature: float = 0.07
    max_logit_scale: float = 100.0
    steps: int = 3000
    max_seconds: float | None = 60.0
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    shift_pixels: int = 1
    seed: int = 0
    num_threads: int | None = None

    def __post_init__(self) -> None:
        self.widths = tuple(int(w) for w in self.widths)
        if not self.widths or any(w < 1 for w in self.widths):
            raise ValueError(f"widths must be positive, got {self.widths}")
        if self.image_size % (2 ** len(self.widths)) != 0:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by 2**len(widths) "
                f"= {2 ** len(self.widths)} (one 2x2 pooling per width)"
            )
        if self.text_encoder not in TEXT_ENCODERS:
            raise ValueError(
                f"text_encoder must be one of {TEXT_ENCODERS}, got {self.text_encoder!r}"
            )
        if self.text_encoder == "transformer" and self.text_width % self.text_heads:
            raise ValueError("text_width must be divisible by text_heads")
        if self.temperature <= 0 or self.batch_size < 2 or self.steps < 1:
            raise ValueError("temperature must be > 0, batch_size >= 2 and steps >= 1")

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["widths"] = list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DualEncoderConfig:
        """Build from a saved dict; keys this version does not know are ignored (older readers)."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})
