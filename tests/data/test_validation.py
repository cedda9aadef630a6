"""great-expectations validation: a good set passes; each bad input fails on its own rows."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from grace.cli import app
from grace.data.synth import synthesize
from grace.data.validation import validate_image_set

N = 50


@pytest.fixture(scope="module")
def good_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("good") / "set"
    synthesize(root, n=N)
    return root


@pytest.fixture
def bad_set(good_set, tmp_path) -> Path:
    """A fresh copy of the good set to break in one way."""
    return Path(shutil.copytree(good_set, tmp_path / "set"))


def bomb_png(side: int = 100_000) -> bytes:
    """A tiny valid PNG whose header declares side x side pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def add_rows(root: Path, *rows: dict) -> int:
    """Append caption rows; return the row number of the first one."""
    path = root / "captions.jsonl"
    first = len(path.read_bytes().splitlines()) + 1
    with open(path, "a", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return first


def write(root: Path, name: str, data: bytes) -> None:
    (root / "images" / name).write_bytes(data)


Expected = set[tuple[str, int | None, str]]  # (file relative to the set, row, rule)
CASES: dict[str, Callable[[Path], Expected]] = {}


def case(fn: Callable[[Path], Expected]) -> Callable[[Path], Expected]:
    """Register a way to break a good set; it returns the problems that must be reported."""
    CASES[fn.__name__.replace("_", "-")] = fn
    return fn


@case
def truncated(root: Path) -> Expected:
    write(root, "00003.png", (root / "images/00003.png").read_bytes()[:100])
    return {("images/00003.png", None, "readable-image")}


@case
def non_image(root: Path) -> Expected:
    write(root, "notes.png", b"hello, not an image")
    return {("images/notes.png", None, "is-image")}


@case
def zero_size(root: Path) -> Expected:
    write(root, "empty.png", b"")
    return {("images/empty.png", None, "non-empty-image")}


@case
def bomb(root: Path) -> Expected:
    write(root, "bomb.png", bomb_png())
    return {("images/bomb.png", None, "max-pixels")}


@case
def duplicate(root: Path) -> Expected:
    write(root, "copy.png", (root / "images/00007.png").read_bytes())
    return {("images/00007.png", None, "unique-images"), ("images/copy.png", None, "unique-images")}


@case
def empty_caption(root: Path) -> Expected:
    n = add_rows(
        root, {"image": "00001.png", "caption": ""}, {"image": "00001.png", "caption": " "}
    )
    return {
        ("captions.jsonl", n, "non-empty-caption"),
        ("captions.jsonl", n + 1, "non-empty-caption"),
    }


@case
def too_long_caption(root: Path) -> Expected:
    n = add_rows(root, {"image": "00001.png", "caption": "x" * 1001})
    return {("captions.jsonl", n, "max-caption-chars")}


@case
def bad_split(root: Path) -> Expected:
    n = add_rows(root, {"image": "00001.png", "split": "holdout"})
    return {("captions.jsonl", n, "known-split")}


@case
def missing_image(root: Path) -> Expected:
    n = add_rows(root, {"image": "nope.png", "caption": "a"})
    return {("captions.jsonl", n, "image-exists")}


@case
def two_splits(root: Path) -> Expected:
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines()]
    split = next(r["split"] for r in rows if r["image"] == "00001.png")
    n = add_rows(root, {"image": "00001.png", "split": "val" if split != "val" else "test"})
    return {("captions.jsonl", n, "one-split-per-image")}


@case
def control_characters(root: Path) -> Expected:
    n = add_rows(root, {"image": "00002.png", "caption": "a\x01b"})
    return {("captions.jsonl", n, "caption-text")}


def problems_of(report, root: Path) -> Expected:
    return {(Path(p.file).relative_to(root).as_posix(), p.row, p.rule) for p in report.problems}


def test_good_set_passes_and_gx_did_the_checking(good_set):
    report = validate_image_set(good_set)
    assert report.success and report.problems == ()
    assert report.images == N and report.caption_rows > N
    types = {
        r["expectation_config"]["type"] for res in report.results.values() for r in res["results"]
    }
    assert {
        "expect_column_values_to_be_unique",
        "expect_column_value_lengths_to_be_between",
        "expect_column_values_to_be_in_set",
        "expect_table_row_count_to_be_between",
    } <= types
    assert all(res["success"] for res in report.results.values())
    json.dumps(report.to_dict())  # JSON-able, GX results included


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_input_fails_on_its_rows(bad_set, case):
    expected = CASES[case](bad_set)
    report = validate_image_set(bad_set)
    assert not report.success
    assert problems_of(report, bad_set) == expected


def test_fewer_than_min_images(good_set):
    report = validate_image_set(good_set, min_images=N + 1)
    assert problems_of(report, good_set) == {(".", None, "min-images")}
    failed = [r for r in report.results["images"]["results"] if not r["success"]]
    assert [r["expectation_config"]["type"] for r in failed] == [
        "expect_table_row_count_to_be_between"
    ]


def test_html_report_lists_expectations_and_failing_rows(bad_set):
    CASES["duplicate"](bad_set)
    page = validate_image_set(bad_set).to_html()
    assert page.startswith("<!doctype html>") and "FAILED" in page
    assert "expect_column_values_to_be_unique" in page and "copy.png" in page
    assert page.count("<tr>") > 10  # every expectation and every failing row


def test_cli_writes_reports_and_exits_2_with_row_level_errors(bad_set, tmp_path):
    row = CASES["bad-split"](bad_set)
    html_path, json_path = tmp_path / "out" / "report.html", tmp_path / "out" / "result.json"
    result = CliRunner().invoke(
        app,
        ["data", "validate", str(bad_set), "--report", str(html_path), "--json", str(json_path)],
    )
    assert result.exit_code == 2
    ((_, n, _),) = row
    assert f"error: {bad_set / 'captions.jsonl'}:{n}:" in result.stderr
    assert "[rule: known-split]" in result.stderr
    assert json.loads(json_path.read_text())["summary"]["success"] is False
    assert "known-split" in html_path.read_text()


def test_cli_passes_on_a_good_set(good_set):
    result = CliRunner().invoke(app, ["data", "validate", str(good_set)])
    assert result.exit_code == 0, result.output
    assert "success: True" in result.stdout


@pytest.mark.parametrize("captions", ["missing", "empty", "blank lines"])
def test_a_set_without_captions_is_refused_unless_memorize_only(bad_set, captions):
    path = bad_set / "captions.jsonl"
    if captions == "missing":
        path.unlink()
    else:
        path.write_text("" if captions == "empty" else "\n\n")
    report = validate_image_set(bad_set)
    assert problems_of(report, bad_set) == {("captions.jsonl", None, "has-captions")}
    refused = CliRunner().invoke(app, ["data", "validate", str(bad_set)])
    assert refused.exit_code == 2 and "--memorize-only" in refused.stderr
    accepted = CliRunner().invoke(app, ["data", "validate", str(bad_set), "--memorize-only"])
    assert accepted.exit_code == 0, accepted.output


def test_captions_over_the_size_cap_are_refused_before_reading(bad_set):
    from grace.data.imageset import Limits

    size = (bad_set / "captions.jsonl").stat().st_size
    report = validate_image_set(bad_set, Limits(max_captions_bytes=size - 1))
    assert problems_of(report, bad_set) == {("captions.jsonl", None, "max-captions-bytes")}


def test_validation_logs_no_great_expectations_chatter(good_set, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        validate_image_set(good_set)
    assert not [r for r in caplog.records if r.name.startswith("great_expectations")]
