"""Pipelines: compiled YAML kept current, arguments checked, cluster calls wired right.

No KFP cluster is reachable here: submit/schedule are checked against a recording client that
stands in for ``kfp.Client`` (the wiring, not the server).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from grace.errors import GraceError
from pipelines import operations
from pipelines.operations import COMPILED, compile_pipeline, pipeline_arguments

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", sorted(operations.pipelines()))
def test_compiled_yaml_is_current(name, tmp_path):
    fresh = compile_pipeline(name, tmp_path / "fresh.yaml").read_text()
    kept = COMPILED / f"{name}_pipeline.yaml"
    assert kept.is_file(), f"run: grace pipeline compile --pipeline {name}"
    # as data: the header comment prints dict defaults in protobuf map order, which varies
    # from process to process; the spec itself must be identical
    same = list(yaml.safe_load_all(kept.read_text())) == list(yaml.safe_load_all(fresh))
    assert same, f"stale {kept}: run grace pipeline compile --pipeline {name}"


def test_training_pipeline_wires_six_steps_with_cluster_resources(tmp_path):
    spec = yaml.safe_load(compile_pipeline("training", tmp_path / "p.yaml").read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {
        "validate-data", "assign-identifiers", "memorize", "retrieve", "evaluate", "register"
    }  # fmt: skip
    assert tasks["memorize"]["dependentTasks"] == ["assign-identifiers", "validate-data"]
    assert tasks["register"]["cachingOptions"] == {}  # caching off
    executors = spec["deploymentSpec"]["executors"]
    for step in ("memorize", "retrieve"):
        resources = executors[f"exec-{step}"]["container"]["resources"]
        assert "train_accelerator_limit" in resources["accelerator"]["resourceCount"]
        assert "train_cpu_limit" in resources["resourceCpuLimit"]
        assert "train_memory_limit" in resources["resourceMemoryLimit"]
    assert "resources" not in executors["exec-evaluate"]["container"]
    assert all(
        e["container"]["image"].startswith(("ghcr.io/", "grace")) for e in executors.values()
    )


def test_arguments_are_cast_and_checked():
    args = pipeline_arguments(
        "training", {"data_repo": "r", "dense_seconds": 5, "memorize_settings": {"epochs": 1}}
    )
    assert args["dense_seconds"] == 5.0 and isinstance(args["dense_seconds"], float)
    with pytest.raises(GraceError, match="no parameter 'nope'.*data_repo"):
        pipeline_arguments("training", {"data_repo": "r", "nope": 1})
    with pytest.raises(GraceError, match="needs parameter.*data_repo"):
        pipeline_arguments("training", {})
    with pytest.raises(GraceError, match="max_queries=.*Integer"):
        pipeline_arguments("training", {"data_repo": "r", "max_queries": "many"})
    with pytest.raises(GraceError, match="unknown pipeline"):
        pipeline_arguments("nope", {})


class RecordingClient:
    """Stands in for kfp.Client: records what would be sent to the KFP API."""

    calls: list = []

    def __init__(self, host, namespace=None):
        self.calls.append(("init", host, namespace))

    def create_run_from_pipeline_func(self, func, **kw):
        self.calls.append(("run", func.name, kw))
        return type("R", (), {"run_id": "run-1"})()

    def create_experiment(self, name, namespace=None):
        self.calls.append(("experiment", name))
        return type("E", (), {"experiment_id": "exp-1"})()

    def create_recurring_run(self, **kw):
        self.calls.append(("recurring", kw, Path(kw["pipeline_package_path"]).read_text()))
        return type("J", (), {"recurring_run_id": "job-1"})()


def test_submit_starts_one_uncached_run():
    RecordingClient.calls = []
    run = operations.submit(
        "http://kfp", {"data_repo": "https://git/x", "data_rev": "v2"},
        run_name="r", client_factory=RecordingClient,
    )  # fmt: skip
    assert run == "run-1"
    (_, host, _), (_, name, kw) = RecordingClient.calls
    assert host == "http://kfp" and name == "grace-training"
    assert kw["enable_caching"] is False and kw["experiment_name"] == "grace"
    assert kw["arguments"] == {"data_repo": "https://git/x", "data_rev": "v2"}


def test_schedule_creates_a_recurring_run_from_compiled_yaml():
    RecordingClient.calls = []
    job = operations.schedule(
        "http://kfp", "0 0 2 * * *", {"data_repo": "https://git/x"},
        client_factory=RecordingClient,
    )  # fmt: skip
    assert job == "job-1"
    _, kw, package = RecordingClient.calls[-1]
    assert kw["cron_expression"] == "0 0 2 * * *" and kw["max_concurrency"] == 1
    assert kw["no_catchup"] is True and kw["experiment_id"] == "exp-1"
    assert "grace-training" in package
    with pytest.raises(GraceError, match="6 fields"):
        operations.schedule("http://kfp", "0 2 * * *", {}, client_factory=RecordingClient)


def test_the_grace_library_never_imports_kfp():
    offenders = []
    for path in (ROOT / "grace").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            if any(n == "kfp" or n.startswith("kfp.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []


def test_pipelines_only_wire_components():
    for path in (ROOT / "pipelines").glob("*_pipeline.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        assert imported <= {"kfp"} | {m for m in imported if m.startswith("components.")}
        # wiring only: every function in the file is a pipeline
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert funcs and all(
            any(getattr(d, "attr", None) == "pipeline" for d in ast.walk(f.decorator_list[0]))
            for f in funcs
        ), path.name
