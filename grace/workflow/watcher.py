"""Watching a data repository: run the incremental pipeline once per new data revision.

``grace watch`` polls a branch of a git+DVC repository (a path or a URL): ``git ls-remote``
for its head, then a fetch into a bare mirror to read the head's ``data.dvc``. A head whose
``data.dvc`` differs from the one handled last is a new data revision: the trigger (a local
pipeline run or a cluster submission) is called for it, once. Commits that leave the data as
it was are noted and skipped; several commits between two polls make one run, on the newest
(the pipeline diffs against the champion's revision, so nothing is lost).

Exactly once, across restarts: a revision is written to the state file (atomically, under a
lock, so two watchers cannot both take it) *before* its run starts, as ``running``, then
``succeeded`` or ``failed``. A watcher restarted after a crash finds it there and does not run
it again; it reports it as interrupted instead (re-run it by hand if needed).
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from grace.atomic_io import write_json
from grace.credentials import redact_text, redact_url, with_git_token
from grace.errors import GraceError

Trigger = Callable[[str], Any]
"""Runs the pipeline for one data revision (a commit sha); returns something to record."""

STATE_VERSION = 1


@dataclass(frozen=True)
class PollResult:
    """What one poll did.

    ``action`` is ``ran``, ``failed``, ``unchanged`` (data as handled last), ``seen`` (head
    already handled) or ``no-data`` (the head has no data file).
    """

    revision: str
    action: str
    detail: str = ""


def _git(cwd: str | os.PathLike | None, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=300
    )
    if done.returncode != 0:
        raise GraceError(redact_text(f"git {' '.join(args)} failed: {done.stderr.strip()}"))
    return done.stdout.strip()


def remote_head(repo: str, branch: str) -> str:
    """The commit sha of ``branch`` in ``repo`` (path or URL), without cloning it."""
    out = _git(None, "ls-remote", "--heads", with_git_token(repo), f"refs/heads/{branch}")
    for line in out.splitlines():
        sha, ref = line.split("\t", 1)
        if ref == f"refs/heads/{branch}":
            return sha
    raise GraceError(f"{redact_url(repo)} has no branch {branch!r}")


class Watcher:
    """Polls ``branch`` of ``repo`` and calls ``trigger`` once per new data revision."""

    def __init__(
        self,
        repo: str | os.PathLike,
        state_file: str | os.PathLike,
        trigger: Trigger,
        *,
        branch: str = "main",
        data_file: str = "data.dvc",
    ) -> None:
        self.repo = os.fspath(repo)
        self.state_file = Path(state_file)
        self.trigger = trigger
        self.branch = branch
        self.data_file = data_file
        self.mirror = self.state_file.with_name(self.state_file.stem + ".mirror.git")

    # ---- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        if not self.state_file.is_file():
            return {"version": STATE_VERSION, "head": None, "data_blob": None, "revisions": {}}
        state = json.loads(self.state_file.read_text())
        if state.get("version") != STATE_VERSION:
            raise GraceError(f"{self.state_file}: unsupported watch state version")
        return state

    def _save(self, state: dict[str, Any]) -> None:
        write_json(self.state_file, state)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.state_file.with_suffix(".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise GraceError(f"another watcher holds {self.state_file}") from None
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def interrupted(self) -> list[str]:
        """Revisions whose run started and never ended (the watcher died during it)."""
        revisions = self.state()["revisions"]
        return [sha for sha, r in revisions.items() if r["status"] == "running"]

    # ---- polling -------------------------------------------------------------------------
    def _data_blob(self, sha: str) -> str | None:
        """The blob id of the data file at ``sha`` (fetched into the mirror), None if absent."""
        if not (self.mirror / "HEAD").is_file():
            _git(None, "init", "-q", "--bare", os.fspath(self.mirror))
        ref = f"+refs/heads/{self.branch}:refs/watched/{self.branch}"
        _git(self.mirror, "fetch", "-q", "--no-tags", with_git_token(self.repo), ref)
        done = subprocess.run(
            ["git", "rev-parse", "--verify", "-q", f"{sha}:{self.data_file}"],
            cwd=self.mirror,
            capture_output=True,
            text=True,
            check=False,
        )
        return done.stdout.strip() if done.returncode == 0 else None

    def poll(self) -> PollResult:
        """Look once; run the trigger if the branch's head holds a data revision not yet run."""
        with self._locked():
            state = self.state()
            head = remote_head(self.repo, self.branch)
            if head == state["head"] or head in state["revisions"]:
                return PollResult(head, "seen")
            blob = self._data_blob(head)
            state["head"] = head
            if blob is None or blob == state["data_blob"]:
                self._save(state)
                return PollResult(head, "no-data" if blob is None else "unchanged")
            state["data_blob"] = blob
            state["revisions"][head] = {"status": "running", "started": _now(), "blob": blob}
            self._save(state)  # before the run: a restart never runs this revision again
            try:
                result = self.trigger(head)
            except Exception as e:  # recorded, not retried: the next data revision runs
                state["revisions"][head].update(status="failed", ended=_now(), error=str(e))
                self._save(state)
                return PollResult(head, "failed", str(e))
            state["revisions"][head].update(status="succeeded", ended=_now(), result=str(result))
            self._save(state)
            return PollResult(head, "ran", str(result))

    def run(
        self,
        interval: float,
        echo: Callable[[str], None] = print,
        max_polls: int | None = None,
    ) -> None:
        """Poll every ``interval`` seconds (forever, or ``max_polls`` times)."""
        for sha in self.interrupted():
            echo(f"revision {sha[:12]}: its run was interrupted; not run again")
        polls = 0
        while max_polls is None or polls < max_polls:
            try:
                got = self.poll()
                echo(f"{got.revision[:12]}: {got.action} {got.detail}".rstrip())
            except GraceError as e:  # an unreachable remote must not end the watch
                echo(f"poll failed: {e}")
            polls += 1
            if max_polls is None or polls < max_polls:
                time.sleep(interval)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
