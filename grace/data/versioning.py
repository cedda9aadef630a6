"""Versioned image sets: DVC tracks ``data/``, git tracks ``data.dvc``; a git revision names a set.

Pipelines take a revision as a parameter and read the set at it with ``open_image_set``, which
never touches the work tree. Only a remote's URL and endpoint are written to ``.dvc/config``, and
that file is committed, so every revision (old ones included) knows where its data lives;
credentials come only from the environment (boto3 reads ``AWS_ACCESS_KEY_ID`` and
``AWS_SECRET_ACCESS_KEY``) and never reach a config file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from grace.atomic_io import atomic_dir
from grace.credentials import has_credentials, redact_text, redact_url, with_git_token
from grace.data.imageset import CAPTIONS_FILE, IMAGES_DIR, Limits, scan_image_set
from grace.data.records import ImageRecord
from grace.errors import GraceError, InvalidInputError, Problem

DEFAULT_DATA_DIR = "data"
DVC_SETUP_FILES = (".dvc/config", ".dvc/.gitignore", ".dvcignore")


# ---- git and DVC plumbing ----------------------------------------------------------------
def _git(repo: str | os.PathLike, *args: str) -> str:
    done = subprocess.run(
        ["git", *args], cwd=repo, capture_output=True, text=True, check=False, timeout=300
    )
    if done.returncode != 0:
        raise GraceError(f"git {' '.join(args)} failed in {repo}: {done.stderr.strip()}")
    return done.stdout.strip()


def _commit(repo: Path, paths: list[str], message: str) -> str:
    """Commit only ``paths`` (other staged work stays staged); return HEAD, new or unchanged."""
    present = [p for p in paths if (repo / p).exists()]
    _git(repo, "add", "--", *present)
    staged = subprocess.run(
        ["git", "diff", "--cached", "--quiet", "--", *present], cwd=repo, check=False
    )
    if staged.returncode != 0:
        _git(repo, "commit", "-q", "-m", message, "--", *present)
    return _git(repo, "rev-parse", "HEAD")


@contextmanager
def _dvc_errors(what: str) -> Iterator[None]:
    """DVC and git errors become one-line ``GraceError``s; DVC's chatter stays at warnings."""
    from dvc.exceptions import DvcException
    from dvc_data.index.index import DataIndexError
    from scmrepo.exceptions import SCMError

    log = logging.getLogger("dvc")
    level = log.level
    log.setLevel(max(level, logging.WARNING))
    try:
        yield
    except DataIndexError as e:  # what a revision's data not in cache nor on a remote raises
        raise GraceError(
            redact_text(
                f"{what}: its data is neither in the DVC cache nor on a reachable remote ({e});"
                " `grace data pull --rev REV` fetches it (the demo set: `make demo` caches it)"
            )
        ) from e
    except (DvcException, SCMError) as e:
        raise GraceError(redact_text(f"{what}: {e}")) from e
    finally:
        log.setLevel(level)


@contextmanager
def _dvc_repo(repo: str | os.PathLike, what: str) -> Iterator[Any]:
    from dvc.repo import Repo

    with _dvc_errors(what), Repo(os.fspath(repo)) as r:
        yield r


# ---- remotes -----------------------------------------------------------------------------
def configure_remote(
    repo: str | os.PathLike,
    url: str,
    name: str = "storage",
    endpoint_url: str | None = None,
    default: bool = True,
) -> str:
    """Point the repo at a DVC remote and commit ``.dvc/config``; return the commit sha.

    ``url`` is ``s3://bucket/prefix`` (with ``endpoint_url`` for MinIO and other S3-compatible
    stores) or a local folder. Credentials are refused here: they belong in the environment.
    """
    for given in [url, endpoint_url or ""]:
        if has_credentials(given):
            raise GraceError(
                f"{redact_url(given)}: no credentials in a remote or endpoint URL (they would be"
                " committed in .dvc/config); set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY,"
                " or `dvc remote modify --local`"
            )
    remote: dict[str, str] = {"url": url}
    if endpoint_url:
        remote["endpointurl"] = endpoint_url
    with _dvc_repo(repo, f"remote {name}") as r, r.config.edit("repo") as conf:
        conf["remote"][name] = remote
        if default:
            conf["core"]["remote"] = name
    return _commit(Path(repo), list(DVC_SETUP_FILES), f"dvc: remote {name} -> {url}")


def push(repo: str | os.PathLike, remote: str | None = None, all_commits: bool = False) -> int:
    """Upload tracked data to ``remote`` (default remote if None); count files uploaded.

    Push after every commit of data: each revision has its own ``.dir`` listing, so a revision
    committed but never pushed cannot be read from a clone. ``all_commits`` catches up.
    """
    with _dvc_repo(repo, "push") as r:
        return int(r.push(remote=remote, all_commits=all_commits))


def pull(repo: str | os.PathLike, rev: str | None = None, remote: str | None = None) -> int:
    """Download data; count files fetched.

    Without ``rev``: fetch and check out the work tree's data (``dvc pull``). With ``rev``: only
    fill the cache with that revision's data, leaving the work tree alone, so that
    ``open_image_set(repo, rev, ...)`` then runs offline.
    """
    with _dvc_repo(repo, f"pull {rev or ''}".strip()) as r:
        if rev is None:
            return int(r.pull(remote=remote)["stats"]["fetched"])
        return int(r.fetch(revs=[rev], workspace=False, remote=remote))


# ---- committing a set --------------------------------------------------------------------
def cache_workspace(repo: str | os.PathLike, data_dir: str = DEFAULT_DATA_DIR) -> bool:
    """Put the work tree's ``data_dir`` into the DVC cache, committing nothing.

    Returns whether ``<data_dir>.dvc`` still matches git's HEAD, i.e. whether revision HEAD
    now reads (offline) exactly the set in the work tree.
    """
    repo = Path(repo).resolve()
    dvc_file = f"{data_dir}.dvc"
    with _dvc_repo(repo, f"dvc add {data_dir}") as r:
        r.add(os.fspath(repo / data_dir))
    done = subprocess.run(["git", "diff", "--quiet", "HEAD", "--", dvc_file], cwd=repo, check=False)
    return done.returncode == 0


def commit_data(
    repo: str | os.PathLike, data_dir: str = DEFAULT_DATA_DIR, message: str | None = None
) -> str:
    """``dvc add`` the set at ``repo/data_dir`` and commit its ``.dvc`` file; return HEAD."""
    repo = Path(repo)
    with _dvc_repo(repo, f"dvc add {data_dir}") as r:
        (stage,) = r.add(os.fspath(repo.resolve() / data_dir))  # DVC resolves against cwd
    dvc_file = Path(stage.path).relative_to(repo.resolve()).as_posix()
    gitignore = (PurePosixPath(data_dir).parent / ".gitignore").as_posix()
    return _commit(repo, [dvc_file, gitignore], message or f"data: update {data_dir}")


def add_images(
    repo: str | os.PathLike,
    source: str | os.PathLike,
    data_dir: str = DEFAULT_DATA_DIR,
    message: str | None = None,
) -> str:
    """Bring the images and captions of the image set ``source`` into ``repo/data_dir``.

    The merged set is validated in a copy first, so on any problem ``data_dir`` is unchanged.
    An image may not replace different bytes at the same path: identities are content hashes,
    and a silently changed image would keep a stale identifier. Returns the new commit sha.
    """
    repo, source = Path(repo), Path(source)
    set_root = repo / data_dir
    incoming = scan_image_set(source)
    clashes = []
    fresh = []
    for rec in incoming:
        existing = set_root / rec.path
        if not existing.is_file():
            fresh.append(rec)
        elif hashlib.sha256(existing.read_bytes()).hexdigest() != rec.key:
            clashes.append(
                Problem(
                    str(source / rec.path),
                    "immutable-images",
                    f"{rec.path} already exists in {set_root} with different bytes; "
                    "give a changed image a new name",
                )
            )
    if clashes:
        raise InvalidInputError(clashes)
    _merge_sets(set_root, source, fresh)
    return commit_data(
        repo, data_dir, message or f"data: add {len(fresh)} images from {source.name}"
    )


def _merge_sets(set_root: Path, source: Path, fresh: list[ImageRecord]) -> None:
    """Swap in ``set_root`` + ``fresh`` images + ``source`` caption rows, once it validates."""
    old_caps = _read_or_empty(set_root / CAPTIONS_FILE)
    if old_caps and not old_caps.endswith(b"\n"):
        old_caps += b"\n"
    old_rows = len(old_caps.splitlines())
    fresh_paths = {r.path for r in fresh}
    with atomic_dir(set_root) as tmp:
        if set_root.is_dir():
            shutil.copytree(
                set_root,
                tmp,
                dirs_exist_ok=True,
                copy_function=_link_or_copy,
                # captions.jsonl is rewritten below: never a hard link to the original
                ignore=lambda d, names: [CAPTIONS_FILE] if Path(d) == set_root else [],
            )
        for rec in fresh:
            (tmp / rec.path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source / rec.path, tmp / rec.path)
        (tmp / CAPTIONS_FILE).write_bytes(old_caps + _read_or_empty(source / CAPTIONS_FILE))
        try:
            scan_image_set(tmp)
        except InvalidInputError as e:
            origin = _ProblemOrigin(tmp, set_root, source, fresh_paths, old_rows)
            raise InvalidInputError([origin(p) for p in e.problems]) from None


@dataclass(frozen=True)
class _ProblemOrigin:
    """Maps a problem found in the merged copy back to the file (and row) a user can fix."""

    tmp: Path
    set_root: Path
    source: Path
    fresh_paths: set[str]
    old_rows: int

    def __call__(self, p: Problem) -> Problem:
        rel = Path(p.file).relative_to(self.tmp).as_posix()
        if rel == CAPTIONS_FILE and p.row is not None:
            if p.row <= self.old_rows:
                return Problem(str(self.set_root / rel), p.rule, p.detail, p.row)
            return Problem(str(self.source / rel), p.rule, p.detail, p.row - self.old_rows)
        root = self.source if rel in self.fresh_paths else self.set_root
        return Problem(str(root / rel), p.rule, p.detail, p.row)


def _link_or_copy(src: str, dst: str) -> None:
    """Hard-link (instant, no extra disk for thousands of images), copy where links fail."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _read_or_empty(path: Path) -> bytes:
    return path.read_bytes() if path.is_file() else b""


# ---- reading a revision ------------------------------------------------------------------
def open_image_set(
    repo_url_or_path: str | os.PathLike,
    rev: str,
    out_dir: str | os.PathLike,
    data_dir: str = DEFAULT_DATA_DIR,
    limits: Limits | None = None,
) -> list[ImageRecord]:
    """Materialize the image set of revision ``rev`` in ``out_dir`` and return its records.

    Reads through DVC's filesystem (local cache first, then the remote that revision names),
    so neither the work tree nor the checked-out revision changes. ``out_dir`` is replaced.
    A bad set's problems name the files as ``repo@rev:data/...``, not the copy.
    """
    fetch_image_set(repo_url_or_path, rev, out_dir, data_dir)
    try:
        return scan_image_set(out_dir, limits or Limits())
    except InvalidInputError as e:
        shown = revision_name(repo_url_or_path, rev, data_dir)
        problems = [p.renamed(os.fspath(out_dir), shown) for p in e.problems]
        raise InvalidInputError(problems) from None


def fetch_image_set(
    repo_url_or_path: str | os.PathLike, rev: str, out_dir: str | os.PathLike, data_dir: str
) -> None:
    """Copy revision ``rev``'s image set into ``out_dir`` (replaced), unchecked."""
    with _revision_fs(repo_url_or_path, rev) as fs, atomic_dir(out_dir) as tmp:
        if not fs.isdir(data_dir):
            shown = redact_url(os.fspath(repo_url_or_path))
            raise GraceError(f"{data_dir}/ is not in revision {rev} of {shown}")
        fs.get(f"{data_dir}/", os.fspath(tmp), recursive=True)


def revision_name(repo_url_or_path: str | os.PathLike, rev: str, data_dir: str) -> str:
    """How a file of a revision is named to a user: ``repo@rev:data`` (credentials hidden)."""
    return f"{redact_url(os.fspath(repo_url_or_path))}@{rev}:{data_dir}"


@contextmanager
def _revision_fs(repo: str | os.PathLike, rev: str) -> Iterator[Any]:
    from dvc.api import DVCFileSystem

    with _dvc_errors(f"revision {rev} of {repo}"):
        fs = DVCFileSystem(with_git_token(os.fspath(repo)), rev=rev)
        try:
            yield fs
        finally:
            fs.close()


@dataclass(frozen=True)
class ImageChange:
    """An image present in both revisions (same path or same bytes) whose entry changed.

    ``changes`` names what: ``bytes`` (same path, other content: its key changed, and the two
    keys are also in ``added``/``removed``), ``path`` (renamed), ``captions``, ``split``.
    """

    path: str
    key_a: str
    key_b: str
    changes: tuple[str, ...]


@dataclass(frozen=True)
class ImageSetDiff:
    """What changed between two revisions, by content key: what identifier upkeep needs."""

    added: tuple[str, ...] = ()
    removed: tuple[str, ...] = ()
    modified: tuple[ImageChange, ...] = field(default_factory=tuple)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def diff(repo: str | os.PathLike, a: str, b: str, data_dir: str = DEFAULT_DATA_DIR) -> ImageSetDiff:
    """Compare the image sets of revisions ``a`` and ``b``.

    Compares DVC's per-file hashes (no image is downloaded for that) and reads the bytes only of
    the images it reports, to name them by their sha256 key: cheap for thousands of images.
    """
    with _revision_fs(repo, a) as fs_a, _revision_fs(repo, b) as fs_b:
        old, new = _Snapshot.read(fs_a, data_dir, a), _Snapshot.read(fs_b, data_dir, b)
        by_id_a, by_id_b = old.path_by_content(), new.path_by_content()
        added = sorted(new.key(by_id_b[c]) for c in by_id_b.keys() - by_id_a.keys())
        removed = sorted(old.key(by_id_a[c]) for c in by_id_a.keys() - by_id_b.keys())
        modified = []
        for path in sorted(old.content.keys() & new.content.keys()):
            if old.content[path] != new.content[path]:
                modified.append(ImageChange(path, old.key(path), new.key(path), ("bytes",)))
        for c in sorted(by_id_a.keys() & by_id_b.keys()):
            pa, pb = by_id_a[c], by_id_b[c]
            changes = tuple(
                what
                for what, changed in (
                    ("path", pa != pb),
                    ("captions", old.captions(pa) != new.captions(pb)),
                    ("split", old.split(pa) != new.split(pb)),
                )
                if changed
            )
            if changes:
                key = new.key(pb)
                modified.append(ImageChange(pb, key, key, changes))
    modified.sort(key=lambda m: (m.path, m.changes))
    return ImageSetDiff(tuple(added), tuple(removed), tuple(modified))


@dataclass
class _Snapshot:
    """One revision's set as DVC's index sees it: path -> content hash, plus caption rows."""

    fs: Any
    data_dir: str
    content: dict[str, str]  # "images/x.png" -> DVC's md5 of the bytes
    rows: dict[str, tuple[tuple[str, ...], str | None]]  # "images/x.png" -> (captions, split)
    keys: dict[str, str] = field(default_factory=dict)

    @classmethod
    def read(cls, fs: Any, data_dir: str, rev: str) -> _Snapshot:
        images = f"{data_dir}/{IMAGES_DIR}"
        if not fs.isdir(images):
            raise GraceError(f"{images}/ is not in revision {rev}")
        content = {}
        for name, info in fs.find(images, detail=True).items():
            rel = PurePosixPath(name).relative_to(data_dir)
            if any(part.startswith(".") for part in rel.parts):
                continue  # hidden files are not part of a set (see imageset.image_files)
            content[rel.as_posix()] = info.get("md5") or _sha256(fs.cat_file(name))
        cap_file = f"{data_dir}/{CAPTIONS_FILE}"
        raw = fs.cat_file(cap_file) if fs.isfile(cap_file) else b""
        return cls(fs, data_dir, content, _caption_table(raw))

    def path_by_content(self) -> dict[str, str]:
        """Content hash -> its first path (a valid set has one path per content)."""
        out: dict[str, str] = {}
        for path in sorted(self.content):
            out.setdefault(self.content[path], path)
        return out

    def key(self, path: str) -> str:
        if path not in self.keys:
            self.keys[path] = _sha256(self.fs.cat_file(f"{self.data_dir}/{path}"))
        return self.keys[path]

    def captions(self, path: str) -> tuple[str, ...]:
        return self.rows.get(path, ((), None))[0]

    def split(self, path: str) -> str:
        return self.rows.get(path, ((), None))[1] or "train"


def _caption_table(raw: bytes) -> dict[str, tuple[tuple[str, ...], str | None]]:
    """Captions and split per image of a committed (hence validated) captions.jsonl."""
    table: dict[str, tuple[tuple[str, ...], str | None]] = {}
    for line in raw.decode("utf-8", errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("image"), str):
            continue
        path = f"{IMAGES_DIR}/{PurePosixPath(obj['image'].replace(chr(92), '/')).as_posix()}"
        caps, split = table.get(path, ((), None))
        caption = obj.get("caption")
        if isinstance(caption, str) and " ".join(caption.split()) not in caps:
            caps += (" ".join(caption.split()),)
        table[path] = (caps, split or obj.get("split"))
    return table


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()
