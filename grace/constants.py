"""Names and values every layer shares: the built-in backbone names and the loss's ignore index."""

from __future__ import annotations

TINY_BACKBONE = "tiny"
"""``TrainConfig.backbone`` of the small Idefics3 built from a config (:mod:`grace.models.tiny`)."""

LITE_BACKBONE = "lite"
"""``TrainConfig.backbone`` of the default backbone (:mod:`grace.models.lite`)."""

DEFAULT_ID_SCHEME = "structured"
"""The identifier scheme of ``grace ids assign``, the pipelines and ``make demo``: structured ids
with a token per tree node retrieve as well as atomic ones and keep a query's and a training
step's cost flat in the catalog's size (README, "Identifier schemes"; BENCHMARKS.md)."""

IGNORE_INDEX = -100
"""Label of the tokens the loss skips (prompt and padding), as in transformers."""
