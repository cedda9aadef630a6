"""The demo image set: deterministic bytes, unique scenes, and a task that needs whole queries."""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

import pytest

from grace.data.imageset import scan_image_set
from grace.data.synth import COLOURS, SHAPES, synthesize


def tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    a = synthesize(tmp_path / "a", n=60, seed=1)
    b = synthesize(tmp_path / "b", n=60, seed=1)
    c = synthesize(tmp_path / "c", n=60, seed=2)
    assert tree_digest(tmp_path / "a") == tree_digest(tmp_path / "b")
    assert tree_digest(tmp_path / "a") != tree_digest(tmp_path / "c")
    assert a == b and a != c


def test_regenerating_in_place_gives_identical_files(tmp_path):
    synthesize(tmp_path / "d", n=30, seed=0)
    before = tree_digest(tmp_path / "d")
    synthesize(tmp_path / "d", n=30, seed=0)
    assert tree_digest(tmp_path / "d") == before
    assert [p.name for p in tmp_path.iterdir()] == ["d"]  # no temp folders left


def test_set_is_valid_split_and_captioned(tmp_path):
    recs = synthesize(tmp_path / "s", n=200, seed=0, test_fraction=0.25)
    assert recs == scan_image_set(tmp_path / "s")
    assert len({r.key for r in recs}) == 200
    assert Counter(r.split for r in recs) == {"train": 150, "test": 50}
    assert all(3 <= len(r.captions) <= 4 for r in recs)
    assert all(r.width == r.height == 64 for r in recs)


def test_attributes_are_shared_so_queries_must_combine_them(tmp_path):
    recs = synthesize(tmp_path / "s", n=300, seed=0)
    first = [r.captions[0] for r in recs]
    assert len(set(first)) == len(first)  # the full description singles out one image
    for word in list(COLOURS) + list(SHAPES):
        having = sum(1 for c in first if word in c)
        assert having >= 20, f"{word!r} is in only {having} captions"
        assert having < len(first) / 2


@pytest.mark.parametrize("kw", [{"n": 0}, {"test_fraction": 1.0}, {"size": 4}])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        synthesize(tmp_path / "x", **{"n": 5, **kw})
    assert not (tmp_path / "x").exists()
