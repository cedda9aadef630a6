"""The main job end to end: the training pipeline through kfp.local on a real git+DVC repo,
tracked by a real ``mlflow server`` process, registered, gated, searched, served over HTTP and
seen in the MLflow UI by headless Chromium. One pipeline run serves every test here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
from mlflow import MlflowClient
from typer.testing import CliRunner

from grace.cli import app
from grace.constants import DEFAULT_ID_SCHEME
from grace.data.imageset import read_manifest
from grace.data.synth import synthesize
from grace.data.versioning import commit_data
from grace.errors import GraceError
from grace.workflow.model_registry import CHALLENGER, CHAMPION, Gate
from grace.workflow.steps import MANIFEST, StepContext, register
from grace.workflow.tracking import PIPELINE_KEY_TAG, Tracking
from grace_kfp.pipelines.operations import compile_pipeline, run_local
from tests.fixtures.servers import mlflow_server, model_server

pytestmark = pytest.mark.slow

STEPS = ["validate_data", "assign_identifiers", "memorize", "retrieve", "evaluate", "register"]
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}
TINY_TRAIN = {"epochs": 2, "batch_size": 16}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    for k, v in GIT_ENV.items():
        mp.setenv(k, v)
    yield
    mp.undo()


@pytest.fixture(scope="module")
def data_repo(tmp_path_factory, env):
    """A git+DVC repository whose HEAD holds a 16-image set."""
    from dvc.repo import Repo

    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q")
    Repo.init(repo).close()
    synthesize(repo / "data", n=16, seed=5)
    sha = commit_data(repo, message="data: 16 images")
    return repo, sha


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory):
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


@pytest.fixture(scope="module")
def pipeline_run(data_repo, tracking_uri, tmp_path_factory):
    repo, sha = data_repo
    work = tmp_path_factory.mktemp("work")
    args = {
        "data_repo": str(repo),
        "data_rev": "HEAD",
        "memorize_settings": TINY_TRAIN,
        "retrieve_settings": TINY_TRAIN,
        "dense_seconds": 2,
        "min_memorization": 0.0,
        "gate_metric": "grace_R@10",
        "tracking_uri": tracking_uri,
        "experiment": "workflow-test",
    }
    out = run_local(args, work)
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("workflow-test")
    parents = [
        r
        for r in client.search_runs([exp.experiment_id])
        if "mlflow.parentRunId" not in r.data.tags
    ]
    assert len(parents) == 1
    return out, parents[0], client, Path(out["pipeline_root"]), sha


def test_run_tree_has_every_step_with_params_curves_and_artifacts(pipeline_run):
    out, parent, client, _, _ = pipeline_run
    assert out["output"] is True  # first version: no champion to beat, floors are 0
    assert parent.info.status == "FINISHED"
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    by_step = {c.info.run_name: c for c in children}
    assert sorted(by_step) == sorted(STEPS)
    assert all(c.info.status == "FINISHED" for c in children)
    # per-step metrics: loss curves have one point per logged step
    mem = by_step["memorize"]
    assert mem.data.params["retrieve_task"] == "False"
    assert by_step["retrieve"].data.params["retrieve_task"] == "True"
    curve = client.get_metric_history(mem.info.run_id, "loss")
    assert len(curve) >= 1 and all(p.value > 0 for p in curve)

    def files(run) -> set[str]:
        found, todo = set(), [None]
        while todo:
            for f in client.list_artifacts(run.info.run_id, todo.pop()):
                (todo.append(f.path) if f.is_dir else found.add(f.path))
        return found

    assert {"validation/report.html", "validation/result.json"} <= files(by_step["validate_data"])
    assert any(f.endswith(".png") for f in files(mem))
    assert any(f.endswith(".png") for f in files(by_step["retrieve"]))
    assert "identifiers/identifiers.json" in files(by_step["assign_identifiers"])
    assert {"evaluation/report.html", "evaluation/metrics.json"} <= files(by_step["evaluate"])
    assert "registry/decision.json" in files(by_step["register"])
    assert "retrieval_examples.png" in files(parent)


def test_parent_run_has_headline_metrics_lineage_and_revision(pipeline_run):
    _, parent, client, _, sha = pipeline_run
    m = parent.data.metrics
    for name in ("grace_R_at_1", "grace_R_at_10", "dense_R_at_10", "memorization", "promoted"):
        assert name in m, name
    assert 0.0 <= m["grace_R_at_10"] <= 1.0
    assert parent.data.tags["data.revision"] == sha
    assert parent.data.tags[PIPELINE_KEY_TAG]
    inputs = client.get_run(parent.info.run_id).inputs.dataset_inputs
    assert inputs and sha in json.loads(inputs[0].dataset.source)["uri"]


def test_registry_has_champion_with_lineage_tags(pipeline_run, tracking_uri):
    _, _, client, _, sha = pipeline_run
    mv = client.get_model_version_by_alias("grace", CHAMPION)
    assert client.get_model_version_by_alias("grace", CHALLENGER).version == mv.version
    assert mv.tags["data.revision"] == sha
    assert mv.tags["id_scheme"] == DEFAULT_ID_SCHEME  # the pipeline's default
    metrics = json.loads(mv.tags["metrics"])
    assert 0.0 <= metrics["grace_R@10"] <= 1.0


def _model_and_dataset(root: Path) -> tuple[Path, Path, Path]:
    run_dir = next(p for p in root.iterdir() if p.is_dir())
    return (
        run_dir / "retrieve" / "model",
        run_dir / "evaluate" / "metrics_json",
        (run_dir / "validate-data" / "dataset"),
    )


def test_gate_refuses_a_worse_model_then_promotes_a_better_one(
    pipeline_run, tracking_uri, tmp_path
):
    _, _, client, root, _ = pipeline_run
    model, metrics_json, dataset = _model_and_dataset(root)
    champion = client.get_model_version_by_alias("grace", CHAMPION)
    best = json.loads(champion.tags["metrics"])["grace_R@10"]
    ctx = StepContext(Tracking(tracking_uri, "workflow-test"), "gate-test")
    gate = Gate(metric="grace_R@10", tolerance=0.01, min_memorization=0.0)

    worse = {**json.loads(metrics_json.read_text()), "grace_R@10": best - 0.5}
    (tmp_path / "worse.json").write_text(json.dumps(worse))
    refused = register(
        model, tmp_path / "worse.json", dataset, tmp_path / "d1.json", gate=gate, ctx=ctx
    )
    assert refused["promoted"] is False
    assert any("champion" in r and "<" in r for r in refused["reasons"])
    assert client.get_model_version_by_alias("grace", CHAMPION).version == champion.version
    assert client.get_model_version_by_alias("grace", CHALLENGER).version == refused["version"]

    better = {**worse, "grace_R@10": best + 0.1}
    (tmp_path / "better.json").write_text(json.dumps(better))
    promoted = register(
        model, tmp_path / "better.json", dataset, tmp_path / "d2.json", gate=gate, ctx=ctx
    )
    assert promoted["promoted"] is True
    assert client.get_model_version_by_alias("grace", CHAMPION).version == promoted["version"]
    assert json.loads((tmp_path / "d2.json").read_text())["version"] == promoted["version"]


def test_search_cli_uses_the_champion(pipeline_run, tracking_uri):
    _, _, _, root, _ = pipeline_run
    _, _, dataset = _model_and_dataset(root)
    keys = {r.key for r in read_manifest(dataset / MANIFEST)}
    result = CliRunner().invoke(
        app,
        [
            "search",
            "a red circle",
            "a blue square",
            "--k",
            "3",
            "--json",
            "--tracking-uri",
            tracking_uri,
        ],
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 6 and {r["key"] for r in rows} <= keys
    missing = CliRunner().invoke(
        app, ["search", "x", "--model", "models:/nope@champion", "--tracking-uri", tracking_uri]
    )
    assert missing.exit_code == 2 and "models:/nope@champion" in missing.output


def test_champion_is_served_over_http(pipeline_run, tracking_uri, tmp_path):
    _, _, _, root, _ = pipeline_run
    _, _, dataset = _model_and_dataset(root)
    keys = {r.key for r in read_manifest(dataset / MANIFEST)}
    with model_server("models:/grace@champion", tracking_uri, tmp_path / "serve.log") as url:
        body = json.dumps(
            {
                "dataframe_split": {"columns": ["query"], "data": [["a red circle"]]},
                "params": {"k": 4},
            }
        ).encode()
        req = urllib.request.Request(
            f"{url}/invocations", body, {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(req, timeout=120) as r:
            predictions = json.loads(r.read())["predictions"]
    assert [p["rank"] for p in predictions] == [1, 2, 3, 4]
    assert {p["key"] for p in predictions} <= keys
    assert all(p["query"] == "a red circle" for p in predictions)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def _browse(url: str, screenshot: Path) -> str:
    """Render ``url`` in headless Chromium: a screenshot, and the DOM it built."""
    flags = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--no-first-run",
        "--hide-scrollbars",
        "--window-size=1400,1800",
        "--virtual-time-budget=20000",
    ]
    subprocess.run(
        [*flags, f"--screenshot={screenshot}", url], capture_output=True, timeout=120, check=True
    )
    assert screenshot.stat().st_size > 20_000  # a rendered page, not a blank one
    return subprocess.run(
        [*flags, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True
    ).stdout


needs_chromium = pytest.mark.skipif(
    _chromium() is None and not os.environ.get("CI"),  # in CI a missing browser fails the test
    reason="needs Debian's chromium (make test installs it when run as root)",
)


@needs_chromium
def test_mlflow_ui_shows_the_run_and_its_metrics(pipeline_run, tracking_uri, tmp_path):
    _, parent, _, _, _ = pipeline_run
    url = f"{tracking_uri}/#/experiments/{parent.info.experiment_id}/runs/{parent.info.run_id}"
    dom = _browse(url, tmp_path / "run.png")
    assert parent.info.run_name in dom
    for metric in ("grace_R_at_10", "memorization"):
        assert metric in dom, metric


@needs_chromium
def test_mlflow_ui_shows_the_champion_version(pipeline_run, tracking_uri, tmp_path):
    _, _, client, _, _ = pipeline_run
    champion = client.get_model_version_by_alias("grace", CHAMPION)
    dom = _browse(f"{tracking_uri}/#/models/grace", tmp_path / "model.png")
    assert f"Version {champion.version}" in dom
    for alias in (CHAMPION, CHALLENGER):  # alias tags of the versions table
        assert f'title="{alias}" data-component-id="codegen_mlflow_app_src_model-registry' in dom


def test_pipeline_stops_at_validation_on_bad_data(tracking_uri, tmp_path, capfd):
    bad = tmp_path / "bad"
    synthesize(bad, n=6, seed=2)
    broken = ["00001.png", "00003.png", "00004.png"]
    for name in broken:
        (bad / "images" / name).write_bytes(b"not a png")
    retries = "maxRetryCount" in compile_pipeline("training", tmp_path / "a.yaml").read_text()
    assert retries  # the pipeline has them (for the cluster): the local run must not use them
    with pytest.raises(GraceError, match="validate-data"):
        run_local(
            {
                "data_repo": str(bad),
                "data_rev": "",
                "tracking_uri": tracking_uri,
                "experiment": "bad-data",
            },
            tmp_path / "work",
        )
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name("bad-data")
    runs = client.search_runs([exp.experiment_id])
    names = {r.info.run_name: r for r in runs}
    assert "validate_data" in names and "memorize" not in names
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.info.status == "FAILED"
    assert names["validate_data"].info.status == "FAILED"
    log = "".join(capfd.readouterr())  # the task's log: every problem, and no traceback
    assert all(f"images/{name}" in log for name in broken), log[-3000:]
    assert log.count("the task stopped on 3 problem(s)") == 1  # not retried on one machine
    assert "Traceback" not in log
    after = compile_pipeline("training", tmp_path / "b.yaml").read_text()
    assert after == (tmp_path / "a.yaml").read_text()  # the retries are back for the cluster
