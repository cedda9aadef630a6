"""The layers hold: the import contract passes here and fails on an upward import."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def test_the_layers_and_the_kfp_boundary_are_kept():
    result = _lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def _lint_a_copy_with(tmp_path: Path, module: str, line: str) -> subprocess.CompletedProcess:
    """The contract run on a copy of ``grace/`` whose ``module`` (a path in it) gains ``line``."""
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(ROOT / "grace", tmp_path / "grace", ignore=skip)
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    path = tmp_path / "grace" / module
    path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    return _lint_imports(tmp_path)


def test_an_upward_import_breaks_the_contract(tmp_path):
    result = _lint_a_copy_with(tmp_path, "data/records.py", "from grace.training import train")
    assert result.returncode != 0
    assert "grace.data.records -> grace.training" in result.stdout


def test_the_library_never_imports_kfp(tmp_path):
    result = _lint_a_copy_with(tmp_path, "workflow/tracking.py", "import kfp")
    assert result.returncode != 0
    assert "grace.workflow.tracking -> kfp" in result.stdout
