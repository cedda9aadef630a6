"""Models saved before the layered layout still load and answer as they did."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from grace.retrieval.retriever import GraceRetriever

LEGACY = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_model"


def test_a_model_saved_by_the_flat_layout_loads_and_ranks_as_it_did():
    expected = json.loads((LEGACY / "expected_hits.json").read_text())
    retriever = GraceRetriever.load(LEGACY / "model")
    hits = retriever.retrieve(expected["queries"], k=3)
    for row, want in zip(hits, expected["hits"], strict=True):
        assert [h.identifier for h in row] == [w["identifier"] for w in want]
        assert [h.score for h in row] == pytest.approx([w["score"] for w in want], abs=1e-4)


def test_old_module_names_still_import_with_a_deprecation_warning():
    import importlib
    import sys

    sys.modules.pop("grace.modeling_grace", None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        old = importlib.import_module("grace.modeling_grace")
        assert old.GraceModel is GraceRetriever
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    # a split module looks each name up where it went
    config = importlib.import_module("grace.configuration_grace")
    from grace.models.prompts import Prompts
    from grace.training.config import TrainConfig

    assert config.TrainConfig is TrainConfig and config.Prompts is Prompts
    with pytest.raises(AttributeError):
        config.no_such_name  # noqa: B018


def test_loading_a_saved_model_draws_no_progress_bar(capfd):
    """A search or a pipeline step prints its results, not transformers' loading bar."""
    GraceRetriever.load(LEGACY / "model")
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err
