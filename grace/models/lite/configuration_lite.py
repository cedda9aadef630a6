"""Settings of the ``lite`` backbone: the training-run shape and the saved transformers config.

:class:`LiteBackboneConfig` is the part of a :class:`~grace.training.config.TrainConfig` that
builds a lite model; :class:`GraceLiteConfig` is what a built model saves as ``config.json``.
"""

from __future__ import annotations

from dataclasses import dataclass

from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    PreTrainedConfig,
)
from transformers.configuration_utils import SubConfigSpec

from grace.models.lite.frozen_encoders import IMAGE_FEATURE_DIM, SENTENCE_FEATURE_DIM


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


MODEL_TYPE = "grace_lite"


@strict
class GraceLiteConfig(PreTrainedConfig):
    """The transformers config of a built lite model, saved as its ``config.json``.

    Args:
        text_config (`dict` or `PreTrainedConfig`, *optional*):
            The Llama decoder's config.
        image_feature_dim (`int`, *optional*, defaults to `1280`):
            Width of the frozen image features (EfficientNet-Lite0 channels).
        sentence_feature_dim (`int`, *optional*, defaults to `384`):
            Width of the frozen sentence features (MiniLM).
        image_token_id (`int`, *optional*, defaults to `0`):
            Token id of the ``<image>`` placeholder the projected image features replace.
        sentence_token_id (`int`, *optional*, defaults to `0`):
            Token id of the ``<sentence>`` placeholder the projected sentence feature replaces.
        alignment_weight (`float`, *optional*, defaults to `1.0`):
            Weight of the query-image InfoNCE in the training loss; 0: off.
        alignment_temperature (`float`, *optional*, defaults to `0.05`):
            Temperature of the InfoNCE logits and of the gallery softmax that teaches the
            distillation.
        distill_weight (`float`, *optional*, defaults to `0.0`):
            Weight of the soft id targets from the alignment's ranking
            (:mod:`grace.models.lite.losses`); 0: off, as in models saved before it existed.
        initializer_range (`float`, *optional*, defaults to `0.02`):
            Standard deviation of the random init.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the head shares the input embeddings (it does not).
    """

    model_type = MODEL_TYPE
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    text_config: dict | PreTrainedConfig | None = None
    image_feature_dim: int = IMAGE_FEATURE_DIM
    sentence_feature_dim: int = SENTENCE_FEATURE_DIM
    image_token_id: int = 0
    sentence_token_id: int = 0
    alignment_weight: float = 1.0
    alignment_temperature: float = 0.05
    distill_weight: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
