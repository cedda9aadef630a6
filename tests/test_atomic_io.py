"""Atomic writes under SIGKILL: a reader finds one whole version, readable by the group."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from grace.atomic_io import atomic_dir, replace_dir, write_json
from tests.fixtures.faults import run_killed_at_line

# Writes version 2 over version 1 of a two-file folder, killing itself (SIGKILL) at the Nth
# line that grace.atomic_io executes: every instant of the swap, whatever its implementation.
WRITER = """
from pathlib import Path
from grace.atomic_io import atomic_dir
target = Path(sys.argv[1])
arm()
with atomic_dir(target) as tmp:
    (tmp / "a").write_text("2")
    (tmp / "b").write_text("2" * 1000)
"""


def whole_version(folder: Path) -> str:
    a, b = (folder / "a").read_text(), (folder / "b").read_text()
    assert b == a * 1000, "a half-written version"
    return a


def test_a_folder_swap_killed_at_any_instant_leaves_one_whole_version(tmp_path):
    versions = []
    for kill_at in range(1, 400):
        target = tmp_path / f"run{kill_at}" / "model"
        with atomic_dir(target) as tmp:
            (tmp / "a").write_text("1")
            (tmp / "b").write_text("1" * 1000)
        done = run_killed_at_line(kill_at, "atomic_io.py", WRITER, str(target), timeout=60)
        versions.append(whole_version(target))
        if done.returncode == 0:  # ran to the end before line kill_at: every instant was tried
            break
        assert done.returncode == -signal.SIGKILL
    assert versions[-1] == "2" and set(versions) == {"1", "2"}
    assert versions == sorted(versions)  # once in place, the new version stays


def test_a_version_left_aside_by_a_killed_swap_is_put_back(tmp_path):
    """Where the system cannot swap atomically, replace_dir moves the old version aside first;
    killed right then, the next replace_dir restores it before going on."""
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    os.replace(target, tmp_path / ".model.old-12345")  # what the kill left
    new = tmp_path / "new"
    new.mkdir()
    (new / "a").write_text("2")
    replace_dir(new, target)
    assert (target / "a").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_written_artifacts_follow_the_umask_not_0600(tmp_path, umask):
    """A serving container under another uid of the same group must read the model."""
    old = os.umask(umask)
    try:
        write_json(tmp_path / "f.json", {"a": 1})
        with atomic_dir(tmp_path / "d") as tmp:
            (tmp / "w").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "f.json").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o777 & ~umask


def test_a_write_is_flushed_to_disk_with_its_folder_entry(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    write_json(tmp_path / "ids.json", {"a": 1})
    assert synced[-1] == tmp_path and synced[-2].parent == tmp_path  # the file, then the rename
    synced.clear()
    with atomic_dir(tmp_path / "model") as tmp:
        (tmp / "weights").write_bytes(b"w")
    assert any(p.name == "weights" for p in synced) and synced[-1] == tmp_path
