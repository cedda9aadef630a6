"""The pyfunc's request checks and file digests, without a server."""

from __future__ import annotations

import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from grace.errors import GraceError
from grace.workflow.pyfunc import (
    ServingLimits,
    checked_request,
    file_digests,
    staged_artifact,
    verify_digests,
)

LIMITS = ServingLimits(max_k=10, max_beams=20, max_batch=3, max_query_chars=12)
ONE = pd.DataFrame({"query": ["a red circle"]})


def test_a_request_within_the_caps_passes_with_at_least_k_beams():
    assert checked_request(ONE, {"k": 8, "num_beams": 2}, LIMITS) == (["a red circle"], 8, 8)
    assert checked_request(["a", "b"], None, LIMITS) == (["a", "b"], 5, 10)


@pytest.mark.parametrize(
    ("model_input", "params", "message"),
    [
        (ONE, {"k": 10**9}, "GRACE_MAX_K"),
        (ONE, {"k": 0}, "'k' must be in 1..10"),
        (ONE, {"k": -5}, "'k' must be in 1..10"),
        (ONE, {"k": 2.5}, "must be an integer"),
        (ONE, {"k": True}, "must be an integer"),
        (ONE, {"num_beams": 10**6}, "GRACE_MAX_BEAMS"),
        (["a", "b", "c", "d"], None, "GRACE_MAX_BATCH"),
        ([], None, "GRACE_MAX_BATCH"),
        (["x" * 13], None, "query 0 has 13 characters"),
        ([" "], None, "non-empty string"),
    ],
)
def test_a_request_beyond_a_cap_is_refused_as_invalid(model_input, params, message):
    with pytest.raises(MlflowException, match=message) as caught:
        checked_request(model_input, params, LIMITS)
    assert caught.value.get_http_status_code() == 400


def test_limits_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRACE_MAX_K", "7")
    assert ServingLimits.from_env().max_k == 7
    monkeypatch.setenv("GRACE_MAX_K", "-1")
    with pytest.raises(GraceError, match="GRACE_MAX_K"):
        ServingLimits.from_env()


def test_staged_digests_cover_every_file_and_refuse_links(tmp_path):
    src = tmp_path / "model"
    (src / "sub").mkdir(parents=True)
    (src / "a.json").write_text("{}")
    (src / "sub" / "b.bin").write_bytes(b"\1\2")
    with staged_artifact(src) as staged:
        assert set(file_digests(staged)) == {"a.json", "sub/b.bin"}
        verify_digests(staged)
        (staged / "sub" / "b.bin").unlink()
        with pytest.raises(GraceError, match="missing"):
            verify_digests(staged)
    (src / "link").symlink_to(tmp_path)
    with pytest.raises(GraceError, match="symlinks"), staged_artifact(src):
        pass
