"""Versioned image sets: a real git + DVC repo whose remote is an S3 server started by the test."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import boto3
import pytest
from moto.server import ThreadedMotoServer
from PIL import Image
from typer.testing import CliRunner

from grace.cli import app
from grace.data.imageset import scan_image_set, write_caption_rows
from grace.data.synth import synthesize
from grace.data.versioning import (
    add_images,
    commit_data,
    configure_remote,
    diff,
    open_image_set,
    pull,
    push,
)
from grace.errors import GraceError, InvalidInputError

ACCESS_KEY = "AKIAGRACETESTONLY0001"
SECRET_KEY = "grace-test-secret-never-in-a-file"
BUCKET = "bucket"
GIT_ENV = {
    "GIT_AUTHOR_NAME": "t",
    "GIT_AUTHOR_EMAIL": "t@t",
    "GIT_COMMITTER_NAME": "t",
    "GIT_COMMITTER_EMAIL": "t@t",
    "DVC_NO_ANALYTICS": "1",
}


def git(repo: Path, *args: str) -> str:
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return done.stdout.strip()


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def new_images(out: Path, n: int, seed: int, folder: str) -> Path:
    """An image set whose images live under ``images/<folder>/`` (no name clashes with data/)."""
    synthesize(out, n=n, seed=seed)
    moved = out / "images" / folder
    moved.mkdir()
    for p in sorted((out / "images").glob("*.png")):
        p.rename(moved / p.name)
    rows = [json.loads(line) for line in (out / "captions.jsonl").read_text().splitlines()]
    write_caption_rows(
        [{**r, "image": f"{folder}/{r['image']}"} for r in rows], out / "captions.jsonl"
    )
    return out


@dataclass
class History:
    repo: Path
    endpoint: str
    a: str
    b: str
    c: str
    added_keys: list[str]


@pytest.fixture(scope="module")
def s3():
    """An S3-compatible server on loopback, with dummy credentials in the environment only."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in GIT_ENV.items():
            mp.setenv(k, v)
        mp.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
        mp.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
        yield endpoint
        server.stop()


@pytest.fixture(scope="module")
def history(s3, tmp_path_factory) -> History:
    """Revisions A (20 images), B (A + 5 added) and C (B with removals and edits), pushed."""
    from dvc.repo import Repo

    repo = tmp_path_factory.mktemp("repo")
    git(repo, "init", "-q")
    Repo.init(repo).close()
    configure_remote(repo, f"s3://{BUCKET}/dvcstore", endpoint_url=s3)  # in the first commit
    synthesize(repo / "data", n=20)
    a = commit_data(repo, message="A: 20 images")
    push(repo)  # every revision's .dir listing must reach the remote, not only the last one

    source = new_images(tmp_path_factory.mktemp("src") / "set", n=5, seed=7, folder="batch2")
    b = add_images(repo, source)
    push(repo)

    data = repo / "data"
    (data / "images" / "00000.png").unlink()
    (data / "images" / "00003.png").rename(data / "images" / "00003-renamed.png")
    Image.new("RGB", (64, 64), (1, 2, 3)).save(data / "images" / "00004.png")
    rows = [json.loads(line) for line in (data / "captions.jsonl").read_text().splitlines()]
    edited = []
    for r in rows:
        if r["image"] == "00000.png":
            continue
        if r["image"] == "00001.png":
            r["caption"] += " (edited)"
        if r["image"] == "00002.png":
            r["split"] = "val"
        if r["image"] == "00003.png":
            r["image"] = "00003-renamed.png"
        edited.append(r)
    write_caption_rows(edited, data / "captions.jsonl")
    c = commit_data(repo, message="C: removals and edits")
    push(repo)
    assert push(repo, all_commits=True) == 0  # nothing was left behind
    return History(repo, s3, a, b, c, sorted(r.key for r in scan_image_set(source)))


def test_add_images_commits_a_revision_on_top(history):
    repo = history.repo
    assert git(repo, "rev-parse", f"{history.b}^") == history.a
    assert git(repo, "diff", "--name-only", history.a, history.b).split() == ["data.dvc"]
    assert "nfiles: 26" in git(repo, "show", f"{history.b}:data.dvc")  # 25 images + captions
    assert len(scan_image_set(repo / "data")) == 24  # C's work tree: B less one image
    assert git(repo, "status", "--porcelain") == ""


def test_fresh_clone_reads_every_revision_from_s3(history, tmp_path):
    objects = boto3.client("s3", endpoint_url=history.endpoint).list_objects_v2(Bucket=BUCKET)
    assert objects["KeyCount"] > 25  # the images, the captions and the .dir listings

    reader = tmp_path / "reader"  # a pipeline step: a clone, no pull, reads by revision
    git(tmp_path, "clone", "-q", str(history.repo), str(reader))
    at_a = open_image_set(reader, history.a, tmp_path / "a")
    at_b = open_image_set(reader, history.b, tmp_path / "b")
    assert len(at_a) == 20 and len(at_b) == 25
    assert {r.key for r in at_b} - {r.key for r in at_a} == set(history.added_keys)
    assert not (reader / "data").exists()  # the work tree was never touched

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(history.repo), str(clone))
    assert pull(clone, rev=history.b) > 0 and not (clone / "data").exists()
    pull(clone)
    assert {r.key for r in scan_image_set(clone / "data")} == {
        r.key for r in scan_image_set(history.repo / "data")
    }


def test_diff_lists_exactly_the_added_keys(history):
    d = diff(history.repo, history.a, history.b)
    assert list(d.added) == history.added_keys
    assert d.removed == () and d.modified == ()


def test_diff_detects_removal_and_modification(history):
    before = {
        r.path: r.key for r in open_image_set(history.repo, history.b, history.repo.parent / "b")
    }
    new_4 = hashlib.sha256((history.repo / "data" / "images" / "00004.png").read_bytes())
    d = diff(history.repo, history.b, history.c)
    assert set(d.removed) == {before["images/00000.png"], before["images/00004.png"]}
    assert d.added == (new_4.hexdigest(),)  # new bytes at an old path: a new image
    assert [(m.path, m.changes) for m in d.modified] == [
        ("images/00001.png", ("captions",)),
        ("images/00002.png", ("split",)),
        ("images/00003-renamed.png", ("path",)),
        ("images/00004.png", ("bytes",)),
    ]
    assert d.modified[2].key_a == d.modified[2].key_b == before["images/00003.png"]
    assert (d.modified[3].key_a, d.modified[3].key_b) == (before["images/00004.png"], d.added[0])


def test_credentials_never_reach_a_file(history):
    repo = history.repo
    config = (repo / ".dvc" / "config").read_text()
    assert f"s3://{BUCKET}/dvcstore" in config and history.endpoint in config
    assert not (repo / ".dvc" / "config.local").exists()
    committed = git(repo, "log", "-p", "--all")
    for secret in (ACCESS_KEY, SECRET_KEY):
        assert secret not in committed and secret not in config


def test_remote_url_with_credentials_is_refused(history):
    before = (history.repo / ".dvc" / "config").read_text()
    with pytest.raises(GraceError, match="no credentials") as e:
        configure_remote(history.repo, "https://user:pw@example.invalid/store", name="x")
    with pytest.raises(GraceError, match="no credentials") as e2:
        configure_remote(
            history.repo, f"s3://{BUCKET}/x", name="x", endpoint_url="http://key:pw@minio:9000"
        )
    assert "pw" not in str(e.value) + str(e2.value)  # the error is logged too
    assert (history.repo / ".dvc" / "config").read_text() == before


def test_bad_image_leaves_data_unchanged_and_names_it(history, tmp_path):
    repo = history.repo
    before, head = tree_digest(repo / "data"), git(repo, "rev-parse", "HEAD")
    source = new_images(tmp_path / "bad", n=3, seed=11, folder="batch3")
    (source / "images" / "batch3" / "00001.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(InvalidInputError) as e:
        add_images(repo, source)
    assert [(Path(p.file).name, p.rule) for p in e.value.problems] == [("00001.png", "is-image")]
    assert tree_digest(repo / "data") == before and git(repo, "rev-parse", "HEAD") == head


def test_merge_problems_name_the_source_row(history, tmp_path):
    """Rules that only the merged set breaks are reported against the file a user can fix."""
    repo = history.repo
    before, head = tree_digest(repo / "data"), git(repo, "rev-parse", "HEAD")
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    shutil.copyfile(repo / "data" / "images" / "00001.png", src / "images" / "00001.png")
    shutil.copyfile(repo / "data" / "images" / "00005.png", src / "images" / "copy-of-5.png")
    split = {r.path: r.split for r in scan_image_set(repo / "data")}["images/00001.png"]
    other = "val" if split != "val" else "test"
    write_caption_rows(
        [
            {"image": "copy-of-5.png", "caption": "a copy"},
            {"image": "00001.png", "caption": "more", "split": other},
        ],
        src / "captions.jsonl",
    )
    with pytest.raises(InvalidInputError) as e:
        add_images(repo, src)
    found = {(p.rule, p.file, p.row) for p in e.value.problems}
    assert ("unique-images", str(src / "images" / "copy-of-5.png"), None) in found
    assert ("one-split-per-image", str(src / "captions.jsonl"), 2) in found
    assert tree_digest(repo / "data") == before and git(repo, "rev-parse", "HEAD") == head


def test_changed_bytes_at_an_existing_path_are_refused(history, tmp_path):
    src = tmp_path / "src"
    (src / "images").mkdir(parents=True)
    shutil.copyfile(history.repo / "data" / "images" / "00002.png", src / "images" / "00001.png")
    with pytest.raises(InvalidInputError) as e:
        add_images(history.repo, src)
    assert [p.rule for p in e.value.problems] == ["immutable-images"]


def test_cli_diff_json_and_errors(history, tmp_path):
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "diff", history.a, history.b, "--repo", str(history.repo), "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["added"] == history.added_keys

    result = runner.invoke(
        app, ["data", "add", str(tmp_path / "missing"), "--repo", str(history.repo)]
    )
    assert result.exit_code == 2 and "error:" in result.stderr


@pytest.mark.parametrize(
    "command,word",
    [
        ("add", "captions"),
        ("push", "Upload"),
        ("pull", "Download"),
        ("diff", "removed"),
        ("remote", "credentials"),
        ("validate", "expectations"),
    ],
)
def test_cli_commands_are_documented(command, word):
    result = CliRunner().invoke(app, ["data", command, "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and word in result.stdout


def test_first_add_creates_the_set_and_pushes_to_a_local_remote(tmp_path, monkeypatch):
    from dvc.repo import Repo

    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    repo, store = tmp_path / "repo", tmp_path / "store"
    repo.mkdir()
    git(repo, "init", "-q")
    Repo.init(repo).close()
    configure_remote(repo, str(store))
    source = new_images(tmp_path / "src", n=3, seed=3, folder="first")
    rev = add_images(repo, source, message="first images")
    assert git(repo, "log", "--format=%s", "-1") == "first images"
    assert push(repo) == 5  # 3 images, captions.jsonl and the .dir listing
    assert len([p for p in store.rglob("*") if p.is_file()]) == 5
    records = open_image_set(repo, rev, tmp_path / "out")
    assert sorted(r.key for r in records) == sorted(r.key for r in scan_image_set(source))
    with pytest.raises(GraceError, match="no-such-rev"):
        open_image_set(repo, "no-such-rev", tmp_path / "out2")


def test_a_revision_whose_data_is_nowhere_says_how_to_get_it(tmp_path, monkeypatch):
    """What a fresh clone meets before `make demo` has cached the demo set."""
    from dvc.repo import Repo

    for k, v in GIT_ENV.items():
        monkeypatch.setenv(k, v)
    repo = tmp_path / "repo"
    repo.mkdir()
    git(repo, "init", "-q")
    Repo.init(repo).close()
    synthesize(repo / "data", n=3, seed=1)
    rev = commit_data(repo)
    shutil.rmtree(repo / ".dvc" / "cache")
    shutil.rmtree(repo / "data")
    with pytest.raises(GraceError, match="neither in the DVC cache.*grace data pull"):
        open_image_set(repo, rev, tmp_path / "out")
    assert not (tmp_path / "out").exists()
