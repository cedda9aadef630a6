"""Running the pipelines: locally through ``kfp.local``, compiled to YAML, or on a KFP cluster.

What ``grace pipeline run|compile|submit|schedule`` calls. This package is the only place that
imports kfp; the ``grace`` library never does.
"""

from __future__ import annotations

import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from grace.credentials import GIT_TOKEN_ENV, redact_value
from grace.errors import GraceError
from grace_kfp.pipelines.kfp_api_errors import kfp_api_errors

COMPILED = Path(__file__).parent / "compiled"


def pipelines() -> dict[str, Any]:
    """Pipeline name -> pipeline function."""
    from grace_kfp.pipelines.incremental_pipeline import incremental_pipeline
    from grace_kfp.pipelines.training_pipeline import training_pipeline

    return {"training": training_pipeline, "incremental": incremental_pipeline}


def _pipeline(name: str):
    found = pipelines()
    if name not in found:
        raise GraceError(f"unknown pipeline {name!r}; known: {', '.join(sorted(found))}")
    return found[name]


_TYPES = {
    "String": str,
    "Integer": int,
    "Float": float,
    "Boolean": bool,
    "Dict": dict,
    "List": list,
}


def pipeline_arguments(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """``arguments`` checked against the pipeline's parameters and cast to their types.

    (``dense_seconds=45`` from a command line is an int; the parameter is a float).
    """
    inputs = _pipeline(name).component_spec.inputs or {}
    out: dict[str, Any] = {}
    for key, value in arguments.items():
        if key not in inputs:
            known = ", ".join(sorted(inputs))
            raise GraceError(f"pipeline {name} has no parameter {key!r}; it has: {known}")
        want = _TYPES.get(inputs[key].type, object)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif want is str and not isinstance(value, str):
            value = json.dumps(value) if isinstance(value, dict | list) else str(value)
        if not isinstance(value, want):
            raise GraceError(f"pipeline parameter {key}={value!r}: expected {inputs[key].type}")
        shown = redact_value(value)
        if shown != value:
            # KFP prints parameters in task logs and keeps them in the run's spec
            raise GraceError(
                f"pipeline parameter {key}={shown!r} carries credentials; give it"
                f" without them and put the secret in the environment ({GIT_TOKEN_ENV},"
                " AWS_*, MLFLOW_TRACKING_*): Kubernetes secrets on a cluster, README#security"
            )
        _check_settings(name, key, value)
        out[key] = value
    missing = [
        k for k, v in inputs.items() if v.default is None and not v.optional and k not in out
    ]
    if missing:
        raise GraceError(f"pipeline {name} needs parameter(s) {', '.join(missing)}")
    return out


# Dict parameters that become TrainConfig or ReplayConfig fields inside a step.
_TRAIN_SETTINGS = ("memorize_settings", "retrieve_settings", "train_settings")


def _check_settings(name: str, key: str, value: Any) -> None:
    """A settings dict checked now, as its step will read it.

    A typo must not surface only when that step runs, after the steps before it have spent
    their compute.
    """
    from grace.training.config import TrainConfig

    try:
        if key in _TRAIN_SETTINGS:
            TrainConfig.from_dict(value)
        elif key == "replay":
            from grace.training.incremental import ReplayConfig

            ReplayConfig(**value)
    except (TypeError, ValueError) as e:
        raise GraceError(f"pipeline {name} parameter {key}: {e}") from None


def compile_pipeline(
    name: str = "training", out: str | os.PathLike | None = None, image: str | None = None
) -> Path:
    """Write the pipeline's IR YAML (``pipelines/compiled/<name>_pipeline.yaml`` by default).

    Args:
        name: Which pipeline.
        out: Where to write it.
        image: The image every component runs in (what ``make image`` built and pushed);
            default ``GRACE_IMAGE`` as the components were imported with.
    """
    from kfp import compiler

    path = Path(out) if out else COMPILED / f"{name}_pipeline.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", dir=path.parent, delete=False) as tmp:
        pass
    try:
        compiler.Compiler().compile(_pipeline(name), package_path=tmp.name)
        if image:
            _edit_compiled(Path(tmp.name), image=image)
        os.replace(tmp.name, path)
    finally:
        Path(tmp.name).unlink(missing_ok=True)
    return path


def _edit_compiled(path: Path, image: str | None = None, uncached: bool = False) -> None:
    """Edit a compiled pipeline in one read and one write.

    Args:
        path: The compiled YAML (the pipeline spec, then the platform spec).
        image: If given, the image every executor runs.
        uncached: Turn caching off on every task at every depth.
    """
    docs = list(yaml.safe_load_all(path.read_text()))
    spec = docs[0]
    if image:
        for executor in spec["deploymentSpec"]["executors"].values():
            executor["container"]["image"] = image
    if uncached:
        dags = [spec["root"]["dag"], *(c["dag"] for c in spec["components"].values() if "dag" in c)]
        for dag in dags:
            for task in dag.get("tasks", {}).values():
                task["cachingOptions"] = {}  # enableCache false (protobuf JSON leaves false out)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))


def require_tracking(name: str, args: dict[str, Any]) -> None:
    """Refuse a cluster run without a tracking URI.

    It would train untracked, then fail at ``register`` (the registry lives in MLflow), after
    the whole pipeline's compute.
    """
    if not args.get("tracking_uri"):
        raise GraceError(
            f"pipeline {name} registers its model in MLflow: give --tracking-uri (or set"
            " MLFLOW_TRACKING_URI) to a server the cluster reaches"
        )


def run_local(
    arguments: dict[str, Any], work: str | os.PathLike, name: str = "training"
) -> dict[str, Any]:
    """Run a pipeline on this machine with kfp.local's subprocess runner (no Docker needed).

    Every task runs in this Python environment; artifacts go under ``work/pipeline_root``.
    A failing task raises, naming it; the MLflow parent run is marked FAILED by that step.
    """
    from kfp import local

    from grace.workflow.tracking import Tracking, experiment_id

    work = Path(work).resolve()
    root = work / "pipeline_root"
    root.mkdir(parents=True, exist_ok=True)
    uri = arguments.get("tracking_uri", "")
    if uri.startswith("sqlite:"):  # a database store needs its artifact location set up front
        tracking = Tracking(
            uri, arguments.get("experiment", "grace"), (work / "mlartifacts").as_uri()
        )
        experiment_id(tracking)
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root))
    try:
        with warnings.catch_warnings():
            # by design here: tasks run in this environment, not the image, and the cluster's
            # resources, retries and secrets do not apply
            warnings.filterwarnings("ignore", ".*You may be attemping to run", RuntimeWarning)
            warnings.filterwarnings("ignore", r"Task '.*': settings \[", UserWarning)
            with _without_retries(_pipeline(name)) as pipeline:
                task = pipeline(**pipeline_arguments(name, arguments))
    except RuntimeError as e:
        raise GraceError(f"pipeline {name} failed: {e}") from e
    return {"output": task.output, "pipeline_root": str(root)}


@contextmanager
def _without_retries(pipeline: Any) -> Iterator[Any]:
    """``pipeline`` with its tasks' retry policies lifted for the duration (then put back).

    kfp.local honours them, and on one machine a failure is the user's to see at once: bad data
    retried with backoff would only make them wait minutes for the same error. On a cluster
    the retries stay, to wait out a flaky service.
    """
    spec = pipeline.pipeline_spec
    dags = [spec.root.dag, *(c.dag for c in spec.components.values() if c.HasField("dag"))]
    lifted = []
    for dag in dags:
        for task in dag.tasks.values():
            if task.HasField("retry_policy"):
                policy = type(task.retry_policy)()
                policy.CopyFrom(task.retry_policy)
                lifted.append((task, policy))
                task.ClearField("retry_policy")
    try:
        yield pipeline
    finally:
        for task, policy in lifted:
            task.retry_policy.CopyFrom(policy)


def submit(
    host: str,
    arguments: dict[str, Any],
    *,
    name: str = "training",
    experiment: str = "grace",
    run_name: str | None = None,
    namespace: str | None = None,
    image: str | None = None,
) -> str:
    """Start one run on a KFP cluster (caching off: training must really train); its run id.

    The experiment is reused by name, or created; ``image`` as in :func:`compile_pipeline`.
    """
    args = pipeline_arguments(name, arguments)
    require_tracking(name, args)
    run_name = run_name or f"{_pipeline(name).name} {datetime.now():%Y-%m-%d %H-%M-%S}"
    with kfp_api_errors(host), tempfile.TemporaryDirectory() as tmp:
        client = _client(host, namespace)
        result = client.create_run_from_pipeline_package(
            str(_uncached_package(name, Path(tmp), image)),
            arguments=args,
            run_name=run_name,
            experiment_name=experiment,
            namespace=namespace,
            enable_caching=False,
        )
    return result.run_id


def schedule(
    host: str,
    cron: str,
    arguments: dict[str, Any],
    *,
    name: str = "training",
    experiment: str = "grace",
    job_name: str | None = None,
    namespace: str | None = None,
    image: str | None = None,
) -> str:
    """A recurring run on a KFP cluster.

    ``cron`` has six fields, seconds first (KFP's format):
    ``0 0 2 * * *`` is 02:00 daily. One run at a time, no catch-up of missed slots, caching
    off.
    """
    if len(cron.split()) != 6:
        raise GraceError(f"--cron {cron!r}: KFP wants 6 fields (seconds first), e.g. '0 0 2 * * *'")
    args = pipeline_arguments(name, arguments)
    require_tracking(name, args)
    with kfp_api_errors(host), tempfile.TemporaryDirectory() as tmp:
        client = _client(host, namespace)
        exp = client.create_experiment(experiment, namespace=namespace)
        job = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=job_name or f"grace-{name}",
            cron_expression=cron,
            max_concurrency=1,
            no_catchup=True,
            params=args,
            pipeline_package_path=str(_uncached_package(name, Path(tmp), image)),
            enable_caching=False,
        )
    return job.recurring_run_id


def _uncached_package(name: str, folder: Path, image: str | None = None) -> Path:
    """The pipeline compiled with caching off on every task at every depth.

    kfp.Client's ``enable_caching=False`` only reaches the root DAG's tasks: the steps inside a
    ``dsl.If`` or a sub-pipeline (the incremental pipeline's validate and evaluate) would still
    be served from cache.
    """
    path = compile_pipeline(name, folder / f"{name}_pipeline.yaml")
    _edit_compiled(path, image=image, uncached=True)
    return path


def _client(host: str, namespace: str | None) -> Any:
    from kfp import Client

    with warnings.catch_warnings():  # "only works with KFP v2.0.0-beta.2 and later": noise
        warnings.filterwarnings("ignore", "This client only works", FutureWarning)
        return Client(host=host, namespace=namespace)
