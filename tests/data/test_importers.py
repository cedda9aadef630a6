"""Importers: a Karpathy-split fixture (Flickr30K/COCO layout) and a plain folder of images."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from PIL import Image

from grace.data.importers import import_folder, import_karpathy
from grace.errors import InvalidInputError


def png(colour, size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def coco_like(tmp_path) -> tuple[Path, Path]:
    root = tmp_path / "coco"
    for i, sub in enumerate(["train2014", "val2014", "val2014", "val2014"]):
        (root / sub).mkdir(parents=True, exist_ok=True)
        (root / sub / f"img{i}.png").write_bytes(png((i * 40, 0, 0)))
    doc = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "train2014",
                "filename": "img0.png",
                "split": "train",
                "sentences": [{"raw": "A dog  runs.", "tokens": ["a"]}, {"raw": "a dog"}],
            },
            {
                "filepath": "val2014",
                "filename": "img1.png",
                "split": "restval",
                "sentences": [{"raw": "a cat"}],
            },
            {
                "filepath": "val2014",
                "filename": "img2.png",
                "split": "test",
                "sentences": [{"raw": "a bird"}],
            },
            {"filepath": "val2014", "filename": "img3.png", "split": "val", "sentences": []},
        ],
    }
    path = tmp_path / "dataset_coco.json"
    path.write_text(json.dumps(doc))
    return path, root


def test_karpathy_import(coco_like, tmp_path):
    split_json, root = coco_like
    recs = {r.path: r for r in import_karpathy(split_json, root, tmp_path / "out")}
    assert recs["images/train2014/img0.png"].captions == ("A dog runs.", "a dog")
    assert recs["images/val2014/img1.png"].split == "train"  # restval counts as train
    assert recs["images/val2014/img2.png"].split == "test"
    assert recs["images/val2014/img3.png"].captions == ()
    assert recs["images/val2014/img3.png"].split == "val"
    assert (tmp_path / "out" / "images/val2014/img2.png").read_bytes() == (
        root / "val2014/img2.png"
    ).read_bytes()


def test_karpathy_missing_image_names_entry_and_writes_nothing(coco_like, tmp_path):
    split_json, root = coco_like
    (root / "val2014" / "img2.png").unlink()
    with pytest.raises(InvalidInputError) as e:
        import_karpathy(split_json, root, tmp_path / "out")
    (p,) = e.value.problems
    assert p.rule == "image-exists" and p.row == 3 and "img2.png" in p.detail
    assert not (tmp_path / "out").exists()


def test_karpathy_bad_split_and_bad_json(coco_like, tmp_path):
    split_json, root = coco_like
    doc = json.loads(split_json.read_text())
    doc["images"][1]["split"] = "dev"
    split_json.write_text(json.dumps(doc))
    with pytest.raises(InvalidInputError, match="split 'dev'"):
        import_karpathy(split_json, root, tmp_path / "out")
    split_json.write_text("{not json")
    with pytest.raises(InvalidInputError, match="karpathy-json"):
        import_karpathy(split_json, root, tmp_path / "out")


def test_karpathy_corrupt_image_is_named_by_its_source(coco_like, tmp_path):
    split_json, root = coco_like
    (root / "val2014" / "img1.png").write_bytes(b"broken")
    with pytest.raises(InvalidInputError) as e:
        import_karpathy(split_json, root, tmp_path / "out")
    assert e.value.problems[0].file == str(root / "val2014" / "img1.png")
    assert not (tmp_path / "out").exists()


def test_folder_import_with_sidecar_captions(tmp_path):
    src = tmp_path / "photos"
    (src / "trip").mkdir(parents=True)
    (src / "a.png").write_bytes(png((1, 1, 1)))
    (src / "trip" / "b.png").write_bytes(png((2, 2, 2)))
    (src / "trip" / "b.txt").write_text("a beach\n\na boat\n")
    (src / ".DS_Store").write_bytes(b"junk")
    recs = {r.path: r for r in import_folder(src, tmp_path / "out")}
    assert set(recs) == {"images/a.png", "images/trip/b.png"}
    assert recs["images/a.png"].captions == ()
    assert recs["images/trip/b.png"].captions == ("a beach", "a boat")


def test_folder_import_refuses_non_images(tmp_path):
    src = tmp_path / "photos"
    src.mkdir()
    (src / "a.png").write_bytes(png((1, 1, 1)))
    (src / "notes.md").write_text("hello")
    with pytest.raises(InvalidInputError) as e:
        import_folder(src, tmp_path / "out")
    assert e.value.problems[0].file == str(src / "notes.md")
    assert not (tmp_path / "out").exists()
