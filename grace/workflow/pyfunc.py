"""The registered GRACE model as an MLflow pyfunc, loaded by the *installed* ``grace`` package.

Logged with ``loader_module="grace.workflow.pyfunc"``: the registry stores data only (a saved
:class:`~grace.retrieval.retriever.GraceRetriever` folder: safetensors weights, processor,
identifier map) plus the sha256 of each of its files, and no Python code. At load MLflow imports
this module from the serving environment and calls :func:`_load_pyfunc`, which refuses a folder
whose files do not match their digests. Serving needs the ``grace`` package installed (the
project image), e.g. ``mlflow models serve -m models:/grace@champion --env-manager local``.

Every request is checked against :class:`ServingLimits` before any work is done, so a caller
cannot ask for an allocation the server cannot make; a refusal is an ``INVALID_PARAMETER_VALUE``
error, which the scoring server answers with HTTP 400.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from grace.atomic_io import digest_mismatch, folder_digests
from grace.errors import GraceError

ARTIFACT = "grace_model"
DIGESTS_FILE = "sha256.json"
COLUMNS = ["query", "rank", "key", "path", "identifier", "score"]
DEFAULT_PARAMS = {"k": 5, "num_beams": 10}


@dataclass(frozen=True)
class ServingLimits:
    """The largest request a served model accepts; each is read from an environment variable.

    Args:
        max_k (`int`, *optional*, defaults to `100`): ``GRACE_MAX_K``, hits per query.
        max_beams (`int`, *optional*, defaults to `200`): ``GRACE_MAX_BEAMS``, beam width.
        max_batch (`int`, *optional*, defaults to `256`): ``GRACE_MAX_BATCH``, queries per request.
        max_query_chars (`int`, *optional*, defaults to `2000`): ``GRACE_MAX_QUERY_CHARS``.
    """

    max_k: int = 100
    max_beams: int = 200
    max_batch: int = 256
    max_query_chars: int = 2000

    @classmethod
    def from_env(cls) -> ServingLimits:
        """The defaults, overridden by ``GRACE_MAX_*`` variables of the serving process."""
        values = {}
        for name in ("max_k", "max_beams", "max_batch", "max_query_chars"):
            raw = os.environ.get(f"GRACE_{name.upper()}")
            if raw is not None:
                if not raw.isdigit() or int(raw) < 1:
                    raise GraceError(f"GRACE_{name.upper()}={raw!r}: expected an integer >= 1")
                values[name] = int(raw)
        return cls(**values)


def _refuse(message: str) -> Exception:
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _int_param(settings: dict[str, Any], name: str) -> int:
    value = settings[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or int(value) != value:
        raise _refuse(f"param {name!r} must be an integer, got {value!r}")
    return int(value)


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
        raise _refuse(f"every query must be a non-empty string, got {bad[0]!r}")
    return values


def checked_request(
    model_input: Any, params: dict[str, Any] | None, limits: ServingLimits
) -> tuple[list[str], int, int]:
    """(queries, k, beams) of a request, or an ``INVALID_PARAMETER_VALUE`` naming the bound."""
    settings = {**DEFAULT_PARAMS, **(params or {})}
    k, beams = _int_param(settings, "k"), _int_param(settings, "num_beams")
    if not 1 <= k <= limits.max_k:
        raise _refuse(f"param 'k' must be in 1..{limits.max_k} (GRACE_MAX_K), got {k}")
    beams = max(beams, k)  # the beam search needs at least k beams to return k hits
    if not 1 <= beams <= limits.max_beams:
        raise _refuse(
            f"param 'num_beams' must be in 1..{limits.max_beams} (GRACE_MAX_BEAMS), got {beams}"
        )
    queries = queries_of(model_input)
    if not 1 <= len(queries) <= limits.max_batch:
        raise _refuse(
            f"a request holds 1..{limits.max_batch} queries (GRACE_MAX_BATCH), got {len(queries)}"
        )
    for i, q in enumerate(queries):
        if len(q) > limits.max_query_chars:
            raise _refuse(
                f"query {i} has {len(q)} characters, more than {limits.max_query_chars} "
                "(GRACE_MAX_QUERY_CHARS)"
            )
    return queries, k, beams


class GraceRetrievalModel:
    """Text queries in; each query's top-k images (key, path, identifier, score) out."""

    def __init__(self, retriever: Any, limits: ServingLimits | None = None) -> None:
        self.grace = retriever
        self.limits = limits or ServingLimits.from_env()

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> pd.DataFrame:
        queries, k, beams = checked_request(model_input, params, self.limits)
        results = self.grace.retrieve(queries, k=k, num_beams=beams)
        rows = [
            (q, rank, h.key, h.path, h.identifier, h.score)
            for q, hits in zip(queries, results, strict=True)
            for rank, h in enumerate(hits, start=1)
        ]
        return pd.DataFrame(rows, columns=COLUMNS)


# ---- file digests ----------------------------------------------------------------------------
def file_digests(folder: str | os.PathLike) -> dict[str, str]:
    """sha256 of every regular file under ``folder`` (the digests file itself excluded)."""
    link = next((p for p in Path(folder).rglob("*") if p.is_symlink()), None)
    if link is not None:
        raise GraceError(f"{link}: a model folder may not hold symlinks")
    return folder_digests(folder, skip=(DIGESTS_FILE,))


def digests_sha256(folder: str | os.PathLike) -> str:
    """sha256 of a folder's digests file: one value that pins every file (a registry tag)."""
    return hashlib.sha256((Path(folder) / DIGESTS_FILE).read_bytes()).hexdigest()


def verify_digests(folder: str | os.PathLike, expected_sha256: str | None = None) -> None:
    """Raise a :class:`GraceError` naming the first file that is missing, extra or changed.

    Args:
        folder: A model folder written by :func:`staged_artifact`.
        expected_sha256: If given, the digests file itself must hash to it (the registry's copy).
    """
    folder = Path(folder)
    listed = folder / DIGESTS_FILE
    if not listed.is_file():
        raise GraceError(f"{folder}: no {DIGESTS_FILE}; the model cannot be verified")
    if expected_sha256 is not None and digests_sha256(folder) != expected_sha256:
        raise GraceError(f"{listed}: does not match the digest the registry recorded")
    mismatch = digest_mismatch(json.loads(listed.read_text()), file_digests(folder))
    if mismatch is not None:
        rel, kind = mismatch
        why = {
            "missing": "missing from the model (sha256 listed)",
            "extra": "not part of the model as registered",
            "changed": "sha256 differs from the registered model's",
        }[kind]
        raise GraceError(f"{folder / rel}: {why}")


@contextmanager
def staged_artifact(model_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary copy of ``model_dir`` named ``grace_model`` with its ``sha256.json`` added."""
    with tempfile.TemporaryDirectory(prefix="grace-stage-") as tmp:
        staged = Path(tmp) / ARTIFACT
        shutil.copytree(model_dir, staged, symlinks=True)
        (staged / DIGESTS_FILE).write_text(json.dumps(file_digests(staged), indent=1) + "\n")
        yield staged


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> Any:
    """MLflow's loader-module entry point: verify the files, then load them with this ``grace``."""
    from grace.retrieval.retriever import GraceRetriever

    verify_digests(data_path)
    return GraceRetrievalModel(GraceRetriever.load(data_path))
