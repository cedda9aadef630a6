"""Each KFP component's python function, called directly with artifacts in a temp folder.

The same functions run through kfp.local in tests/test_workflow.py (the whole pipeline, and the
pipeline stopping at validate_data); here each one is checked on its own, in order.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kfp.dsl import HTML, Artifact, Dataset, Metrics, Model

from grace.data.imageset import scan_image_set
from grace.data.synth import synthesize
from grace.errors import InvalidInputError
from grace.identifiers import IdentifierMap
from grace.retrieval.retriever import GraceRetriever
from grace.workflow.tracking import local_store
from grace_kfp.components.assign_identifiers import assign_identifiers
from grace_kfp.components.evaluate import evaluate
from grace_kfp.components.memorize import memorize
from grace_kfp.components.register import register
from grace_kfp.components.retrieve import retrieve
from grace_kfp.components.validate_data import validate_data

pytestmark = pytest.mark.slow
TRAIN = {"epochs": 1, "batch_size": 16}
ZERO2 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
    """Every component in pipeline order; each test reads what the chain produced."""
    tmp = tmp_path_factory.mktemp("components")
    synthesize(tmp / "src", n=10, seed=4)
    tracking = local_store(tmp / "mlflow", experiment="components")
    track = {"tracking_uri": tracking.uri, "experiment": "components", "pipeline_key": "unit"}

    def art(cls, name):
        return cls(name=name, uri=str(tmp / name), metadata={})

    out = {name: art(cls, name) for name, cls in [
        ("dataset", Dataset), ("report", HTML), ("result", Artifact), ("ids", Artifact),
        ("memorized", Model), ("model", Model), ("metrics", Metrics), ("metrics_json", Artifact),
        ("eval_report", HTML), ("decision", Artifact),
    ]}  # fmt: skip
    from grace.workflow.tracking import experiment_id

    experiment_id(tracking)  # a SQLite store gets its artifact location up front
    out["revision"] = validate_data.python_func(
        source=str(tmp / "src"), rev="", data_dir="data", min_images=1, dataset=out["dataset"],
        report=out["report"], result=out["result"], **track,
    )  # fmt: skip
    assign_identifiers.python_func(
        dataset=out["dataset"], scheme="numeric", scheme_params={}, embedder_seconds=1.0,
        identifiers=out["ids"], **track,
    )  # fmt: skip
    memorize.python_func(
        dataset=out["dataset"], identifiers=out["ids"], backbone="tiny", settings=TRAIN,
        model=out["memorized"], **track,
    )  # fmt: skip
    retrieve.python_func(
        dataset=out["dataset"], identifiers=out["ids"], memorized=out["memorized"],
        settings=TRAIN, model=out["model"], **track,
    )  # fmt: skip
    evaluate.python_func(
        dataset=out["dataset"], model=out["model"], gallery="all", num_beams=4, dense_seconds=1.0,
        max_queries=5, metrics=out["metrics"], metrics_json=out["metrics_json"],
        report=out["eval_report"], **track,
    )  # fmt: skip
    out["promoted"] = register.python_func(
        model=out["model"], metrics_json=out["metrics_json"], dataset=out["dataset"],
        model_name="unit", gate_metric="grace_R@10", gate_tolerance=0.01, min_memorization=0.0,
        decision=out["decision"], **track,
    )  # fmt: skip
    out["src"] = tmp / "src"
    return out


def test_validate_data_materializes_the_set_and_its_report(steps):
    ds = Path(steps["dataset"].path)
    assert {p.name for p in ds.iterdir()} >= {"images", "captions.jsonl", "manifest.parquet"}
    assert steps["revision"] == "folder" and steps["dataset"].metadata["images"] == 10
    assert "PASSED" in Path(steps["report"].path).read_text()
    assert json.loads(Path(steps["result"].path).read_text())["summary"]["success"] is True


def refused_by_validate_data(source: Path, rev: str, tmp_path: Path) -> list:
    """The problems validate_data refuses ``source`` at ``rev`` with (report in tmp_path)."""
    dataset = Dataset(name="dataset", uri=str(tmp_path / "ds"), metadata={})
    with pytest.raises(InvalidInputError) as err:
        validate_data.python_func(
            source=str(source), rev=rev, data_dir="data", min_images=1, dataset=dataset,
            report=HTML(name="r", uri=str(tmp_path / "r.html"), metadata={}),
            result=Artifact(name="j", uri=str(tmp_path / "r.json"), metadata={}),
            tracking_uri="", experiment="x", pipeline_key="k",
        )  # fmt: skip
    return err.value.problems


def test_validate_data_refuses_bad_rows_and_leaves_no_dataset(tmp_path):
    synthesize(tmp_path / "bad", n=4, seed=1)
    bad_row = len((tmp_path / "bad" / "captions.jsonl").read_text().splitlines()) + 1
    with open(tmp_path / "bad" / "captions.jsonl", "a") as f:
        f.write('{"image": "../../etc/passwd", "caption": "x"}\n')
    problems = refused_by_validate_data(tmp_path / "bad", "", tmp_path)
    assert [(p.row, p.rule) for p in problems] == [(bad_row, "inside-images")]
    assert not (tmp_path / "ds").exists()
    assert "FAILED" in (tmp_path / "r.html").read_text()


def test_validate_data_copies_links_as_links_and_refuses_them(tmp_path):
    synthesize(tmp_path / "src", n=4, seed=1)
    synthesize(tmp_path / "elsewhere", n=2, seed=9)
    (tmp_path / "src" / "images" / "more").symlink_to(tmp_path / "elsewhere" / "images")
    problems = refused_by_validate_data(tmp_path / "src", "", tmp_path)
    assert [(Path(p.file).name, p.rule) for p in problems] == [("more", "no-symlinks")]
    assert not (tmp_path / "ds").exists()


def test_validate_data_of_a_bad_revision_reports_it_by_repo_path(tmp_path, monkeypatch):
    import subprocess

    from dvc.repo import Repo

    from grace.data.versioning import commit_data

    for var in ("GIT_AUTHOR_NAME", "GIT_COMMITTER_NAME", "GIT_AUTHOR_EMAIL", "GIT_COMMITTER_EMAIL"):
        monkeypatch.setenv(var, "t@t")
    repo = tmp_path / "repo"
    repo.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    Repo.init(repo).close()
    synthesize(repo / "data", n=4, seed=1)
    bad_row = len((repo / "data" / "captions.jsonl").read_text().splitlines()) + 1
    with open(repo / "data" / "captions.jsonl", "a") as f:
        f.write('{"image": "missing.png", "caption": "x"}\n')
    rev = commit_data(repo)  # committed without validation, as another tool might
    problems = refused_by_validate_data(repo, rev, tmp_path)
    named = f"{repo}@{rev}:data/captions.jsonl"
    assert [(p.file, p.row) for p in problems] == [(named, bad_row)]
    report = (tmp_path / "r.html").read_text()
    assert "FAILED" in report and named in report and str(tmp_path / "ds") not in report
    assert json.loads((tmp_path / "r.json").read_text())["problems"][0]["file"] == named
    assert not (tmp_path / "ds").exists()


def test_assign_identifiers_gives_every_image_one_id(steps):
    ids = IdentifierMap.load(steps["ids"].path)
    keys = {r.key for r in scan_image_set(steps["src"])}
    assert set(ids.ids) == keys and steps["ids"].metadata["identifiers"] == 10


def test_training_components_chain_memorize_into_retrieve(steps):
    assert steps["memorized"].metadata["stage"] == "memorize"
    assert steps["model"].metadata["stage"] == "retrieve" and steps["model"].metadata["steps"] > 0
    gm = GraceRetriever.load(steps["model"].path)
    assert gm.info["train_config"]["retrieve_task"] is True
    assert gm.info["train_config"]["backbone"] == steps["memorized"].path


def test_evaluate_logs_kfp_metrics_and_writes_report(steps):
    written = json.loads(Path(steps["metrics_json"].path).read_text())
    assert steps["metrics"].metadata == pytest.approx(written)
    assert {"grace_R@10", "dense_R@10", "memorization"} <= set(written)
    assert "GRACE evaluation" in Path(steps["eval_report"].path).read_text()


def test_register_returns_the_gate_decision(steps):
    decision = json.loads(Path(steps["decision"].path).read_text())
    assert steps["promoted"] is decision["promoted"] is True
    assert steps["decision"].metadata == {"version": decision["version"], "promoted": True}


def test_memorize_trains_in_two_processes_and_logs_rank_zeros_curve(steps, tmp_path, monkeypatch):
    """The component's ``processes`` option: two data-parallel ranks (DeepSpeed ZeRO-2 on gloo),
    rank 0's loss relayed live to the step's MLflow run, one model written. A fresh SQLite store
    named only by its URI keeps its artifacts beside the database, not in ./mlruns."""
    from mlflow import MlflowClient

    from grace.workflow.tracking import PIPELINE_KEY_TAG

    monkeypatch.chdir(tmp_path)
    uri = local_store(tmp_path / "mlflow", experiment="dp").uri  # no experiment created yet
    model = Model(name="memorized", uri=str(tmp_path / "memorized"), metadata={})
    settings = {
        **TRAIN, "epochs": 2, "batch_size": 4, "deepspeed": str(ZERO2),
        "lite.hidden": 64, "lite.layers": 1, "lite.heads": 2, "lite.vocab_size": 400,
    }  # fmt: skip
    memorize.python_func(
        dataset=steps["dataset"], identifiers=steps["ids"], backbone="lite", settings=settings,
        model=model, processes=2, tracking_uri=uri, experiment="dp", pipeline_key="dp",
    )  # fmt: skip
    gm = GraceRetriever.load(model.path)
    assert gm.info["world_size"] == 2 and gm.info["complete"]
    assert model.metadata["steps"] == gm.info["steps"] > 0
    client = MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("dp").experiment_id],
        f"tags.`{PIPELINE_KEY_TAG}` = 'dp/memorize'",
    )
    curve = [m.step for m in client.get_metric_history(run.info.run_id, "loss")]
    assert curve[0] == 1 and curve[-1] == gm.info["steps"]
    assert run.info.artifact_uri.startswith((tmp_path / "mlflow" / "artifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()
