"""What the workflow steps share: the step context, data materialization, small helpers."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grace.atomic_io import atomic_dir
from grace.credentials import redact_text, redact_url
from grace.errors import GraceError, InvalidInputError
from grace.workflow.tracking import StepRun, Tracking, for_uri

REVISION_FILE = "revision.json"


MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class StepContext:
    """What every step shares: where to track, and the key of the pipeline run it belongs to."""

    tracking: Tracking = field(default_factory=Tracking)
    pipeline_key: str = "local"


def context(tracking_uri: str, experiment: str, pipeline_key: str) -> StepContext:
    """The context a KFP component builds from its plain parameters.

    In a KFP task it also makes a user error (bad input, a refused gate) end the task with its
    every problem listed in the log, and no traceback; a bug still prints one.
    """
    if _in_kfp_task():
        sys.excepthook = _report_user_errors
    return StepContext(for_uri(tracking_uri, experiment), pipeline_key)


def _in_kfp_task() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return spec is not None and spec.name == "kfp.dsl.executor_main"


def _report_user_errors(kind, error, tb) -> None:
    if not isinstance(error, GraceError):
        sys.__excepthook__(kind, error, tb)
        return
    problems = error.problems if isinstance(error, InvalidInputError) else [error]
    for problem in problems:
        print(f"error: {redact_text(str(problem))}", file=sys.stderr)
    print(f"error: the task stopped on {len(problems)} problem(s)", file=sys.stderr, flush=True)


def _materialize(source: str, rev: str, data_dir: str, out: Path) -> dict[str, str]:
    """Copy the set to ``out``; return where it came from, the revision resolved to a sha."""
    if rev:
        from grace.data.versioning import fetch_image_set

        fetch_image_set(source, rev, out, data_dir=data_dir)  # validate_data checks it
        # what is recorded never holds the token a private repo URL may carry
        revision = _resolve_rev(source, rev)
        return {"source": redact_url(source), "revision": revision, "requested": rev}
    folder = Path(source)
    if not folder.is_dir():
        raise GraceError(f"{source}: no such image-set folder (give rev to read a DVC repo)")
    with atomic_dir(out) as tmp:
        # links stay links, so validation refuses them instead of copying what they point at
        shutil.copytree(folder, tmp, dirs_exist_ok=True, symlinks=True)
    return {"source": str(folder.resolve()), "revision": "folder", "requested": ""}


def _resolve_rev(source: str, rev: str) -> str:
    """A git revision as a commit sha, so lineage and caching key on content, not on names."""
    if Path(source).is_dir():
        done = subprocess.run(
            ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
            cwd=source,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return rev


def _log_dataset(run: StepRun, frame, revision: dict[str, str]) -> None:
    """Dataset lineage: the manifest and its revision as an MLflow dataset input."""
    if not run.active:
        return
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    table = frame.drop(columns=["captions"]).assign(captions=frame["captions"].map(len))
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": it is a name
        warnings.filterwarnings("ignore", ".*The specified dataset source", UserWarning)
        ds = mlflow.data.from_pandas(
            table, source=f"{revision['source']}@{revision['revision']}", name="image-set"
        )
    mlflow.log_input(ds, context="training")
    entity = DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])
    MlflowClient().log_inputs(run.parent_id, datasets=[entity])


# ---- shared ----------------------------------------------------------------------------------
def _records(dataset_dir: str | os.PathLike):
    from grace.data.imageset import load_records

    manifest = Path(dataset_dir) / MANIFEST
    return load_records(manifest if manifest.is_file() else dataset_dir)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted MLflow params (``tiny.image_size``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
