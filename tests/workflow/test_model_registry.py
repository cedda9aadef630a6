"""The registry against a real ``mlflow server``: concurrent registrations in separate processes
promote the better model, and a registered model loads only through the installed code, with
every file checked against the digests the registry recorded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient

from grace.errors import GraceError
from grace.workflow.model_registry import (
    CHAMPION,
    DIGEST_TAG,
    Gate,
    download_grace_model,
    load_pyfunc,
    register,
)
from tests.fixtures.servers import model_server

pytestmark = pytest.mark.slow

LEGACY_MODEL = Path(__file__).resolve().parents[1] / "fixtures" / "legacy_model" / "model"
GATE = Gate(metric="grace_R@10", tolerance=0.01, min_memorization=0.5)

RACER = """
import json, sys, time
from pathlib import Path
import mlflow
from grace.workflow.model_registry import Gate, register
uri, model_dir, name, recall, go = sys.argv[1:6]
while not Path(go).exists():  # start together: both read the champion before either moves it
    time.sleep(0.01)
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("race")
with mlflow.start_run():
    gate = Gate(metric="grace_R@10", tolerance=0.01, min_memorization=0.5)
    reg = register(model_dir, {"grace_R@10": float(recall), "memorization": 1.0}, name=name,
                   gate=gate)
print(json.dumps(reg.to_dict()))
"""


def _register(name: str, recall: float, model_dir: Path = LEGACY_MODEL):
    mlflow.set_experiment("registry-test")
    with mlflow.start_run():
        return register(
            model_dir, {"grace_R@10": recall, "memorization": 1.0}, name=name, gate=GATE
        )


def test_concurrent_registrations_leave_the_better_model_champion(registry_server, tmp_path):
    name = "race"
    first = _register(name, 0.50)
    assert first.decision.promote
    go = tmp_path / "go"

    def racer(recall: float, files: int) -> subprocess.Popen:
        model_dir = tmp_path / f"m{recall}"
        model_dir.mkdir()
        for i in range(files):  # more files upload longer: the worse model finishes last
            (model_dir / f"shard{i}.bin").write_bytes(b"x" * 1000)
        return subprocess.Popen(
            [sys.executable, "-c", RACER, registry_server, str(model_dir), name, str(recall), go],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    better, worse = racer(0.90, files=1), racer(0.52, files=200)
    time.sleep(5)  # both imported and waiting
    go.touch()
    results = {}
    for label, proc in (("better", better), ("worse", worse)):
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
        results[label] = json.loads(out.strip().splitlines()[-1])
    champion = MlflowClient().get_model_version_by_alias(name, CHAMPION)
    assert champion.version == results["better"]["version"]
    assert json.loads(champion.tags["metrics"])["grace_R@10"] == 0.90
    # whoever decided second compared against the first one's outcome, never against v1 alone
    assert results["worse"]["champion_version"] != first.version or not results["worse"]["promoted"]
    assert "grace.promotion_lease" not in MlflowClient().get_registered_model(name).tags


def test_a_registered_model_holds_no_code_and_loads_through_the_installed_package(
    registry_server, tmp_path
):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reg = _register("nocode", 0.6)
    noise = [str(w.message)[:80] for w in caught if "mlflow" in w.filename]
    assert not noise  # the known-benign signature warnings are silenced where they arise
    local = Path(mlflow.artifacts.download_artifacts(reg.model_uri, dst_path=tmp_path / "dl"))
    assert not [p for p in local.rglob("*.py")]  # nothing a downloaded copy could run
    flavor = mlflow.models.Model.load(local / "MLmodel").flavors["python_function"]
    assert flavor["loader_module"] == "grace.workflow.pyfunc"
    frame = load_pyfunc("models:/nocode@champion").predict(
        pd.DataFrame({"query": ["a red circle"]}), params={"k": 2}
    )
    assert list(frame["rank"]) == [1, 2]
    found = download_grace_model("nocode", reg.version, tmp_path / "dl2")
    assert (found / "grace.json").is_file()


def test_a_changed_file_or_digest_list_is_refused_at_load(registry_server, tmp_path):
    reg = _register("tamper", 0.6)
    local = Path(mlflow.artifacts.download_artifacts(reg.model_uri, dst_path=tmp_path / "dl"))
    data = local / "data" / "grace_model"
    weights = next(data.glob("*.safetensors"))
    original = weights.read_bytes()
    weights.write_bytes(original + b"\0")
    with pytest.raises(GraceError, match=weights.name):
        mlflow.pyfunc.load_model(os.fspath(local))
    weights.write_bytes(original)
    meta = data / "grace.json"
    meta.write_text(meta.read_text() + "\n")  # still valid, but not what was registered
    # a tamperer who also rewrites sha256.json is caught by the registry's copy of its digest
    from grace.workflow.pyfunc import DIGESTS_FILE, file_digests, verify_digests

    (data / DIGESTS_FILE).write_text(json.dumps(file_digests(data)))
    mlflow.pyfunc.load_model(os.fspath(local))  # self-consistent again...
    recorded = MlflowClient().get_model_version("tamper", reg.version).tags[DIGEST_TAG]
    with pytest.raises(GraceError, match="registry"):
        verify_digests(data, recorded)  # ...but not what was registered
    (data / "extra.py").write_text("print('pwned')\n")
    with pytest.raises(GraceError, match="extra.py"):
        mlflow.pyfunc.load_model(os.fspath(local))


def _post(url: str, payload: dict) -> tuple[int, dict]:
    req = urllib.request.Request(
        f"{url}/invocations", json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_the_rest_server_refuses_requests_beyond_the_caps(registry_server, tmp_path):
    _register("served", 0.6)
    one = {"dataframe_split": {"columns": ["query"], "data": [["a red circle"]]}}
    with model_server("models:/served@champion", registry_server, tmp_path / "serve.log") as url:
        status, body = _post(url, {**one, "params": {"k": 3}})
        assert status == 200 and [p["rank"] for p in body["predictions"]] == [1, 2, 3]
        refused = {
            "k=10**9": ({**one, "params": {"k": 10**9}}, "GRACE_MAX_K"),
            "k=-5": ({**one, "params": {"k": -5}}, "'k' must be in 1..100"),
            "beams=10**6": ({**one, "params": {"num_beams": 10**6}}, "GRACE_MAX_BEAMS"),
            "batch": (
                {"dataframe_split": {"columns": ["query"], "data": [["q"]] * 257}},
                "GRACE_MAX_BATCH",
            ),
            "length": (
                {"dataframe_split": {"columns": ["query"], "data": [["x" * 2001]]}},
                "GRACE_MAX_QUERY_CHARS",
            ),
        }
        for label, (payload, message) in refused.items():
            status, body = _post(url, payload)
            assert status == 400, (label, status, body)
            assert message in body["message"], (label, body)
