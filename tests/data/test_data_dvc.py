"""``data.dvc`` tracks the demo set: regenerating it with ``grace data synth`` changes nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from grace.cli import app

PROJECT = Path(__file__).resolve().parents[2]
ENV = {
    **os.environ,
    "DVC_NO_ANALYTICS": "1",
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
}


def run(*args: str, cwd: Path) -> str:
    done = subprocess.run(
        args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, f"{args}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_regenerated_demo_set_matches_data_dvc(tmp_path):
    repo = tmp_path / "repo"
    repo.mkdir()
    run("git", "init", "-q", cwd=repo)
    run(sys.executable, "-m", "dvc", "init", "-q", cwd=repo)
    committed = (PROJECT / "data.dvc").read_text()
    shutil.copy(PROJECT / "data.dvc", repo / "data.dvc")

    result = CliRunner().invoke(app, ["data", "synth", "--n", "1000", "--out", str(repo / "data")])
    assert result.exit_code == 0, result.output
    run(sys.executable, "-m", "dvc", "add", "-q", "data", cwd=repo)

    assert (repo / "data.dvc").read_text() == committed
    assert "up to date" in run(sys.executable, "-m", "dvc", "status", cwd=repo)
