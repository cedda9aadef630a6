"""How big the built-in backbones are built: the backbone groups of a training run's settings.

Plain dataclasses with no heavy imports, so that :class:`~grace.training.config.TrainConfig`
(which nests them) loads without torch or transformers.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class TinyBackboneConfig:
    """The offline test backbone: an Idefics3 (SmolVLM architecture) from a config, random init.

    Idefics3's pixel shuffle cuts image tokens by ``scale_factor**2``: 64 px, patch 8 gives
    64 patches and 16 image tokens.

    Args:
        image_size (`int`, *optional*, defaults to `64`):
            Side in pixels of the images the vision tower reads.
        patch_size (`int`, *optional*, defaults to `8`):
            Side in pixels of one vision patch.
        vision_hidden (`int`, *optional*, defaults to `128`):
            Width of the vision tower (its MLP is twice as wide).
        vision_layers (`int`, *optional*, defaults to `2`):
            Layers of the vision tower.
        text_hidden (`int`, *optional*, defaults to `256`):
            Width of the Llama decoder.
        text_layers (`int`, *optional*, defaults to `4`):
            Layers of the Llama decoder.
        heads (`int`, *optional*, defaults to `4`):
            Attention heads, in both the vision tower and the decoder.
        scale_factor (`int`, *optional*, defaults to `2`):
            Pixel-shuffle factor: image tokens = patches / ``scale_factor**2``.
        vocab_size (`int`, *optional*, defaults to `2000`):
            Size of the BPE vocabulary trained on the run's texts.
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
    """The default backbone: frozen pre-trained encoders, MLP projectors, a small Llama decoder.

    EfficientNet-Lite0 reads images and MiniLM sentences, both frozen; the projectors and the
    decoder start from random init (:mod:`grace.models.lite.modeling_lite`).

    Args:
        image_size (`int`, *optional*, defaults to `128`):
            Side in pixels images are resized to before the image encoder.
        image_grid (`int`, *optional*, defaults to `1`):
            Image tokens per side: one pooled token is the fastest to memorize; more cells (2 or
            4) keep where things are in the picture at a higher cost.
        hidden (`int`, *optional*, defaults to `256`):
            Width of the decoder.
        intermediate (`int`, *optional*):
            Width of the decoder's MLP; `None`: 2 x ``hidden``.
        layers (`int`, *optional*, defaults to `2`):
            Decoder layers.
        heads (`int`, *optional*, defaults to `4`):
            Attention heads per decoder layer.
        vocab_size (`int`, *optional*, defaults to `2000`):
            Size of the BPE vocabulary trained on the run's texts (identifier tokens come on top).
        alignment_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the query-image InfoNCE beside learning to retrieve.
        distill_weight (`float`, *optional*, defaults to `0.3`):
            Weight of the soft id targets retrieve examples learn from the alignment's ranking of
            every image (:mod:`grace.models.lite.losses`); numeric ids gain most
            (docs/experiments.md#alignment-distillation). 0: off.
        text_encoder (`str`, *optional*, defaults to `"all-MiniLM-L6-v2"`):
            The packaged MiniLM, or a sentence encoder's path.
        query_words (`bool`, *optional*, defaults to `False`):
            The decoder also reads a query's words as tokens; off, a query prompt is one token
            (its MiniLM feature), which trains much faster and memorized structured ids where
            word tokens did not (docs/experiments.md#query-words-off).
    """

    image_size: int = 128
    image_grid: int = 1
    hidden: int = 256
    intermediate: int | None = None
    layers: int = 2
    heads: int = 4
    vocab_size: int = 2000
    alignment_weight: float = 1.0
    distill_weight: float = 0.3
    text_encoder: str = "all-MiniLM-L6-v2"
    query_words: bool = False
