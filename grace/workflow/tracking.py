"""MLflow tracking of a workflow run: one parent run per pipeline run, one nested run per step.

Steps run as separate processes (KFP tasks, possibly on different nodes), so they cannot share an
active run object. They share a *pipeline run key* instead (the KFP run id, or any string the
caller picks): the first step creates the parent run tagged with that key, later steps find it.
With no tracking URI configured every function here is a no-op, so the library runs untracked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grace.credentials import redact_text, redact_value

PIPELINE_KEY_TAG = "grace.pipeline_run"
# Without a kind the MLflow 3 UI opens an experiment in GenAI mode (traces, prompts), not runs.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
STEP_TAG = "grace.step"


@dataclass(frozen=True)
class Tracking:
    """Where runs go. ``uri`` empty: tracking is off.

    ``artifact_location`` matters for database stores (``sqlite:///...``): MLflow would otherwise
    put artifacts in ``./mlruns`` relative to whatever the working directory happens to be.
    A tracking server (``http://...``) chooses its own artifact store.
    """

    uri: str = ""
    experiment: str = "grace"
    artifact_location: str | None = None

    @property
    def enabled(self) -> bool:
        return bool(self.uri)


def local_store(folder: str | os.PathLike, experiment: str = "grace") -> Tracking:
    """A SQLite tracking store and a file artifact store, both under ``folder``."""
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    return for_uri(f"sqlite:///{folder / 'mlflow.db'}", experiment)


def for_uri(uri: str, experiment: str = "grace") -> Tracking:
    """Tracking to ``uri``.

    A SQLite file store keeps its artifacts in ``artifacts/`` beside the database (MLflow would
    otherwise use ./mlruns of the working directory).
    """
    artifacts = None
    if uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///")).resolve()
        artifacts = (db.parent / "artifacts").as_uri()
    return Tracking(uri=uri, experiment=experiment, artifact_location=artifacts)


def from_env(experiment: str = "grace") -> Tracking:
    """``MLFLOW_TRACKING_URI`` from the environment (off when unset)."""
    return Tracking(uri=os.environ.get("MLFLOW_TRACKING_URI", ""), experiment=experiment)


def experiment_id(tracking: Tracking) -> str:
    """Point MLflow at ``tracking`` and return its experiment's id, creating it if needed."""
    import mlflow

    mlflow.set_tracking_uri(tracking.uri)
    found = mlflow.get_experiment_by_name(tracking.experiment)
    if found is not None:
        if EXPERIMENT_KIND_TAG not in found.tags:  # made before the kind was set
            mlflow.MlflowClient().set_experiment_tag(
                found.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING
            )
        return found.experiment_id
    try:
        return mlflow.create_experiment(
            tracking.experiment,
            artifact_location=tracking.artifact_location,
            tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING},
        )
    except Exception:  # another step created it first
        found = mlflow.get_experiment_by_name(tracking.experiment)
        if found is None:
            raise
        return found.experiment_id


def parent_run_id(tracking: Tracking, pipeline_key: str, run_name: str | None = None) -> str:
    """The parent run of pipeline run ``pipeline_key``: found by its tag, else created."""
    from mlflow import MlflowClient

    exp = experiment_id(tracking)
    client = MlflowClient(tracking.uri)
    found = client.search_runs(
        [exp],
        filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{_quote(pipeline_key)}'",
        max_results=1,
    )
    if found:
        return found[0].info.run_id
    run = client.create_run(
        exp, run_name=run_name or f"pipeline-{pipeline_key}", tags={PIPELINE_KEY_TAG: pipeline_key}
    )
    return run.info.run_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


@contextmanager
def step_run(
    tracking: Tracking,
    pipeline_key: str,
    step: str,
    params: dict[str, Any] | None = None,
    finishes_pipeline: bool = False,
) -> Iterator[StepRun]:
    """A nested run for one step under the pipeline's parent run.

    A failing step marks the parent run FAILED (the pipeline stops there); the step that
    ``finishes_pipeline`` marks it FINISHED.
    """
    if not tracking.enabled:
        yield StepRun(None, None)
        return
    import mlflow
    from mlflow import MlflowClient

    parent = parent_run_id(tracking, pipeline_key)
    client = MlflowClient(tracking.uri)
    experiment = experiment_id(tracking)
    close_killed_attempts(client, experiment, f"{pipeline_key}/{step}")
    with mlflow.start_run(
        run_name=step,
        experiment_id=experiment,
        parent_run_id=parent,
        tags={PIPELINE_KEY_TAG: f"{pipeline_key}/{step}", STEP_TAG: step},
    ) as run:
        handle = StepRun(run.info.run_id, parent)
        if params:
            handle.log_params(params)
        try:
            yield handle
        except BaseException:
            client.set_terminated(parent, "FAILED")
            raise
    if finishes_pipeline:
        client.set_terminated(parent, "FINISHED")


def close_killed_attempts(client: Any, experiment: str, step_key: str) -> list[str]:
    """Mark KILLED the runs of an earlier attempt of this step that a kill left RUNNING.

    A retried KFP task has the same pipeline key, and only one attempt of a step runs at a
    time, so a RUNNING run of the same step is a dead one. Its logged models that never became
    READY (a kill between ``log_model`` and registration) are marked FAILED. Returns their ids.
    """
    from mlflow.entities import LoggedModelStatus

    runs = client.search_runs(
        [experiment],
        filter_string=f"tags.`{PIPELINE_KEY_TAG}` = '{_quote(step_key)}' and "
        "attributes.status = 'RUNNING'",
    )
    for run in runs:
        models = client.search_logged_models(
            [experiment], filter_string=f"source_run_id = '{run.info.run_id}'"
        )
        for model in models:
            if model.status != LoggedModelStatus.READY:
                client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        client.set_terminated(run.info.run_id, "KILLED")
    return [run.info.run_id for run in runs]


@dataclass(frozen=True)
class StepRun:
    """What a step logs to: its own nested run, and the parent for the pipeline's headline."""

    run_id: str | None
    parent_id: str | None

    @property
    def active(self) -> bool:
        return self.run_id is not None

    def _client(self):
        from mlflow import MlflowClient

        return MlflowClient()

    def log_params(self, params: dict[str, Any], on_parent: bool = False) -> None:
        if not self.active:
            return
        from mlflow.entities import Param

        clean = {k: _param_value(redact_value(v)) for k, v in params.items() if v is not None}
        target = self.parent_id if on_parent else self.run_id
        self._client().log_batch(target, params=[Param(k, v) for k, v in clean.items()])

    def log_metrics(
        self, metrics: dict[str, float], step: int | None = None, on_parent: bool = False
    ) -> None:
        if not self.active:
            return
        import mlflow

        clean = {_metric_key(k): float(v) for k, v in metrics.items()}
        mlflow.log_metrics(clean, step=step, run_id=self.run_id)
        if on_parent:
            mlflow.log_metrics(clean, step=step, run_id=self.parent_id)

    def log_artifact(self, path: str | os.PathLike, dest: str) -> None:
        """Log file ``path`` as artifact ``dest`` (``folder/name.ext``).

        KFP's artifact files have no extension, and the MLflow UI picks its viewer by the name.
        """
        if not self.active:
            return
        import shutil
        import tempfile

        folder, _, name = dest.rpartition("/")
        with tempfile.TemporaryDirectory() as tmp:
            named = Path(tmp) / name
            shutil.copyfile(path, named)
            self._client().log_artifact(self.run_id, os.fspath(named), folder or None)

    def log_png(self, image: Any, artifact_file: str, on_parent: bool = False) -> None:
        """Log a PIL image or a matplotlib figure as a PNG artifact."""
        if not self.active:
            return
        client = self._client()
        for run in [self.run_id] + ([self.parent_id] if on_parent else []):
            if hasattr(image, "savefig"):
                client.log_figure(run, image, artifact_file)
            else:
                client.log_image(run, image, artifact_file=artifact_file)

    def set_tags(self, tags: dict[str, Any], on_parent: bool = False) -> None:
        if not self.active:
            return
        client = self._client()
        for k, v in tags.items():
            client.set_tag(self.parent_id if on_parent else self.run_id, k, redact_text(str(v)))


def _param_value(v: Any) -> str:
    return str(v)[:6000]  # MLflow's param value limit


def _metric_key(k: str) -> str:
    """MLflow metric names take ``_ - . space / :`` but no ``@``: ``R@10`` -> ``R_at_10``."""
    return k.replace("@", "_at_")


class MetricsLogger:
    """The training loop's metrics callback: every ``every`` steps to MLflow, all kept in memory.

    The kept history draws the loss plot at the end, so the plot needs no second read of MLflow.
    """

    def __init__(self, run: StepRun, every: int = 10) -> None:
        self.run = run
        self.every = max(1, every)
        self.history: list[tuple[int, dict[str, float]]] = []
        self._window_start = 0  # index in history of the first step not logged yet

    def __call__(self, step: int, metrics: dict[str, float]) -> None:
        self.history.append((step, dict(metrics)))
        if step == 1 or step % self.every == 0:
            self._log_window()

    def flush(self) -> None:
        """Log the last steps too, so a curve ends where training ended."""
        if self._window_start < len(self.history):
            self._log_window()

    def _log_window(self) -> None:
        """Log one point for the steps since the last one.

        Each loss is its mean over those steps (one batch's loss is noise); everything else
        (lr, epoch, throughput) as of the last step.
        """
        window = self.history[self._window_start :]
        step, last = window[-1]
        logged = dict(last)
        for key in sorted({k for _, m in window for k in m if k.startswith("loss")}):
            values = [m[key] for _, m in window if key in m]
            logged[key] = sum(values) / len(values)
        self.run.log_metrics(logged, step=step)
        self._window_start = len(self.history)

    def loss_figure(self, title: str):
        """A matplotlib figure of loss per task against step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        series: dict[str, tuple[list[int], list[float]]] = {}
        for step, m in self.history:
            for k, v in m.items():
                if k.startswith("loss_"):
                    xs, ys = series.setdefault(k[5:], ([], []))
                    xs.append(step)
                    ys.append(v)
        for task, (xs, ys) in sorted(series.items()):
            ax.plot(xs, _smooth(ys), label=task)
        ax.set(xlabel="step", ylabel="loss (smoothed)", title=title, yscale="log")
        if series:
            ax.legend()
        fig.tight_layout()
        return fig


def _smooth(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out
