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
import random
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from grace.errors import GraceError

CHAMPION = "champion"
CHALLENGER = "challenger"
METRICS_TAG = "metrics"
DIGEST_TAG = "files.sha256"  # sha256 of the model's sha256.json, checked when loading by URI
LEASE_TAG = "grace.promotion_lease"
# A version's registration: "pending" until its aliases have moved, then "done"; one a kill
# left pending is "rolled back" by the next registration (never promoted, aliases untouched).
REGISTRATION_TAG = "grace.registration"


@dataclass(frozen=True)
class Gate:
    """When a candidate may replace the champion.

    With no champion yet, only the absolute floors (``min_metric``, ``min_memorization``) apply.

    Args:
        metric (`str`, *optional*, defaults to `"grace_R@10"`):
            The evaluation metric compared with the champion's.
        tolerance (`float`, *optional*, defaults to `0.01`):
            How far below the champion's ``metric`` the candidate may be; absolute (0.01 = one
            point of recall).
        min_metric (`float`, *optional*, defaults to `0.0`):
            Floor of the candidate's ``metric``.
        min_memorization (`float`, *optional*, defaults to `0.9`):
            Floor of the candidate's ``memorization``.
    """

    metric: str = "grace_R@10"
    tolerance: float = 0.01
    min_metric: float = 0.0
    min_memorization: float = 0.9

    def __post_init__(self) -> None:
        if self.tolerance < 0:
            raise ValueError("gate tolerance must be >= 0")


@dataclass(frozen=True)
class IncrementalGate:
    """When an incrementally trained candidate may replace the champion it started from.

    Old-image recall is compared on the old images' queries with the old images as gallery
    (``old_<metric>`` against ``base_old_<metric>``), so what is compared is forgetting, not the
    new images crowding old answers (``old_whole_gallery_<metric>``, reported but not gated).

    Args:
        metric (`str`, *optional*, defaults to `"grace_R@10"`):
            The evaluation metric gated, on old and on new images.
        old_tolerance (`float`, *optional*, defaults to `0.01`):
            How far old-image ``metric`` may drop against the base model; absolute (0.01 = one
            point).
        min_new_memorization (`float`, *optional*, defaults to `0.9`):
            Floor of ``new_memorization``: the new images must be memorized.
        min_new_metric (`float`, *optional*, defaults to `0.0`):
            Floor of ``new_<metric>``: the new images must be retrievable.
        base_version (`str`, *optional*):
            The champion version the update started from; if ``champion`` moved meanwhile, the
            comparison is stale and nothing is promoted.
    """

    metric: str = "grace_R@10"
    old_tolerance: float = 0.01
    min_new_memorization: float = 0.9
    min_new_metric: float = 0.0
    base_version: str | None = None

    def __post_init__(self) -> None:
        if self.old_tolerance < 0:
            raise ValueError("gate old_tolerance must be >= 0")


@dataclass
class GateDecision:
    """A gate's verdict: whether to promote, the reasons, and the champion compared against."""

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


def check_incremental_gate(
    metrics: dict[str, float], gate: IncrementalGate, champion_version: str | None = None
) -> GateDecision:
    """Decide on an incremental candidate from its old/new metrics (``evaluate_old_new``)."""
    ok, reasons = True, []
    if gate.base_version is not None and champion_version != gate.base_version:
        ok = False
        reasons.append(
            f"champion is v{champion_version}, not base v{gate.base_version}: comparison stale"
        )
    if "new_images" not in metrics:
        reasons.append("no new images")
    else:
        mem = metrics.get("new_memorization", 0.0)
        ok &= mem >= gate.min_new_memorization
        sign = ">=" if mem >= gate.min_new_memorization else "<"
        reasons.append(f"new_memorization {mem:.4f} {sign} {gate.min_new_memorization:.4f}")
        new_key = f"new_{gate.metric}"
        if metrics.get("new_queries", 0) and new_key in metrics:
            value = metrics[new_key]
            ok &= value >= gate.min_new_metric
            sign = ">=" if value >= gate.min_new_metric else "<"
            reasons.append(f"{new_key} {value:.4f} {sign} floor {gate.min_new_metric:.4f}")
    old_key, base_key = f"old_{gate.metric}", f"base_old_{gate.metric}"
    if old_key in metrics and base_key in metrics and metrics.get("old_queries", 0):
        value, bar = metrics[old_key], metrics[base_key] - gate.old_tolerance
        ok &= value >= bar
        sign = ">=" if value >= bar else "<"
        reasons.append(
            f"{old_key} {value:.4f} {sign} base {metrics[base_key]:.4f} - {gate.old_tolerance:.4f}"
            " (old images' gallery)"
        )
    else:
        reasons.append(f"no old-image queries to compare {gate.metric} on")
    return GateDecision(bool(ok), reasons, champion_version)


@dataclass
class Registration:
    """A registered model version and the gate's decision on it."""

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


def resolve_model(uri: str) -> tuple[str, str, dict[str, str], str]:
    """``models:/NAME@ALIAS`` or ``models:/NAME/VERSION`` -> (name, version, tags, run id)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if not uri.startswith("models:/"):
        raise GraceError(f"{uri}: expected models:/NAME@ALIAS or models:/NAME/VERSION")
    ref = uri[len("models:/") :]
    client = MlflowClient()
    try:
        if "@" in ref:
            name, alias = ref.split("@", 1)
            mv = client.get_model_version_by_alias(name, alias)
        else:
            name, version = ref.rsplit("/", 1)
            mv = client.get_model_version(name, version)
    except (MlflowException, ValueError) as e:
        raise GraceError(f"cannot resolve {uri}: {str(e).splitlines()[0]}") from e
    return name, str(mv.version), dict(mv.tags), mv.run_id or ""


def download_grace_model(name: str, version: str, dst: str | os.PathLike) -> Path:
    """The saved GraceRetriever folder of a registered version, its files verified.

    Checked against the digest the registry recorded for the version (a registry-side copy, so
    a rewritten artifact store cannot vouch for itself). Versions registered before the pyfunc
    became data-only keep the folder under ``artifacts/`` and have no digests; they are
    returned as found.
    """
    import mlflow

    from grace.retrieval.retriever import GRACE_FILE
    from grace.workflow import pyfunc

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}", dst_path=dst))
    for found in (local / "data" / pyfunc.ARTIFACT, local / "artifacts" / pyfunc.ARTIFACT):
        if (found / GRACE_FILE).is_file():
            break
    else:
        raise GraceError(f"models:/{name}/{version} holds no GRACE model folder")
    recorded = _registered_digest(name, version)
    if recorded is not None or (found / pyfunc.DIGESTS_FILE).is_file():
        pyfunc.verify_digests(found, recorded)  # a deleted sha256.json is no way round it
    return found


def _registered_digest(name: str, version: str) -> str | None:
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version).tags.get(DIGEST_TAG)


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
    gate: Gate | IncrementalGate,
    tags: dict[str, str] | None = None,
    example_query: str = "a red circle",
) -> Registration:
    """Log ``model_dir`` as a pyfunc in the active run, register it, set aliases by the gate.

    Must run inside an active MLflow run (the register step's). The gate is decided under the
    registered model's promotion lease, against the champion read inside it, and ``champion``
    moves last, so neither a failure midway nor a concurrent registration leaves ``champion`` on
    a version that was not compared with the one it replaces.
    """
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    from grace.workflow import pyfunc

    if mlflow.active_run() is None:
        raise GraceError("register needs an active MLflow run")
    example = pd.DataFrame({"query": [example_query]})
    output = pd.DataFrame(
        [[example_query, 1, "sha256", "images/x.png", "0", -0.1]], columns=pyfunc.COLUMNS
    )
    with warnings.catch_warnings(), pyfunc.staged_artifact(model_dir) as staged:
        # known and benign here: rank is never missing; the signature stands for the example
        warnings.filterwarnings("ignore", ".*Hint: Inferred schema contains integer", UserWarning)
        warnings.filterwarnings("ignore", ".*An input example was not provided", UserWarning)
        signature = infer_signature(example, output, params=pyfunc.DEFAULT_PARAMS)
        info = mlflow.pyfunc.log_model(
            name="model",
            loader_module=pyfunc.__name__,  # code comes from the installed package, never the store
            data_path=os.fspath(staged),
            signature=signature,
            pip_requirements=_requirements(),
        )
        digest = pyfunc.digests_sha256(staged)
    pending = {**(tags or {}), DIGEST_TAG: digest, REGISTRATION_TAG: "pending"}
    mv = mlflow.register_model(info.model_uri, name, tags=pending)
    client = MlflowClient()
    client.set_model_version_tag(
        name,
        mv.version,
        METRICS_TAG,
        json.dumps({k: round(float(v), 6) for k, v in metrics.items()}),
    )
    # The gate is decided under the lease against the champion as it is *now*: two registrations
    # racing each compare with the other's outcome, never both with a stale champion.
    with promotion_lease(client, name):
        roll_back_abandoned(client, name, but=str(mv.version))
        champion = champion_of(name)
        if isinstance(gate, IncrementalGate):
            decision = check_incremental_gate(metrics, gate, champion[0] if champion else None)
        else:
            decision = check_gate(
                metrics,
                champion[1] if champion else None,
                gate,
                champion[0] if champion else None,
            )
        client.set_model_version_tag(name, mv.version, "gate", decision.summary()[:5000])
        client.set_registered_model_alias(name, CHALLENGER, mv.version)
        if decision.promote:
            client.set_registered_model_alias(name, CHAMPION, mv.version)
        client.set_model_version_tag(name, mv.version, REGISTRATION_TAG, "done")
    return Registration(name, str(mv.version), info.model_uri, decision)


def roll_back_abandoned(client: Any, name: str, but: str | None = None) -> list[str]:
    """Mark "rolled back" every version whose registration a kill left pending.

    Called under the promotion lease, where no other registration is deciding: a pending
    version that has a gate tag was killed inside the lease, and one whose run has ended was
    killed before it; either way its aliases never moved (``champion`` moves last). Its gate tag
    says so, so nobody reads a "promote" that did not happen. Returns the versions.

    Args:
        client: An ``MlflowClient``.
        name: The registered model.
        but: The version being registered now, left alone.
    """
    rolled = []
    for mv in client.search_model_versions(f"name = '{name}'"):
        if mv.tags.get(REGISTRATION_TAG) != "pending" or str(mv.version) == but:
            continue
        run_ended = mv.run_id and client.get_run(mv.run_id).info.status != "RUNNING"
        if "gate" not in mv.tags and not run_ended:
            continue  # still uploading, in another process
        note = "not applied: the registration was killed before its aliases moved"
        client.set_model_version_tag(name, mv.version, "gate", f"{note}; {mv.tags.get('gate', '')}")
        client.set_model_version_tag(name, mv.version, REGISTRATION_TAG, "rolled back")
        if mv.run_id and not run_ended:  # died inside the lease: its run will never end itself
            client.set_terminated(mv.run_id, "KILLED")
        rolled.append(str(mv.version))
    return rolled


@contextmanager
def promotion_lease(
    client: Any,
    name: str,
    *,
    ttl: float = 60.0,
    settle: float = 1.0,
    timeout: float = 600.0,
) -> Iterator[None]:
    """Hold a registered model's promotion lease: a tag naming its owner and expiry.

    MLflow has no compare-and-set, so a writer claims the tag, waits ``settle`` seconds for any
    concurrent claim to land, and holds the lease only if the tag still names it; the last
    writer wins and every other one retries. A holder killed midway blocks others for ``ttl``,
    or until its MLflow run is marked ended (what a retry of its step does first). A holder
    that stalls longer than ``ttl`` inside the lease could overlap with the next one; what it
    does there (a few registry calls) takes well under a second.

    Args:
        client: An ``MlflowClient``.
        name: The registered model.
        ttl: Seconds after which an unreleased lease counts as abandoned.
        settle: Seconds between claiming and re-reading the tag.
        timeout: Seconds to wait for the lease before giving up with a ``GraceError``.
    """
    import mlflow

    token = uuid.uuid4().hex
    active = mlflow.active_run()
    run_id = active.info.run_id if active is not None else ""
    deadline = time.monotonic() + timeout
    while True:
        held = _lease_of(client, name)
        if held is None or held["expires"] < time.time() or _holder_ended(client, held):
            claim = {"owner": token, "run": run_id, "expires": time.time() + ttl}
            client.set_registered_model_tag(name, LEASE_TAG, json.dumps(claim))
            time.sleep(settle)
            held = _lease_of(client, name)
            if held is not None and held["owner"] == token:
                break
        if time.monotonic() > deadline:
            raise GraceError(f"registered model {name!r}: promotion lease busy for {timeout:.0f} s")
        time.sleep(random.uniform(0.2, 0.8))
    try:
        yield
    finally:
        held = _lease_of(client, name)
        if held is not None and held["owner"] == token:
            client.delete_registered_model_tag(name, LEASE_TAG)


def _lease_of(client: Any, name: str) -> dict[str, Any] | None:
    raw = client.get_registered_model(name).tags.get(LEASE_TAG)
    try:
        lease = json.loads(raw) if raw else None
        if not lease:
            return None
        owner, expires = str(lease["owner"]), float(lease["expires"])
        return {"owner": owner, "expires": expires, "run": str(lease.get("run", ""))}
    except (ValueError, KeyError, TypeError):
        return None  # an unreadable lease is nobody's: the next claim replaces it


def _holder_ended(client: Any, lease: dict[str, Any]) -> bool:
    """Whether the lease's holder is known dead, so nobody waits out the ttl for it.

    It is when its MLflow run has ended: a retried step marks a killed attempt KILLED.
    """
    from mlflow.exceptions import MlflowException

    if not lease["run"]:
        return False
    try:
        return client.get_run(lease["run"]).info.status != "RUNNING"
    except MlflowException:
        return False


def _requirements() -> list[str]:
    """What serving needs: this project, pinned (installed in the serving image)."""
    from importlib.metadata import version

    return [f"grace-retrieval=={version('grace-retrieval')}"]


def load_pyfunc(model_uri: str) -> Any:
    """Load a registered model, e.g. ``models:/grace@champion``, its files verified.

    The version is downloaded and verified by :func:`download_grace_model` before MLflow imports
    the installed loader.
    """
    import tempfile

    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        if model_uri.startswith("models:/"):
            name, version, _, _ = resolve_model(model_uri)
            found = download_grace_model(name, version, tempfile.mkdtemp(prefix="grace-model-"))
            return mlflow.pyfunc.load_model(os.fspath(found.parents[1]))  # the MLmodel folder
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as e:
        raise GraceError(f"cannot load {model_uri}: {e.message.splitlines()[0]}") from e
