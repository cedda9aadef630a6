"""The transformers config of the ``lite`` backbone: what a built model saves as ``config.json``.

How big a lite model is built (:class:`~grace.models.settings.LiteBackboneConfig`) is a
training setting, kept light in :mod:`grace.models.settings`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import (
    AutoConfig,
    PreTrainedConfig,
)
from transformers.configuration_utils import SubConfigSpec

from grace.models.lite.frozen_encoders import IMAGE_FEATURE_DIM, SENTENCE_FEATURE_DIM

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
        identifier_rows (`int`, *optional*, defaults to `0`):
            Identifier tokens after the text vocabulary, held in their own table
            (:mod:`grace.models.lite.identifier_table`); the tokenizer has
            ``text_config.vocab_size + identifier_rows`` tokens.
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
    identifier_rows: int = 0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
