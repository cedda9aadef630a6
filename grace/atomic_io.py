"""Atomic file and folder writes: readers see the old artifact or the new one, never half of one."""

from __future__ import annotations

import functools
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def atomic_path(target: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``target``; rename it over ``target`` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{target.name}.", suffix=suffix or ".tmp", dir=target.parent
    )
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        tmp_path.chmod(0o666 & ~_umask())  # mkstemp's 0600 would hide it from the group
        _fsync(tmp_path)
        os.replace(tmp_path, target)
        _fsync(target.parent)  # the rename itself survives a power cut
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync(path: Path) -> None:
    """Flush a file's (or a folder's entries') bytes to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            if not os.path.islink(os.path.join(dirpath, name)):
                _fsync(Path(dirpath) / name)
        _fsync(Path(dirpath))


@contextmanager
def locked(target: str | os.PathLike, wait_message: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` for a read-modify-write of shared state.

    The lock is a ``.<name>.lock`` file beside ``target`` (filelock), so concurrent writers,
    in any process, run one after another.

    Args:
        target: The shared file (e.g. an identifier map).
        wait_message: Printed to stderr once if another writer holds the lock.
    """
    import sys

    from filelock import FileLock, Timeout

    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(target.with_name(f".{target.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if wait_message:
            print(wait_message, file=sys.stderr, flush=True)
        lock.acquire()
    try:
        # every writer of target holds this lock, so a temporary of target's now is a killed one's
        for stale in target.parent.glob(f".{target.name}.*.tmp"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def write_bytes(target: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically."""
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``target`` atomically, as UTF-8."""
    write_bytes(target, text.encode("utf-8"))


def write_json(target: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` to ``target`` atomically as indented, key-sorted JSON ending in a newline."""
    write_text(target, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


@contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary folder beside ``target``; swap it in for ``target`` on success.

    An existing ``target`` is moved aside first and deleted only once the new one is in place.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    tmp.chmod(0o777 & ~_umask())  # mkdtemp's 0700 would hide it from the group
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, target)


def replace_dir(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the finished folder ``src`` to ``target`` (same file system), replacing it.

    ``src`` is flushed to disk first. An existing ``target`` is swapped with ``src`` in one
    atomic step where the system can (Linux ``renameat2(RENAME_EXCHANGE)``), so a kill at any
    instant leaves one whole version at ``target``; elsewhere it is moved aside first, and a
    later call puts a version left aside by a killed one back before going on.
    """
    src, target = Path(src), Path(target)
    _fsync_tree(src)
    _restore_left_aside(target)
    if target.exists() and _exchange(src, target):
        _fsync(target.parent)
        shutil.rmtree(src, ignore_errors=True)  # now the old version
        return
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(src, target)
    _fsync(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _restore_left_aside(target: Path) -> None:
    """Put back the version a killed ``replace_dir`` moved aside, if ``target`` is gone."""
    if target.exists():
        return
    aside = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if aside:
        os.replace(aside[-1], target)


@functools.cache
def _renameat2() -> Callable[..., int] | None:
    """The C library's ``renameat2``, or None off Linux or before glibc 2.28."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return None
    return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system or file system cannot."""
    renameat2 = _renameat2()
    if renameat2 is None:
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def write_with(target: str | os.PathLike, writer: Callable[[Path], None], suffix: str = "") -> None:
    """Call ``writer(tmp_path)`` and move the result over ``target`` atomically."""
    with atomic_path(target, suffix=suffix) as tmp:
        writer(tmp)


def folder_digests(folder: str | os.PathLike, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``folder`` by its relative POSIX path (``skip`` left out).

    What a folder written atomically records of itself, so a reader can tell it whole: a model
    (``grace.workflow.pyfunc``) or a training checkpoint.
    """
    folder = Path(folder)
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder).as_posix()
        if p.is_file() and rel not in skip:
            out[rel] = sha256_of(p)
    return out


def digest_mismatch(want: dict[str, str], have: dict[str, str]) -> tuple[str, str] | None:
    """The first ``(path, "missing" | "extra" | "changed")`` between two digest maps, or None."""
    for rel in sorted(set(want) | set(have)):
        if rel not in have:
            return rel, "missing"
        if rel not in want:
            return rel, "extra"
        if have[rel] != want[rel]:
            return rel, "changed"
    return None


def sha256_of(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes, read in 1 MiB chunks (model weights do not fit in memory twice)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
