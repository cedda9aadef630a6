"""SIGKILL at several points of training, identifier extension and registration, then a rerun:
nothing is lost, the rerun finishes, and the registry is consistent.

Each kill is a real ``kill -9`` of a subprocess running the real entry point (``grace train``,
``grace ids extend``, the register step), at a chosen point rather than a random one, so every
run of the suite tries the same instants.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus

from grace.data.synth import synthesize
from grace.identifiers import IdentifierMap
from grace.workflow.model_registry import CHAMPION, REGISTRATION_TAG, Gate, register
from grace.workflow.tracking import PIPELINE_KEY_TAG, experiment_id, for_uri, step_run
from tests.fixtures.faults import run_killed_at_line
from tests.fixtures.servers import BIN

pytestmark = pytest.mark.slow
LEGACY_MODEL = Path(__file__).resolve().parent / "fixtures" / "legacy_model" / "model"
GATE = Gate(metric="grace_R@10", tolerance=0.0, min_memorization=0.5)
# The registry calls that change state, in the order register() makes them.
REGISTRY_CALLS = [
    ("mlflow.pyfunc", "log_model"),
    ("mlflow", "register_model"),
    ("mlflow.MlflowClient", "set_model_version_tag"),
    ("mlflow.MlflowClient", "set_registered_model_alias"),
    ("mlflow.MlflowClient", "set_registered_model_tag"),
]

# The register step, killed (SIGKILL) just before its Nth call that changes the registry.
REGISTER_STEP = """
import importlib, os, signal, sys
import mlflow, mlflow.pyfunc
from grace.workflow.model_registry import Gate, register
from grace.workflow.tracking import for_uri, step_run
uri, model_dir, recall, key, kill_at, calls = sys.argv[1:7]
made = 0
def deadly(fn):
    def call(*args, **kwargs):
        global made
        made += 1
        if made == int(kill_at):
            os.kill(os.getpid(), signal.SIGKILL)
        return fn(*args, **kwargs)
    return call
for spec in calls.split(","):
    owner, attr = spec.split(":")
    client = owner == "mlflow.MlflowClient"
    target = mlflow.MlflowClient if client else importlib.import_module(owner)
    setattr(target, attr, deadly(getattr(target, attr)))
with step_run(for_uri(uri, "faults"), key, "register"):
    gate = Gate(metric="grace_R@10", tolerance=0.0, min_memorization=0.5)
    register(model_dir, {"grace_R@10": float(recall), "memorization": 1.0}, name="faults",
             gate=gate)
"""


def _register_step(uri: str, recall: float, key: str) -> None:
    """The register step as a KFP retry runs it: same pipeline key, in a fresh process."""
    with step_run(for_uri(uri, "faults"), key, "register"):
        register(
            LEGACY_MODEL, {"grace_R@10": recall, "memorization": 1.0}, name="faults", gate=GATE
        )


def test_registration_killed_at_each_registry_call_is_rolled_back_and_rerun(registry_server):
    client = MlflowClient()
    tracking = for_uri(registry_server, "faults")
    _register_step(registry_server, 0.10, "k0")
    calls = ",".join(f"{owner}:{attr}" for owner, attr in REGISTRY_CALLS)
    kills = 0
    for kill_at in range(1, 20):
        recall = 0.10 + 0.01 * kill_at  # each model better than the last: each should win
        key = f"k{kill_at}"
        done = subprocess.run(
            [sys.executable, "-c", REGISTER_STEP, registry_server, str(LEGACY_MODEL), str(recall),
             key, str(kill_at), calls],
            capture_output=True, text=True, timeout=300, check=False,
        )  # fmt: skip
        if done.returncode == 0:
            break  # fewer calls than kill_at: every point has been tried
        assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
        kills += 1
        _register_step(registry_server, recall, key)  # the rerun
        champion = client.get_model_version_by_alias("faults", CHAMPION)
        assert json.loads(champion.tags["metrics"])["grace_R@10"] == pytest.approx(recall)
        assert champion.tags[REGISTRATION_TAG] == "done"
    assert kills >= 7  # log, register, metrics, lease, gate, challenger, champion, done
    versions = client.search_model_versions("name = 'faults'")
    states = {mv.version: mv.tags.get(REGISTRATION_TAG) for mv in versions}
    # a version a kill left pending was rolled back inside the next registration's lease, or
    # (killed before it had a gate) stays pending without ever claiming a promotion
    assert set(states.values()) <= {"done", "rolled back", "pending"}
    for mv in versions:
        if states[mv.version] == "rolled back":
            assert mv.tags["gate"].startswith("not applied")
        if states[mv.version] == "pending":
            assert "gate" not in mv.tags
    assert "grace.promotion_lease" not in client.get_registered_model("faults").tags
    exp = experiment_id(tracking)
    steps = client.search_runs([exp], filter_string=f"tags.`{PIPELINE_KEY_TAG}` LIKE 'k%/register'")
    status = {r.data.tags[PIPELINE_KEY_TAG]: r.info.status for r in steps}
    assert steps and set(status.values()) <= {"FINISHED", "KILLED"}, status
    assert sum(r.info.status == "KILLED" for r in steps) == kills
    models = client.search_logged_models([exp])
    assert all(m.status in (LoggedModelStatus.READY, LoggedModelStatus.FAILED) for m in models)


# ---- identifier extension --------------------------------------------------------------------
GRACE_CLI = """
sys.argv = ["grace", *sys.argv[1:]]
arm()
from grace.cli import app
app()
"""


def test_ids_extend_killed_at_many_points_keeps_every_old_id(tmp_path):
    old = synthesize(tmp_path / "old", n=6, seed=1)
    both = tmp_path / "both"
    synthesize(both, n=6, seed=1)
    new = synthesize(tmp_path / "new", n=4, seed=2)
    for r in new:  # the set grows by four images
        added = both / "images" / f"new-{Path(r.path).name}"
        added.write_bytes((tmp_path / "new" / r.path).read_bytes())
    ids = tmp_path / "ids.json"
    grace = str(BIN / "grace")
    assign = [grace, "ids", "assign", "--data", str(tmp_path / "old"), "--out", str(ids),
              "--scheme", "numeric"]  # fmt: skip
    subprocess.run(assign, check=True, capture_output=True, timeout=120)
    before = IdentifierMap.load(ids).ids
    assert len(before) == len(old)
    kill_at, kills = 1, 0
    while True:
        args = ["ids", "extend", "--ids", str(ids), "--data", str(both)]
        done = run_killed_at_line(
            kill_at, "/grace/", GRACE_CLI, *args, capture_output=True, text=True, timeout=120
        )
        now = IdentifierMap.load(ids).ids  # readable after every kill: whole, old or new
        assert {k: now[k] for k in before} == before  # old ids never change
        if done.returncode == 0:
            break
        assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
        kills += 1
        kill_at *= 3
    assert kills >= 5 and len(now) == len(before) + len(new)
    again = subprocess.run([grace, "ids", "extend", "--ids", str(ids), "--data", str(both)],
                           capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
    assert "added 0 identifiers" in again.stdout and IdentifierMap.load(ids).ids == now
    assert not list(tmp_path.glob(".ids.json.*.tmp"))  # killed writers' temporaries are gone


# ---- training --------------------------------------------------------------------------------
def test_training_killed_twice_resumes_and_finishes(tmp_path):
    synthesize(tmp_path / "data", n=8, seed=3, test_fraction=0.25)
    ids, out = tmp_path / "ids.json", tmp_path / "run"
    grace = str(BIN / "grace")
    assign = [grace, "ids", "assign", "--data", str(tmp_path / "data"), "--out", str(ids),
              "--scheme", "numeric"]  # fmt: skip
    subprocess.run(assign, check=True, capture_output=True, timeout=120)
    cmd = [grace, "train", "--data", str(tmp_path / "data"), "--ids", str(ids), "--out", str(out),
           "--backbone", "tiny", "--epochs", "6", "--set", "batch_size=4", "--set",
           "checkpoint_every=3", "--set", "num_threads=1"]  # fmt: skip
    checkpoints = out / "checkpoints"
    for kill in range(2):
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 300
        seen = set(checkpoints.glob("step-*")) if checkpoints.is_dir() else set()
        while time.monotonic() < deadline and proc.poll() is None:
            now = set(checkpoints.glob("step-*")) if checkpoints.is_dir() else set()
            if now - seen:  # a new checkpoint landed: kill it while it trains on
                time.sleep(0.3 * kill)
                break
            time.sleep(0.05)
        assert proc.poll() is None, "finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert not (out / "model").exists()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((out / "model" / "grace.json").read_text())
    assert info["complete"] is True
    # as many steps as a run never killed
    reference = [*cmd[:7], str(tmp_path / "reference"), *cmd[8:]]
    subprocess.run(reference, capture_output=True, timeout=600, check=True)
    want = json.loads((tmp_path / "reference" / "model" / "grace.json").read_text())["steps"]
    assert info["steps"] == want == last_checkpoint(out)
    assert not list(checkpoints.glob(".*.partial"))


def last_checkpoint(out: Path) -> int:
    return max(int(c.name.split("-")[1]) for c in (out / "checkpoints").glob("step-*"))
