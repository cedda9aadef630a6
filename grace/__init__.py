"""GRACE: generative cross-modal retrieval with a multimodal LLM that memorizes image ids.

The public API, loaded on first use so that ``import grace`` stays light::

    from grace import IdentifierMap, TrainConfig, GraceRetriever, assign_identifiers, train

The layers, from the bottom up: ``data`` -> ``identifiers`` -> ``models`` -> ``retrieval`` ->
``training`` -> ``evaluation`` -> ``workflow`` -> ``cli`` (docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import Any

from grace import _legacy

_legacy.install()

_PUBLIC = {
    "IdentifierMap": "grace.identifiers",
    "assign_identifiers": "grace.identifiers",
    "ImageRecord": "grace.data.records",
    "scan_image_set": "grace.data.imageset",
    "TrainConfig": "grace.training.config",
    "train": "grace.training",
    "GraceRetriever": "grace.retrieval.retriever",
    "GraceModel": "grace.retrieval.retriever",
    "Hit": "grace.retrieval.retriever",
    "evaluate": "grace.evaluation.metrics",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'grace' has no attribute {name!r}")
