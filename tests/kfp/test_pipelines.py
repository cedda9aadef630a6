"""Pipelines: compiled YAML kept current, arguments checked, cluster calls wired right.

No KFP cluster is reachable here. submit and schedule run the real ``kfp.Client`` over HTTP
against a stand-in for the KFP v2beta1 REST API (``tests/kfp_api_standin.py``, on 127.0.0.1):
the tests check what an API server receives (endpoints, experiment, run name, the inline
pipeline spec, runtime parameters, caching, the recurring run's trigger) and how its errors
reach a user. What a cluster does with the run (Argo, the drivers, the pods) is not tested.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from grace.cli import app
from grace.errors import GraceError
from grace_kfp.pipelines import operations
from grace_kfp.pipelines.operations import COMPILED, compile_pipeline, pipeline_arguments
from tests.fixtures.kfp_api_standin import KfpApiStandIn, cached_tasks
from tests.fixtures.servers import BIN, free_port

ROOT = Path(__file__).resolve().parents[2]
TRACKED = {"tracking_uri": "http://mlflow.mlflow:5000"}  # a cluster run must be tracked


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
    spec = next(yaml.safe_load_all(compile_pipeline("training", tmp_path / "p.yaml").read_text()))
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
    light = executors["exec-evaluate"]["container"]["resources"]  # fixed, not parameters
    assert (light["resourceCpuRequest"], light["resourceMemoryLimit"]) == ("1", "8G")
    assert all(
        e["container"]["image"].startswith(("ghcr.io/", "grace")) for e in executors.values()
    )


@pytest.mark.parametrize("name", sorted(operations.pipelines()))
def test_every_task_reads_credentials_from_the_named_secret_only(name, tmp_path):
    from grace_kfp.pipelines.task_settings import CREDENTIAL_ENV, DEFAULT_SECRET

    text = compile_pipeline(name, tmp_path / "p.yaml").read_text()
    pipeline, platform = yaml.safe_load_all(text)
    executors = pipeline["deploymentSpec"]["executors"]
    secrets = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert set(secrets) == set(executors)  # every task, none forgotten
    for exe in secrets.values():
        (secret,) = exe["secretAsEnv"]
        assert secret["optional"] is True  # a cluster without the Secret still runs
        assert secret["secretNameParameter"]["componentInputParameter"].endswith(
            "credentials_secret"
        )
        assert {k["envVar"] for k in secret["keyToEnv"]} == set(CREDENTIAL_ENV)
    params = pipeline["root"]["inputDefinitions"]["parameters"]
    assert params["credentials_secret"]["defaultValue"] == DEFAULT_SECRET


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


def test_a_typo_in_a_settings_dict_is_refused_before_any_step_runs():
    with pytest.raises(GraceError, match="memorize_settings.*unknown training settings.*epoch"):
        pipeline_arguments("training", {"data_repo": "r", "memorize_settings": {"epoch": 3}})
    with pytest.raises(GraceError, match="replay"):
        pipeline_arguments("incremental", {"data_repo": "r", "replay": {"minimun": 8}})
    ok = {"data_repo": "r", "retrieve_settings": {"epochs": 3, "lite.hidden": 128}}
    assert pipeline_arguments("training", ok)["retrieve_settings"]["epochs"] == 3


@pytest.mark.parametrize(
    "arguments",
    [
        {"data_repo": "https://ghp_s3cret@github.com/team/images.git"},
        {"data_repo": "r", "tracking_uri": "http://admin:s3cret@mlflow:5000"},
        {"data_repo": "r", "scheme_params": {"embedder": "https://x.example/?token=s3cret"}},
    ],
)
def test_arguments_with_credentials_are_refused_before_kfp_sees_them(arguments):
    """KFP prints parameters in its task logs and keeps them in the run spec."""
    with pytest.raises(GraceError, match="carries credentials") as e:
        pipeline_arguments("training", arguments)
    assert "s3cret" not in str(e.value) and "GRACE_GIT_TOKEN" in str(e.value)


TRAINING_STEPS = {
    "validate-data", "assign-identifiers", "memorize", "retrieve", "evaluate", "register"
}  # fmt: skip
EXPERIMENTS = "/apis/v2beta1/experiments"


def by_name(name: str) -> list[dict]:
    """The filter kfp.Client lists experiments with to find one by name."""
    return [{"operation": 1, "key": "display_name", "stringValue": name}]  # 1: EQUALS


def test_submit_sends_the_training_pipeline_uncached_with_our_arguments(kfp_api):
    args = {"data_repo": "https://git/x", "data_rev": "v2", "dense_seconds": 45,
            "memorize_settings": {"epochs": 1}, **TRACKED}  # fmt: skip
    run = operations.submit(kfp_api.url, args, run_name="nightly")
    calls = [(r.method, r.path) for r in kfp_api.requests]
    assert calls == [
        ("GET", "/apis/v2beta1/healthz"),  # kfp.Client's multi-user probe
        ("GET", EXPERIMENTS),
        ("POST", EXPERIMENTS),  # "grace" did not exist yet
        ("POST", "/apis/v2beta1/runs"),
    ]
    assert json.loads(kfp_api.requests[1].query["filter"][0])["predicates"] == by_name("grace")
    (experiment,) = kfp_api.experiments.values()
    assert experiment["display_name"] == "grace"
    (body,) = kfp_api.bodies("POST", "/runs")
    assert body["experiment_id"] == experiment["experiment_id"]
    assert body["display_name"] == "nightly"
    spec = body["pipeline_spec"]["pipeline_spec"]  # beside the platform spec (the secrets)
    assert spec["pipelineInfo"]["name"] == "grace-training"
    assert set(spec["root"]["dag"]["tasks"]) == TRAINING_STEPS
    assert "secretAsEnv" in str(body["pipeline_spec"]["platform_spec"])
    params = body["runtime_config"]["parameters"]
    assert params == {**args, "dense_seconds": 45.0} and isinstance(params["dense_seconds"], float)
    assert cached_tasks(body["pipeline_spec"]) == []
    assert run == kfp_api.requests[-1].answer["run_id"]


def test_a_cluster_run_without_tracking_is_refused_before_the_server_sees_it(kfp_api):
    for call in (
        lambda: operations.submit(kfp_api.url, {"data_repo": "r"}),
        lambda: operations.schedule(kfp_api.url, "0 0 2 * * *", {"data_repo": "r"}),
    ):
        with pytest.raises(GraceError, match="--tracking-uri"):
            call()
    assert kfp_api.requests == []


@pytest.mark.parametrize("name", sorted(operations.pipelines()))
def test_compiled_for_an_image_every_task_runs_it_with_resources_and_retries(name, tmp_path):
    image = "registry.example.com/team/grace:0.1.0-abc1234"
    pipeline, _ = yaml.safe_load_all(compile_pipeline(name, tmp_path / "p.yaml", image).read_text())
    executors = pipeline["deploymentSpec"]["executors"]
    for exe in executors.values():
        resources = exe["container"]["resources"]
        assert exe["container"]["image"] == image
        for field in ("resourceCpuRequest", "resourceCpuLimit", "resourceMemoryRequest",
                      "resourceMemoryLimit"):  # fmt: skip
            assert resources[field], field  # none runs BestEffort
    components = pipeline["components"]
    dags = [pipeline["root"]["dag"], *(c["dag"] for c in components.values() if "dag" in c)]
    steps = [t for d in dags for t in d["tasks"].values()
             if "executorLabel" in components[t["componentRef"]["name"]]]  # fmt: skip
    assert len(steps) == len(executors)
    assert all(int(t["retryPolicy"]["maxRetryCount"]) == 2 for t in steps)


def test_a_second_submit_reuses_the_experiment_by_name(kfp_api):
    first = operations.submit(kfp_api.url, {"data_repo": "r", **TRACKED}, experiment="team-a")
    second = operations.submit(kfp_api.url, {"data_repo": "r", **TRACKED}, experiment="team-a")
    assert first != second
    assert len(kfp_api.bodies("POST", "/experiments")) == 1
    (experiment,) = kfp_api.experiments.values()
    runs = kfp_api.bodies("POST", "/runs")
    assert [r["experiment_id"] for r in runs] == [experiment["experiment_id"]] * 2
    # no run name given: the pipeline's name and the time, as kfp itself would name it
    assert all(r["display_name"].startswith("grace-training 20") for r in runs)


def test_the_incremental_pipeline_is_submitted_uncached_at_every_depth(kfp_api):
    """kfp.Client's enable_caching=False reaches only the root DAG; the incremental pipeline's
    steps sit inside a dsl.If and a sub-pipeline."""
    operations.submit(kfp_api.url, {"data_repo": "r", **TRACKED}, name="incremental")
    (body,) = kfp_api.bodies("POST", "/runs")
    spec = body["pipeline_spec"]["pipeline_spec"]
    nested = [c for c in spec["components"].values() if c.get("dag", {}).get("tasks")]
    assert nested and "validate-data" in str(nested)  # there is something below the root
    assert spec["pipelineInfo"]["name"] == "grace-incremental"
    assert cached_tasks(spec) == []


def test_schedule_creates_a_recurring_run_one_at_a_time_without_catchup(kfp_api):
    kfp_api.experiments["e-1"] = {"experiment_id": "e-1", "display_name": "grace"}
    job = operations.schedule(kfp_api.url, "0 0 2 * * *", {"data_repo": "https://git/x", **TRACKED})
    assert kfp_api.bodies("POST", "/experiments") == []  # found by name, reused
    (body,) = kfp_api.bodies("POST", "/recurringruns")
    assert body["experiment_id"] == "e-1" and body["display_name"] == "grace-training"
    assert body["trigger"] == {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    assert body["mode"] == "ENABLE"
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "grace-training"
    assert body["runtime_config"]["parameters"] == {"data_repo": "https://git/x", **TRACKED}
    assert cached_tasks(body["pipeline_spec"]) == []
    assert job == kfp_api.requests[-1].answer["recurring_run_id"]
    kfp_api.requests.clear()
    with pytest.raises(GraceError, match="6 fields"):
        operations.schedule(kfp_api.url, "0 2 * * *", {"data_repo": "r", **TRACKED})
    assert kfp_api.requests == []  # refused before asking the server


def test_the_standin_refuses_what_a_kfp_api_server_refuses(tmp_path):
    """So that the stand-in accepting our requests means something."""
    spec = next(yaml.safe_load_all(compile_pipeline("training", tmp_path / "p.yaml").read_text()))
    standin = KfpApiStandIn(experiments={"e": {"experiment_id": "e", "display_name": "g"}})
    ok = {"experiment_id": "e", "display_name": "r", "pipeline_spec": spec,
          "runtime_config": {"parameters": {"data_repo": "r"}}}  # fmt: skip

    def status(path: str, **changes) -> int:
        return standin.answer("POST", f"/apis/v2beta1{path}", {}, {**ok, **changes})[0]

    assert status("/runs") == 200
    assert status("/runs", experiment_id="nope") == 404
    assert status("/runs", runtime_config={"parameters": {}}) == 400  # data_repo is required
    assert status("/runs", runtime_config={"parameters": {"data_repo": "r", "x": 1}}) == 400
    wrong_type = {"data_repo": "r", "max_queries": "many"}
    assert status("/runs", runtime_config={"parameters": wrong_type}) == 400
    assert status("/runs", pipeline_spec={**spec, "rooot": {}}) == 400
    cron = {"cron_schedule": {"cron": "0 0 2 * * *"}}
    assert status("/recurringruns", trigger=cron, max_concurrency=1) == 200
    assert status("/recurringruns", trigger={"cron_schedule": {"cron": "0 2 * * *"}}) == 400
    assert status("/recurringruns", trigger=cron, max_concurrency=11) == 400


def test_server_errors_are_one_line_naming_the_host(kfp_api):
    kfp_api.failures[("POST", "/apis/v2beta1/runs")] = (500, "database is locked")
    with pytest.raises(GraceError) as got:
        operations.submit(kfp_api.url, {"data_repo": "r", **TRACKED})
    assert str(got.value) == (
        f"the KFP API at {kfp_api.url} refused: HTTP 500 Internal Server Error: database is locked"
    )
    kfp_api.failures[("GET", EXPERIMENTS)] = (403, "user is not allowed in namespace")
    with pytest.raises(GraceError, match=f"{kfp_api.url} refused: HTTP 403.*not allowed"):
        operations.schedule(kfp_api.url, "0 0 2 * * *", {"data_repo": "r", **TRACKED})
    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(GraceError, match=f"cannot reach the KFP API at {nobody}"):
        operations.submit(nobody, {"data_repo": "r", **TRACKED})


def test_cli_submit_as_a_user_runs_it(kfp_api, tmp_path):
    env = {**os.environ, "HOME": str(tmp_path), "MLFLOW_TRACKING_URI": "http://mlflow:5000"}
    cmd = [
        str(BIN / "grace"), "pipeline", "submit", "--host", kfp_api.url,
        "--data-repo", "https://git/x", "--rev", "v3", "--experiment", "team-a",
        "--run-name", "by-hand", "-p", "dense_seconds=45",
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (body,) = kfp_api.bodies("POST", "/runs")
    (run,) = [line for line in done.stdout.splitlines() if line.startswith("submitted run ")]
    assert run.split()[-1] == kfp_api.requests[-1].answer["run_id"]
    assert [e["display_name"] for e in kfp_api.experiments.values()] == ["team-a"]
    assert body["display_name"] == "by-hand"
    assert body["runtime_config"]["parameters"] == {
        "data_repo": "https://git/x", "data_rev": "v3", "dense_seconds": 45.0,
        "tracking_uri": "http://mlflow:5000",
    }  # fmt: skip
    assert "Traceback" not in done.stderr and "FutureWarning" not in done.stderr


def test_cli_schedule_and_a_refusing_server(kfp_api):
    runner = CliRunner(env={"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    ok = runner.invoke(app, [
        "pipeline", "schedule", "--host", kfp_api.url, "--cron", "0 30 1 * * 1-5",
        "--data-repo", "https://git/x", "--job-name", "weekdays",
    ])  # fmt: skip
    assert ok.exit_code == 0, ok.output
    (body,) = kfp_api.bodies("POST", "/recurringruns")
    assert body["display_name"] == "weekdays"
    assert body["trigger"]["cron_schedule"]["cron"] == "0 30 1 * * 1-5"
    assert body["runtime_config"]["parameters"]["data_rev"] == "main"
    kfp_api.failures[("POST", "/apis/v2beta1/recurringruns")] = (503, "unavailable")
    bad = runner.invoke(app, [
        "pipeline", "schedule", "--host", kfp_api.url, "--cron", "0 0 2 * * *",
        "--data-repo", "https://git/x",
    ])  # fmt: skip
    assert bad.exit_code == 2 and bad.exception is not None  # typer.Exit, not an ApiException
    assert f"error: the KFP API at {kfp_api.url} refused: HTTP 503" in bad.output


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


def test_every_entry_point_defaults_to_the_same_identifier_scheme():
    """``grace ids assign``, the training pipeline and ``make demo`` assign the one default."""
    import inspect

    from grace.cli.ids import ids_assign
    from grace.constants import DEFAULT_ID_SCHEME
    from grace_kfp.pipelines.demo import demo_arguments
    from grace_kfp.pipelines.training_pipeline import training_pipeline

    pipeline = training_pipeline.pipeline_func
    assert inspect.signature(pipeline).parameters["id_scheme"].default == DEFAULT_ID_SCHEME
    assert inspect.signature(ids_assign).parameters["scheme"].default == DEFAULT_ID_SCHEME
    demo = demo_arguments(ROOT, "", ROOT / "data", "sqlite:///x.db", 60.0)
    assert demo["id_scheme"] == DEFAULT_ID_SCHEME == "structured"


def test_pipelines_only_wire_components():
    for path in (ROOT / "pipelines").glob("*_pipeline.py"):
        tree = ast.parse(path.read_text())
        imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
        wiring = {"kfp", "grace_kfp.pipelines.task_settings"}  # secrets are wiring too
        assert imported <= wiring | {m for m in imported if m.startswith("grace_kfp.components.")}
        # wiring only: every function in the file is a pipeline
        funcs = [n for n in tree.body if isinstance(n, ast.FunctionDef)]
        assert funcs and all(
            any(getattr(d, "attr", None) == "pipeline" for d in ast.walk(f.decorator_list[0]))
            for f in funcs
        ), path.name
