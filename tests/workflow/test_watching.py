"""``grace watch``: once per new data revision, across restarts, on a real git repository; with
``--host``, through the real kfp.Client to a stand-in KFP API server (tests/kfp_api_standin.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grace.cli import app
from grace.errors import GraceError
from grace.workflow.watcher import Watcher, remote_head
from tests.fixtures.kfp_api_standin import cached_tasks

GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


@pytest.fixture
def repo(tmp_path, monkeypatch) -> Path:
    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    return repo


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()


def commit(repo: Path, name: str, text: str) -> str:
    (repo / name).write_text(text)
    git(repo, "add", name)
    git(repo, "commit", "-q", "-m", f"{name}: {text}")
    return git(repo, "rev-parse", "HEAD")


class Recorder:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def __call__(self, sha: str) -> str:
        self.calls.append(sha)
        return f"run-{len(self.calls)}"


def test_one_run_per_new_data_revision_and_none_after_a_restart(repo, tmp_path):
    state = tmp_path / "watch" / "state.json"
    first = commit(repo, "data.dvc", "md5: aaa\n")
    runs = Recorder()
    w = Watcher(repo.as_uri(), state, runs, branch="main")  # a URL: ls-remote and fetch
    assert remote_head(repo.as_uri(), "main") == first
    assert w.poll().action == "ran" and runs.calls == [first]
    assert w.poll().action == "seen"
    code_only = commit(repo, "README.md", "docs\n")  # the data did not change
    got = w.poll()
    assert (got.revision, got.action) == (code_only, "unchanged")
    second = commit(repo, "data.dvc", "md5: bbb\n")
    assert w.poll().action == "ran" and runs.calls == [first, second]

    # a restarted watcher (new object, same state file) does not run any of them again
    again = Watcher(repo.as_uri(), state, runs, branch="main")
    assert again.poll().action == "seen"
    git(repo, "reset", "-q", "--hard", first)  # the branch moved back to an old revision
    assert again.poll().action == "seen"
    assert runs.calls == [first, second]
    recorded = json.loads(state.read_text())["revisions"]
    assert {sha: r["status"] for sha, r in recorded.items()} == {
        first: "succeeded",
        second: "succeeded",
    }
    assert recorded[second]["result"] == "run-2"


def test_several_commits_between_polls_make_one_run_on_the_newest(repo, tmp_path):
    commit(repo, "data.dvc", "md5: a\n")
    runs = Recorder()
    w = Watcher(repo, tmp_path / "state.json", runs)
    w.poll()
    commit(repo, "data.dvc", "md5: b\n")
    newest = commit(repo, "data.dvc", "md5: c\n")
    assert w.poll().action == "ran"
    assert runs.calls[-1] == newest and len(runs.calls) == 2


def test_a_run_killed_midway_is_not_run_again_after_restart(repo, tmp_path):
    sha = commit(repo, "data.dvc", "md5: a\n")
    state = tmp_path / "state.json"

    def dies(_: str) -> None:
        raise KeyboardInterrupt  # what a killed watcher looks like from outside the run

    with pytest.raises(KeyboardInterrupt):
        Watcher(repo, state, dies).poll()
    runs = Recorder()
    restarted = Watcher(repo, state, runs)
    assert restarted.interrupted() == [sha]
    assert restarted.poll().action == "seen" and runs.calls == []
    lines: list[str] = []
    restarted.run(0, echo=lines.append, max_polls=1)
    assert "interrupted" in lines[0] and runs.calls == []


def test_a_failed_run_is_recorded_not_retried_and_the_next_revision_runs(repo, tmp_path):
    bad = commit(repo, "data.dvc", "md5: a\n")
    state = tmp_path / "state.json"

    def fails(_: str) -> None:
        raise RuntimeError("validation failed")

    got = Watcher(repo, state, fails).poll()
    assert got.action == "failed" and "validation failed" in got.detail
    runs = Recorder()
    w = Watcher(repo, state, runs)
    assert w.poll().action == "seen" and runs.calls == []
    fixed = commit(repo, "data.dvc", "md5: b\n")
    assert w.poll().action == "ran" and runs.calls == [fixed]
    assert json.loads(state.read_text())["revisions"][bad]["status"] == "failed"


def test_two_watchers_cannot_share_a_state_file(repo, tmp_path):
    commit(repo, "data.dvc", "md5: a\n")
    state = tmp_path / "state.json"
    inner: list[Exception] = []

    def nested(_: str) -> None:
        try:
            Watcher(repo, state, Recorder()).poll()
        except GraceError as e:
            inner.append(e)

    Watcher(repo, state, nested).poll()
    assert inner and "another watcher" in str(inner[0])


def test_no_data_file_no_run_and_unknown_branch_is_an_error(repo, tmp_path):
    commit(repo, "README.md", "x\n")
    runs = Recorder()
    assert Watcher(repo, tmp_path / "s.json", runs).poll().action == "no-data"
    assert runs.calls == []
    with pytest.raises(GraceError, match="no branch"):
        Watcher(repo, tmp_path / "s2.json", runs, branch="nope").poll()


def test_watch_cli_needs_exactly_one_of_local_and_host(repo, tmp_path):
    result = CliRunner().invoke(app, ["watch", "--data-repo", str(repo), "--once"])
    assert result.exit_code == 2
    assert "--local" in result.output and "--host" in result.output


def test_watch_host_submits_the_incremental_pipeline_once_per_new_revision(
    repo, tmp_path, kfp_api, monkeypatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    state = tmp_path / "state.json"
    watch = ["watch", "--data-repo", str(repo), "--host", kfp_api.url, "--once",
             "--state", str(state)]  # fmt: skip
    untracked = CliRunner().invoke(app, watch)  # it would train runs that cannot register
    assert untracked.exit_code == 2 and "--tracking-uri" in untracked.output
    assert kfp_api.requests == []
    watch += ["--tracking-uri", "http://mlflow:5000"]
    first = commit(repo, "data.dvc", "md5: a\n")
    result = CliRunner().invoke(app, watch)
    assert result.exit_code == 0, result.output
    (body,) = kfp_api.bodies("POST", "/runs")
    assert body["display_name"] == f"incremental-{first[:12]}"
    assert body["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "grace-incremental"
    assert body["runtime_config"]["parameters"] == {
        "data_repo": str(repo), "data_rev": first, "tracking_uri": "http://mlflow:5000"
    }  # fmt: skip
    assert cached_tasks(body["pipeline_spec"]) == []
    run_id = kfp_api.requests[-1].answer["run_id"]
    assert json.loads(state.read_text())["revisions"][first]["result"] == run_id
    assert CliRunner().invoke(app, watch).exit_code == 0
    assert len(kfp_api.bodies("POST", "/runs")) == 1  # the same revision is not sent again

    # the server refuses the next revision: recorded as failed, in words naming the server
    kfp_api.failures[("POST", "/apis/v2beta1/runs")] = (503, "ml-pipeline is restarting")
    second = commit(repo, "data.dvc", "md5: b\n")
    result = CliRunner().invoke(app, watch)
    assert result.exit_code == 0  # a failed run does not end the watch
    said = f"the KFP API at {kfp_api.url} refused: HTTP 503 Service Unavailable"
    assert f"{second[:12]}: failed {said}: ml-pipeline is restarting" in result.output
    assert json.loads(state.read_text())["revisions"][second]["status"] == "failed"
