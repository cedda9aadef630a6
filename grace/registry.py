"""The model registry: register a trained model, and promote it only through the evaluation gate.

Every registered version gets alias ``challenger``; alias ``champion`` moves to it only when the
gate passes: its recall is at least the current champion's minus a tolerance, and it memorized
enough of its images. A refused version stays registered (reviewable in the UI) and ``champion``
does not move. Metrics travel as a version tag (``metrics``, JSON), so the gate compares versions
without reading their runs.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grace.errors import GraceError

CHAMPION = "champion"
CHALLENGER = "challenger"
METRICS_TAG = "metrics"


@dataclass(frozen=True)
class Gate:
    """When a candidate may replace the champion.

    ``metric`` must reach the champion's value minus ``tolerance`` (absolute, e.g. 0.01 = one
    point of recall) and at least ``min_metric``; ``memorization`` must reach ``min_memorization``.
    With no champion yet, only the absolute floors apply.
    """

    metric: str = "grace_R@10"
    tolerance: float = 0.01
    min_metric: float = 0.0
    min_memorization: float = 0.9

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError("gate tolerance must be >= 0")


@dataclass
class GateDecision:
    promote: bool
    reasons: list[str] = field(default_factory=list)
    champion_version: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        verdict = "promote" if self.promote else "refuse"
        return f"{verdict}: " + "; ".join(self.reasons)


def check_gate(
    metrics: dict[str, float],
    champion_metrics: dict[str, float] | None,
    gate: Gate,
    champion_version: str | None = None,
) -> GateDecision:
    """Decide, and say why in terms a reviewer can check against the numbers."""
    if gate.metric not in metrics:
        raise GraceError(f"gate metric {gate.metric!r} is not among the evaluation's metrics")
    value = metrics[gate.metric]
    mem = metrics.get("memorization")
    ok, reasons = True, []
    if value < gate.min_metric:
        ok = False
        reasons.append(f"{gate.metric} {value:.4f} < floor {gate.min_metric:.4f}")
    if mem is None or mem < gate.min_memorization:
        ok = False
        reasons.append(f"memorization {mem} < {gate.min_memorization:.4f}")
    else:
        reasons.append(f"memorization {mem:.4f} >= {gate.min_memorization:.4f}")
    if champion_metrics is None or gate.metric not in champion_metrics:
        reasons.append(f"no champion to compare {gate.metric} with")
    else:
        bar = champion_metrics[gate.metric] - gate.tolerance
        if value < bar:
            ok = False
            reasons.append(
                f"{gate.metric} {value:.4f} < champion v{champion_version} "
                f"{champion_metrics[gate.metric]:.4f} - {gate.tolerance:.4f}"
            )
        else:
            reasons.append(
                f"{gate.metric} {value:.4f} >= champion v{champion_version} "
                f"{champion_metrics[gate.metric]:.4f} - {gate.tolerance:.4f}"
            )
    return GateDecision(ok, reasons, champion_version)


@dataclass
class Registration:
    name: str
    version: str
    model_uri: str
    decision: GateDecision

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "version": self.version,
            "model_uri": self.model_uri,
            "promoted": self.decision.promote,
            **self.decision.to_dict(),
        }


def champion_of(name: str) -> tuple[str, dict[str, float], dict[str, str]] | None:
    """(version, metrics, tags) of the current champion, or None."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    try:
        mv = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return None
    tags = dict(mv.tags)
    return mv.version, json.loads(tags.get(METRICS_TAG, "{}")), tags


def register(
    model_dir: str | os.PathLike,
    metrics: dict[str, float],
    *,
    name: str,
    gate: Gate,
    tags: dict[str, str] | None = None,
    example_query: str = "a red circle",
) -> Registration:
    """Log ``model_dir`` as a pyfunc in the active run, register it, set aliases by the gate.

    Must run inside an active MLflow run (the register step's). The decision is taken before
    any alias moves, and ``champion`` moves last, so a failure midway never leaves ``champion``
    on an unchecked version.
    """
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from grace import mlflow_model

    if mlflow.active_run() is None:
        raise GraceError("register needs an active MLflow run")
    champion = champion_of(name)
    decision = check_gate(
        metrics,
        champion[1] if champion else None,
        gate,
        champion[0] if champion else None,
    )
    example = pd.DataFrame({"query": [example_query]})
    output = pd.DataFrame(
        [[example_query, 1, "sha256", "images/x.png", "0", -0.1]], columns=mlflow_model.COLUMNS
    )
    signature = infer_signature(example, output, params=mlflow_model.DEFAULT_PARAMS)
    info = mlflow.pyfunc.log_model(
        name="model",
        python_model=str(Path(mlflow_model.__file__)),
        artifacts={mlflow_model.ARTIFACT: os.fspath(model_dir)},
        signature=signature,
        pip_requirements=_requirements(),
    )
    all_tags = {
        **(tags or {}),
        METRICS_TAG: json.dumps({k: round(float(v), 6) for k, v in metrics.items()}),
        "gate": decision.summary()[:5000],
    }
    mv = mlflow.register_model(info.model_uri, name, tags=all_tags)
    client = MlflowClient()
    client.set_registered_model_alias(name, CHALLENGER, mv.version)
    if decision.promote:
        client.set_registered_model_alias(name, CHAMPION, mv.version)
    return Registration(name, str(mv.version), info.model_uri, decision)


def _requirements() -> list[str]:
    """What serving needs: this project, pinned (installed in the serving image)."""
    from importlib.metadata import version

    return [f"grace-retrieval=={version('grace-retrieval')}"]


def load_pyfunc(model_uri: str):
    """Load a registered model, e.g. ``models:/grace@champion``, with a clear error if absent."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise GraceError(f"cannot load {model_uri}: {e.message.splitlines()[0]}") from e
