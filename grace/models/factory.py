"""Loading a backbone by name or path: a saved GRACE model or any hub image-text-to-text model."""

from __future__ import annotations

import os
from pathlib import Path

from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    PreTrainedModel,
    ProcessorMixin,
)


def load_backbone(name_or_path: str | os.PathLike) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a saved GRACE model or any image-text-to-text backbone (hub id or local folder).

    A saved ``lite`` backbone (its processor is GRACE's own) loads through its classes.
    With ``HF_HUB_OFFLINE=1`` (tests, air-gapped clusters) only local files are used.
    """
    from grace.models.backbone import _sync_generation_ids, tokenizer_of
    from grace.models.lite.modeling_lite import GraceLiteForConditionalGeneration
    from grace.models.lite.processing_lite import GraceLiteProcessor

    local = Path(name_or_path).is_dir()
    if local and GraceLiteProcessor.is_saved_in(name_or_path):
        processor = GraceLiteProcessor.from_pretrained(name_or_path)
        model = GraceLiteForConditionalGeneration.from_pretrained(str(name_or_path))
        _sync_generation_ids(model, processor.tokenizer)
        return model, processor
    offline = local or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    processor = AutoProcessor.from_pretrained(str(name_or_path), local_files_only=offline)
    model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), local_files_only=offline)
    _sync_generation_ids(model, tokenizer_of(processor))
    return model, processor
