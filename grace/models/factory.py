"""Every backbone by name: the built-in ones GRACE builds, or a saved/hub model it loads."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)

from grace.constants import LITE_BACKBONE, TINY_BACKBONE
from grace.models.backbone import _sync_generation_ids, tokenizer_of
from grace.models.lite.modeling_lite import GraceLiteForConditionalGeneration, build_lite_backbone
from grace.models.lite.processing_lite import GraceLiteProcessor
from grace.models.settings import LiteBackboneConfig, TinyBackboneConfig
from grace.models.tiny import build_tiny_backbone

Builder = Callable[..., tuple[PreTrainedModel, ProcessorMixin]]

BUILT_IN: dict[str, tuple[Builder, type]] = {
    TINY_BACKBONE: (build_tiny_backbone, TinyBackboneConfig),
    LITE_BACKBONE: (build_lite_backbone, LiteBackboneConfig),
}
"""The backbones GRACE builds from random init (name -> builder, its size config class)."""


def build_backbone(
    name: str, texts: Iterable[str], sizes: Any | None = None, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A built-in backbone with a tokenizer trained on ``texts``.

    Args:
        name: A key of :data:`BUILT_IN` (``"lite"`` or ``"tiny"``).
        texts: What the tokenizer is trained on: captions, identifier texts, prompts.
        sizes: The backbone's size config (defaults: the config class's defaults).
        seed: Seed of the random init.

    Raises:
        ValueError: ``name`` is not a built-in backbone.
    """
    if name not in BUILT_IN:
        raise ValueError(f"backbone {name!r}: expected one of {', '.join(BUILT_IN)}")
    build, config_class = BUILT_IN[name]
    return build(texts, sizes if sizes is not None else config_class(), seed=seed)


def load_backbone(name_or_path: str | os.PathLike) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a saved GRACE model or any image-text-to-text backbone (hub id or local folder).

    A saved ``lite`` backbone (its processor is GRACE's own) loads through its classes.
    With ``HF_HUB_OFFLINE=1`` (tests, air-gapped clusters) only local files are used.
    """
    local = Path(name_or_path).is_dir()
    with _no_loading_bar() if local else nullcontext():
        if local and GraceLiteProcessor.is_saved_in(name_or_path):
            processor = GraceLiteProcessor.from_pretrained(name_or_path)
            model = GraceLiteForConditionalGeneration.from_pretrained(str(name_or_path))
            _sync_generation_ids(model, processor.tokenizer)
            return model, processor
        offline = local or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        processor = AutoProcessor.from_pretrained(str(name_or_path), local_files_only=offline)
        model = AutoModelForImageTextToText.from_pretrained(
            str(name_or_path), local_files_only=offline
        )
    _sync_generation_ids(model, tokenizer_of(processor))
    return model, processor


@contextmanager
def _no_loading_bar() -> Iterator[None]:
    """Turn transformers' "Loading weights" bar off while a local folder loads.

    Reading a local folder takes a blink; the bar would be the only line a search or a
    pipeline step prints about it.
    """
    from transformers.utils import logging as hf_logging

    was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_on:
            hf_logging.enable_progress_bar()
