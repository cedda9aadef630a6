"""Settings of the small image-text dual encoder (architecture, vocabulary, training budget).

A plain dataclass, so it round-trips through the JSON saved beside the weights and can be logged
as run parameters as is. The defaults were picked on the 1000-image demo set with a 60 s budget
on 2 CPU cores (``bench/bench_dual_encoder.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

TEXT_ENCODERS = ("gru", "transformer")


@dataclass
class DualEncoderConfig:
    """Architecture and training settings of :class:`grace.modeling_dual_encoder.DualEncoder`."""

    # image tower: RGB resized to image_size, one conv block (two 3x3 convs + 2x2 pool) per width
    image_size: int = 32
    widths: tuple[int, ...] = (32, 64, 128)
    # text tower: word embeddings + an order-aware encoder ("gru" or "transformer")
    text_encoder: str = "gru"
    word_dim: int = 128
    text_width: int = 128
    text_layers: int = 1
    text_heads: int = 4
    max_words: int = 32
    min_word_count: int = 1
    # shared space
    embed_dim: int = 128
    temperature: float = 0.07  # initial; the logit scale 1/temperature is learned
    max_logit_scale: float = 100.0
    # training
    steps: int = 3000  # upper bound on optimizer steps; max_seconds usually ends training first
    max_seconds: float | None = 60.0
    batch_size: int = 256
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 20
    shift_pixels: int = 1  # random translation of training images (small: positions are words)
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads while training (None: leave as is)

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
