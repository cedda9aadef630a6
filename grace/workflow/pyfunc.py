"""The registered GRACE model as an MLflow pyfunc, logged as *code* plus weight *artifacts*.

MLflow's "models from code": this file is stored with the model and run at load time, so no
pickled Python object is in the registry; the weights, processor and identifier map are the
``grace_model`` artifact (a saved :class:`~grace.retrieval.retriever.GraceRetriever` folder).
Serving needs the ``grace`` package installed (the project image), e.g.
``mlflow models serve -m models:/grace@champion --env-manager local``.
"""

from __future__ import annotations

from typing import Any

import mlflow
import pandas as pd
from mlflow.models import set_model

ARTIFACT = "grace_model"
COLUMNS = ["query", "rank", "key", "path", "identifier", "score"]
DEFAULT_PARAMS = {"k": 5, "num_beams": 10}


def queries_of(model_input: Any) -> list[str]:
    """The queries in what a pyfunc caller sends.

    Accepted: a DataFrame with a ``query`` column (or one column), a list of strings, a single
    string, or ``{"query": [...]}``.
    """
    if isinstance(model_input, pd.DataFrame):
        column = "query" if "query" in model_input.columns else model_input.columns[0]
        values = model_input[column].tolist()
    elif isinstance(model_input, dict):
        values = model_input.get("query", [])
        values = [values] if isinstance(values, str) else list(values)
    elif isinstance(model_input, str):
        values = [model_input]
    else:
        values = list(model_input)
    bad = [v for v in values if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ValueError(f"every query must be a non-empty string, got {bad[0]!r}")
    return values


class GraceRetrievalModel(mlflow.pyfunc.PythonModel):
    """Text queries in; each query's top-k images (key, path, identifier, score) out."""

    def load_context(self, context: Any) -> None:
        from grace.retrieval.retriever import GraceRetriever

        self.grace = GraceRetriever.load(context.artifacts[ARTIFACT])

    def predict(
        self, context: Any, model_input: Any, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        settings = {**DEFAULT_PARAMS, **(params or {})}
        k, beams = int(settings["k"]), int(settings["num_beams"])
        queries = queries_of(model_input)
        results = self.grace.retrieve(queries, k=k, num_beams=max(beams, k))
        rows = [
            (q, rank, h.key, h.path, h.identifier, h.score)
            for q, hits in zip(queries, results, strict=True)
            for rank, h in enumerate(hits, start=1)
        ]
        return pd.DataFrame(rows, columns=COLUMNS)


set_model(GraceRetrievalModel())
