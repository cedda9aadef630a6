"""Image sets: every bad input is refused with a row-level error; manifests round-trip."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import zlib
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from grace.data.imageset import (
    Limits,
    load_records,
    read_manifest,
    scan_image_set,
    summarize,
    write_manifest,
)
from grace.errors import InvalidInputError


def png(colour=(200, 10, 10), size=(8, 8)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def make_set(root: Path, images: dict[str, bytes], rows: list) -> Path:
    (root / "images").mkdir(parents=True)
    for name, data in images.items():
        (root / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (root / "images" / name).write_bytes(data)
    lines = [r if isinstance(r, bytes) else json.dumps(r).encode() for r in rows]
    (root / "captions.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    return root


def refused(root: Path, limits: Limits | None = None) -> list:
    with pytest.raises(InvalidInputError) as e:
        scan_image_set(root, limits or Limits())
    return e.value.problems


def test_valid_set_records(tmp_path):
    a, b = png((1, 2, 3)), png((4, 5, 6), (10, 6))
    root = make_set(
        tmp_path,
        {"a.png": a, "sub/b.png": b, "c.png": png((7, 8, 9))},
        [
            {"image": "a.png", "caption": "a  red\tthing", "split": "test"},
            {"image": "a.png", "caption": "a red thing"},  # same after whitespace: kept once
            {"image": "sub/b.png", "caption": "another"},
        ],
    )
    recs = {r.path: r for r in scan_image_set(root)}
    assert recs["images/a.png"].key == hashlib.sha256(a).hexdigest()
    assert recs["images/a.png"].captions == ("a red thing",)
    assert recs["images/a.png"].split == "test"
    assert (recs["images/sub/b.png"].width, recs["images/sub/b.png"].height) == (10, 6)
    assert recs["images/c.png"].captions == () and recs["images/c.png"].split == "train"
    s = summarize(list(recs.values()))
    assert s["images"] == 3 and s["images_without_captions"] == 1
    assert s["splits"] == {"train": 2, "test": 1}


def test_key_is_stable_across_renames(tmp_path):
    data = png()
    k1 = scan_image_set(make_set(tmp_path / "x", {"one.png": data}, []))[0].key
    k2 = scan_image_set(make_set(tmp_path / "y", {"two.png": data}, []))[0].key
    assert k1 == k2


@pytest.mark.parametrize(
    "name,data,rule",
    [
        ("trunc.png", png(size=(64, 64))[:60], "readable-image"),
        ("corrupt.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 100, "is-image"),
        ("notes.png", b"just some text, not an image", "is-image"),
        ("empty.png", b"", "non-empty-image"),
    ],
)
def test_bad_image_files_are_refused(tmp_path, name, data, rule):
    root = make_set(tmp_path, {"ok.png": png(), name: data}, [])
    problems = refused(root)
    assert [p.rule for p in problems] == [rule]
    assert problems[0].file.endswith(name)


def _bomb_png(side: int) -> bytes:
    """A valid tiny PNG whose header declares side x side pixels (a decompression bomb)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (side // 8 + 1) * 4)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    root = make_set(tmp_path, {"bomb.png": _bomb_png(100_000)}, [])
    assert [p.rule for p in refused(root)] == ["max-pixels"]


def test_gigantic_image_over_limits(tmp_path):
    root = make_set(tmp_path, {"big.png": png(size=(300, 200))}, [])
    assert [p.rule for p in refused(root, Limits(max_pixels=50_000))] == ["max-pixels"]
    assert [p.rule for p in refused(root, Limits(max_file_bytes=10))] == ["max-file-bytes"]


def test_duplicate_images_are_refused(tmp_path):
    data = png()
    root = make_set(tmp_path, {"a.png": data, "b.png": data}, [])
    (p,) = refused(root)
    assert p.rule == "unique-images" and p.file.endswith("b.png") and "a.png" in p.detail


def test_non_image_format_is_refused(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (4, 4)).save(buf, format="PCX")
    root = make_set(tmp_path, {"x.pcx": buf.getvalue()}, [])
    assert [p.rule for p in refused(root)] == ["image-format"]


@pytest.mark.parametrize(
    "row,rule",
    [
        ({"image": "a.png", "caption": ""}, "non-empty-caption"),
        ({"image": "a.png", "caption": "   "}, "non-empty-caption"),
        ({"image": "a.png", "caption": "x" * 1001}, "max-caption-chars"),
        ({"image": "a.png", "caption": 3}, "caption-text"),
        ({"image": "a.png", "caption": "bell\x07"}, "caption-text"),
        ({"image": "../secret.png", "caption": "c"}, "inside-images"),
        ({"image": "/etc/passwd", "caption": "c"}, "inside-images"),
        ({"image": "sub/../../x.png", "caption": "c"}, "inside-images"),
        ({"image": "missing.png", "caption": "c"}, "image-exists"),
        ({"image": "a.png", "caption": "c", "split": "dev"}, "known-split"),
        ({"image": "a.png", "caption": "c", "colour": "red"}, "known-fields"),
        ({"caption": "c"}, "has-image"),
        (b"\xff\xfe not utf-8", "utf-8"),
        (b'{"image": "a.png", "caption": ', "json-row"),
        (b"[1, 2]", "json-row"),
    ],
)
def test_bad_caption_rows_name_the_row(tmp_path, row, rule):
    good = {"image": "a.png", "caption": "fine"}
    root = make_set(tmp_path, {"a.png": png()}, [good, row])
    (p,) = refused(root)
    assert p.rule == rule
    assert p.row == 2 and p.file.endswith("captions.jsonl")
    assert "captions.jsonl:2:" in str(p) and f"[rule: {rule}]" in str(p)


def test_conflicting_splits_are_refused(tmp_path):
    root = make_set(
        tmp_path,
        {"a.png": png()},
        [{"image": "a.png", "caption": "x", "split": "train"}, {"image": "a.png", "split": "test"}],
    )
    assert [p.rule for p in refused(root)] == ["one-split-per-image"]


def test_all_problems_are_reported_together(tmp_path):
    root = make_set(
        tmp_path,
        {"a.png": png(), "bad.png": b"nope"},
        [{"image": "zz.png", "caption": "x"}, {"image": "a.png", "caption": ""}],
    )
    assert sorted(p.rule for p in refused(root)) == [
        "image-exists",
        "is-image",
        "non-empty-caption",
    ]


def test_missing_images_folder(tmp_path):
    (p,) = refused(tmp_path)
    assert p.rule == "has-images-folder"


def test_manifest_roundtrip_and_atomic(tmp_path, monkeypatch):
    root = make_set(
        tmp_path / "set",
        {"a.png": png(), "b.png": png((0, 0, 1))},
        [{"image": "a.png", "caption": "c"}],
    )
    recs = scan_image_set(root)
    out = write_manifest(recs, root / "manifest.parquet")
    assert read_manifest(out) == recs == load_records(out)
    assert sorted(p.name for p in root.iterdir()) == [
        "captions.jsonl",
        "images",
        "manifest.parquet",
    ]

    def crash_half_way(self, path, **kw):
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash_half_way)
    with pytest.raises(OSError, match="disk full"):
        write_manifest(recs[:1], out)
    monkeypatch.undo()
    assert read_manifest(out) == recs  # the old manifest survives, no temp file is left
    assert sorted(p.name for p in root.iterdir()) == [
        "captions.jsonl",
        "images",
        "manifest.parquet",
    ]


def test_bad_manifest_is_named(tmp_path):
    bad = tmp_path / "m.parquet"
    bad.write_bytes(b"not parquet")
    with pytest.raises(InvalidInputError, match="m.parquet"):
        read_manifest(bad)


def test_a_symlink_to_a_file_outside_the_set_is_refused(tmp_path):
    outside = tmp_path / "secret.png"
    outside.write_bytes(png((9, 9, 9)))
    root = make_set(tmp_path / "set", {"a.png": png()}, [{"image": "a.png", "caption": "c"}])
    (root / "images" / "leak.png").symlink_to(outside)  # no caption row names it
    (p,) = refused(root)
    assert (p.rule, Path(p.file).name) == ("no-symlinks", "leak.png")
    assert str(outside) in p.detail


def test_a_symlinked_folder_is_refused_not_walked(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "x.png").write_bytes(png((3, 3, 3)))
    root = make_set(tmp_path / "set", {"a.png": png()}, [])
    (root / "images" / "more").symlink_to(outside, target_is_directory=True)
    (p,) = refused(root)
    assert (p.rule, Path(p.file).name) == ("no-symlinks", "more")


def test_a_fifo_in_images_is_refused(tmp_path):
    import os

    root = make_set(tmp_path / "set", {"a.png": png()}, [])
    os.mkfifo(root / "images" / "pipe.png")
    (p,) = refused(root)  # refused by type, never opened (opening a fifo would block)
    assert (p.rule, Path(p.file).name) == ("regular-files", "pipe.png")


@pytest.mark.parametrize("bad", ["images/../../outside.png", "/etc/passwd", "captions.jsonl"])
def test_manifest_paths_must_stay_inside_images(tmp_path, bad):
    root = make_set(tmp_path / "set", {"a.png": png(), "b.png": png((0, 0, 1))}, [])
    out = write_manifest(scan_image_set(root), root / "manifest.parquet")
    frame = pd.read_parquet(out)
    frame.loc[1, "path"] = bad
    frame.to_parquet(out)
    with pytest.raises(InvalidInputError) as e:
        read_manifest(out)
    (p,) = e.value.problems
    assert (p.rule, p.row, Path(p.file).name) == ("inside-images", 2, "manifest.parquet")
    assert bad in p.detail
