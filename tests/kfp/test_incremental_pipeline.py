"""The incremental pipeline end to end: a champion trained on revision 1 of a real git+DVC repo,
revision 2 removes one image and adds four, ``incremental_pipeline`` runs through kfp.local
against a real ``mlflow server``; then the same revision again takes the no-op branch."""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
from mlflow import MlflowClient

from grace.data.imageset import CAPTIONS_FILE, read_manifest
from grace.data.synth import synthesize
from grace.data.versioning import commit_data
from grace.retrieval.retriever import GraceRetriever
from grace.workflow import steps
from grace.workflow.model_registry import CHAMPION, Gate, IncrementalGate, download_grace_model
from grace.workflow.tracking import Tracking
from grace_kfp.pipelines.operations import run_local
from tests.fixtures.servers import mlflow_server
from tests.fixtures.training import SMALL_BACKBONE

pytestmark = pytest.mark.slow
EXPERIMENT = "incremental-test"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}
TRAIN = {
    "tiny": asdict(SMALL_BACKBONE),
    "epochs": 30,
    "batch_size": 16,
    "lr": 3e-3,
    "warmup_steps": 3,
    "describe_task": False,
    "caption_task": False,
    "checkpoint_every": 0,
    "num_threads": 1,
}


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def put_images(staging: Path, names: list[str], data: Path) -> None:
    """``data`` becomes the staged images ``names`` and their caption rows only."""
    shutil.rmtree(data, ignore_errors=True)
    (data / "images").mkdir(parents=True)
    for n in names:
        shutil.copyfile(staging / "images" / n, data / "images" / n)
    rows = [
        line
        for line in (staging / CAPTIONS_FILE).read_text().splitlines()
        if json.loads(line)["image"] in names
    ]
    (data / CAPTIONS_FILE).write_text("\n".join(rows) + "\n")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """(repo, rev1, rev2, tracking uri, champion version): the champion trained on rev1."""
    from dvc.repo import Repo

    mp = pytest.MonkeyPatch()
    for k, v in GIT_ENV.items():
        mp.setenv(k, v)
    tmp = tmp_path_factory.mktemp("incremental_pipeline")
    staging = tmp / "staging"
    synthesize(staging, n=20, seed=7, test_fraction=0.25)
    names = sorted(p.name for p in (staging / "images").iterdir())
    repo = tmp / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    Repo.init(repo).close()
    put_images(staging, names[:16], repo / "data")
    rev1 = commit_data(repo, message="data: 16 images")
    put_images(staging, names[1:], repo / "data")  # one removed, four added
    rev2 = commit_data(repo, message="data: -1 +4 images")
    with mlflow_server(tmp / "mlflow") as uri:
        ctx = steps.StepContext(Tracking(uri, EXPERIMENT), "base")
        w = tmp / "base"
        steps.validate_data(
            str(repo), rev1, w / "data", w / "r.html", w / "r.json", ctx=ctx
        )  # fmt: skip
        steps.assign_identifiers(w / "data", w / "ids.json", scheme="numeric", ctx=ctx)
        steps.memorize(w / "data", w / "ids.json", w / "model", settings=TRAIN, ctx=ctx)
        steps.evaluate(w / "data", w / "model", w / "m.json", w / "m.html", dense_seconds=0,
                       ctx=ctx)  # fmt: skip
        reg = steps.register(w / "model", w / "m.json", w / "data", w / "d.json",
                             gate=Gate(min_memorization=0.0), ctx=ctx)  # fmt: skip
        assert reg["promoted"]
        yield repo, rev1, rev2, uri, reg["version"], tmp
    mp.undo()


@pytest.fixture(scope="module")
def incremental_run(world):
    repo, _, rev2, uri, _, tmp = world
    args = {
        "data_repo": str(repo),
        "data_rev": rev2,
        "train_settings": {**{k: v for k, v in TRAIN.items() if k != "tiny"}, "epochs": 8,
                           "lr": 1e-3},
        "replay": {"ratio": 1.0, "minimum": 4},
        "min_new_memorization": 0.0,
        "old_tolerance": 1.0,
        "tracking_uri": uri,
        "experiment": EXPERIMENT,
    }  # fmt: skip
    out = run_local(args, tmp / "work1", "incremental")
    return out, args


def parent_runs(client: MlflowClient) -> list:
    exp = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def test_incremental_run_registers_a_version_linked_to_its_base(world, incremental_run):
    _, _, rev2, uri, base_version, tmp = world
    out, _ = incremental_run
    assert out["output"] is True  # floors at 0 and a tolerance of 1: promoted
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("grace", CHAMPION)
    assert int(champion.version) == int(base_version) + 1
    tags = champion.tags
    assert tags["data.revision"] == rev2
    assert tags["base_model"] == f"models:/grace/{base_version}"
    assert tags["incremental"] == "true"

    parent = parent_runs(client)[-1]
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["grace.base_model_version"] == f"grace/{base_version}"
    m = parent.data.metrics
    for key in (
        "old_grace_R_at_10",
        "new_grace_R_at_10",
        "base_old_grace_R_at_10",
        "old_memorization",
        "new_memorization",
        "old_grace_R_at_10_change",
        "old_whole_gallery_grace_R_at_10",  # beside the gate's old-gallery comparison
        "old_whole_gallery_grace_R_at_10_change",
        "old_whole_gallery_memorization",
    ):
        assert key in m, key  # fmt: skip
    assert m["images_added"] == 4 and m["images_removed"] == 1 and m["changes"] == 5
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert {c.info.run_name for c in children} == {
        "diff_data", "validate_data", "incremental_train", "evaluate_incremental", "register"
    }  # fmt: skip
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert "old_vs_new_recall.png" in arts
    run_dir = next(p for p in Path(out["pipeline_root"]).iterdir() if p.is_dir())
    report = (run_dir / "evaluate-incremental" / "report").read_text()
    assert "old images (old gallery)" in report and "old images (whole gallery)" in report

    # the registered model: old ids kept, the removed image's id retired, never answered
    base_map = GraceRetriever.load(download_grace_model("grace", base_version, tmp / "b")).id_map
    new = GraceRetriever.load(download_grace_model("grace", champion.version, tmp / "c"))
    removed = set(base_map.ids) - set(new.id_map.ids)
    assert len(removed) == 1 and removed <= set(new.id_map.retired)
    for key in set(base_map.ids) & set(new.id_map.ids):
        assert new.id_map.ids[key] == base_map.ids[key]
    hits = new.retrieve(["a red circle", "a green square on a gray background"], k=19,
                        num_beams=19)  # fmt: skip
    assert not removed & {h.key for row in hits for h in row}


def test_same_revision_again_takes_the_no_op_branch(world, incremental_run):
    _, _, _, uri, _, tmp = world
    client = MlflowClient(uri)
    before = client.get_model_version_by_alias("grace", CHAMPION).version
    _, args = incremental_run
    out = run_local(args, tmp / "work2", "incremental")  # the champion is now on rev2
    assert out["output"] is False
    parent = parent_runs(client)[-1]
    assert parent.data.tags.get("grace.noop") == "true"
    assert parent.info.status == "FINISHED"
    steps_run = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert {c.info.run_name for c in steps_run} == {"diff_data", "no_change"}
    assert client.get_model_version_by_alias("grace", CHAMPION).version == before


def test_an_old_image_regression_beyond_tolerance_blocks_promotion(world, incremental_run):
    _, _, _, uri, _, tmp = world
    out, _ = incremental_run
    root = Path(out["pipeline_root"])
    run_dir = next(p for p in root.iterdir() if p.is_dir())
    model = run_dir / "incremental-train" / "model"
    plan = run_dir / "incremental-train" / "plan"
    dataset = run_dir / "validate-data" / "dataset"
    metrics = json.loads((run_dir / "evaluate-incremental" / "metrics_json").read_text())
    client = MlflowClient(uri)
    champion = client.get_model_version_by_alias("grace", CHAMPION).version
    # the plan's base is an older version than the champion now: pin the comparison to it
    stored = json.loads(plan.read_text())
    (tmp / "plan.json").write_text(
        json.dumps({**stored, "base_model": f"models:/grace/{champion}"})
    )
    ctx = steps.StepContext(Tracking(uri, EXPERIMENT), "gate-test")
    gate = IncrementalGate(old_tolerance=0.01, min_new_memorization=0.0)
    base = metrics["base_old_grace_R@10"]

    def decide(old: float, name: str) -> dict:
        (tmp / f"{name}.json").write_text(json.dumps({**metrics, "old_grace_R@10": old}))
        return steps.register_incremental(
            model, tmp / f"{name}.json", dataset, tmp / "plan.json", tmp / f"{name}-d.json",
            gate=gate, ctx=ctx,
        )  # fmt: skip

    refused = decide(base - 0.02, "worse")
    assert refused["promoted"] is False
    assert any("old_grace_R@10" in r and "<" in r for r in refused["reasons"])
    assert client.get_model_version_by_alias("grace", CHAMPION).version == champion
    promoted = decide(base - 0.005, "within")
    assert promoted["promoted"] is True
    assert client.get_model_version_by_alias("grace", CHAMPION).version == promoted["version"]
    assert read_manifest(dataset / "manifest.parquet")
