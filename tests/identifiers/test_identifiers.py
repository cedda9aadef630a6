"""Identifier schemes: uniqueness, stability under extend and remove, persistence."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grace.data.records import ImageRecord
from grace.errors import InvalidInputError
from grace.identifiers import SCHEME_NAMES, IdentifierMap, assign_identifiers


class HashEmbedder:
    """Deterministic stand-in embedder: a vector derived from the file name (no model needed)."""

    def __init__(self, dim: int = 6):
        self.dim = dim

    def embed_images(self, paths):
        out = []
        for p in paths:
            seed = int.from_bytes(str(p.name).encode()[-8:].rjust(8, b"\0"), "little")
            out.append(np.random.default_rng(seed).normal(size=self.dim))
        return np.asarray(out, dtype=np.float32)


def make_records(n: int, start: int = 0, n_captions: int = 2, shared_every: int = 0):
    recs = []
    for i in range(start, start + n):
        caps = [f"a photo number {i}", f"another view {i}"][:n_captions]
        if shared_every and i % shared_every == 0:
            caps.append("a common caption")
        split = "test" if i % 5 == 4 else "train"
        recs.append(ImageRecord(f"{i:064x}", f"images/{i:06d}.png", 8, 8, tuple(caps), split))
    return recs


def assign(scheme: str, recs, **params):
    emb = HashEmbedder() if scheme == "structured" else None
    return assign_identifiers(recs, scheme, params=params or None, embedder=emb)


def extend(m: IdentifierMap, recs):
    return m.extend(recs, embedder=HashEmbedder() if m.scheme == "structured" else None)


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_every_image_gets_unique_ids(scheme):
    recs = make_records(120, shared_every=3)
    m = assign(scheme, recs)
    assert set(m.ids) == {r.key for r in recs}
    flat = [i for ids in m.ids.values() for i in ids]
    assert len(flat) == len(set(flat))
    assert m.lookup()[m.ids[recs[7].key][0]] == recs[7].key


@settings(max_examples=25, deadline=None)
@given(
    scheme=st.sampled_from(SCHEME_NAMES),
    n_old=st.integers(1, 80),
    n_new=st.integers(0, 60),
    removed=st.sets(st.integers(0, 79), max_size=20),
)
def test_extend_and_remove_never_change_or_reuse_ids(scheme, n_old, n_new, removed):
    old = make_records(n_old, shared_every=4)
    m1 = assign(scheme, old, **({"k": 3, "c": 4} if scheme == "structured" else {}))
    gone = [old[i].key for i in removed if i < n_old]
    m2 = m1.remove(gone)
    m3 = extend(m2, make_records(n_new, start=1000, shared_every=4))
    for r in old:  # unchanged for survivors, retired for the removed
        if r.key in gone:
            assert r.key not in m3.ids and m3.retired[r.key] == m1.ids[r.key]
        else:
            assert m3.ids[r.key] == m1.ids[r.key]
    live = [i for ids in m3.ids.values() for i in ids]
    retired = {i for ids in m3.retired.values() for i in ids}
    assert len(live) == len(set(live)), "identifiers must be unique"
    assert not retired & set(live), "a retired identifier was reissued"
    assert len(m3) == n_old - len(gone) + n_new


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_assignment_is_deterministic_and_roundtrips(scheme, tmp_path):
    recs = make_records(60)
    a, b = assign(scheme, recs), assign(scheme, recs)
    assert a.ids == b.ids
    a.save(tmp_path / "ids.json")
    loaded = IdentifierMap.load(tmp_path / "ids.json")
    assert loaded.ids == a.ids and loaded.state == a.state and loaded.scheme == scheme
    # extending the loaded map gives the same ids as extending the original
    new = make_records(10, start=500)
    assert extend(loaded, new).ids == extend(a, new).ids


def test_numeric_ids_are_digit_tokens_and_string_ids_are_not():
    num = assign("numeric", make_records(20))
    ident = num.ids[make_records(20)[3].key][0]
    assert num.token_text(ident) == " ".join(ident)
    s = assign("string", make_records(20))
    assert s.token_text("123") == "123"
    assert sorted(int(i[0]) for i in num.ids.values()) == list(range(20))


def test_semantic_ids_skip_shared_and_held_out_captions():
    recs = make_records(20, shared_every=2)
    m = assign("semantic", recs)
    flat = {i for ids in m.ids.values() for i in ids}
    assert "a common caption" not in flat
    for r in recs:
        if r.split == "test":  # held-out captions are queries: never identifiers
            assert not set(r.captions) & set(m.ids[r.key])
        else:
            assert m.ids[r.key] == list(r.captions[:2])


def test_semantic_uses_captioner_for_images_without_usable_captions():
    recs = [ImageRecord(f"{i:064x}", f"images/{i}.png", 8, 8, (), "train") for i in range(3)]
    m = assign_identifiers(recs, "semantic", captioner=lambda rs: ["a red circle"] * len(rs))
    ids = [m.ids[r.key][0] for r in recs]
    assert ids[0] == "a red circle" and len(set(ids)) == 3
    assert all(i.startswith("a red circle") for i in ids)


def test_structured_tree_respects_branching_and_leaf_size():
    recs = make_records(300)
    m = assign("structured", recs, k=5, c=7)
    leaves: dict[str, list[int]] = {}
    for (ident,) in m.ids.values():
        *path, last = ident.split()
        depth, pos = last.split("_")
        assert int(depth) == len(path)
        for level, tok in enumerate(path):
            lvl, j = tok.split("_")
            assert int(lvl) == level and int(j) < 5
        leaves.setdefault(" ".join(path), []).append(int(pos))
    assert all(sorted(p) == list(range(len(p))) and len(p) <= 7 for p in leaves.values())
    paths = [ident.split() for (ident,) in m.ids.values()]
    nodes = {" ".join(p[: n + 1]) for p in paths for n in range(len(p))}
    assert set(m.new_tokens()) == {"<" + n.replace(" ", ",") + ">" for n in nodes}


def test_structured_tokens_per_node_or_per_level():
    recs = make_records(60)
    node = assign("structured", recs, k=3, c=4)
    level = assign("structured", recs, k=3, c=4, tokens="level")
    assert node.ids == level.ids  # the tokens differ, the identifiers do not
    ident = node.ids[recs[5].key][0]
    parts = ident.split()
    assert level.token_text(ident) == ident
    assert node.token_text(ident).split() == [
        "<" + ",".join(parts[: n + 1]) + ">" for n in range(len(parts))
    ]
    # every image's last node token is its own, as an atomic id is
    leaves = [node.token_text(i).split()[-1] for (i,) in node.ids.values()]
    assert len(set(leaves)) == len(recs)
    assert set(level.new_tokens()) == {t for (i,) in level.ids.values() for t in i.split()}


def test_structured_map_from_before_the_tokens_parameter_keeps_level_tokens(tmp_path):
    m = assign("structured", make_records(30), k=3, c=4, tokens="level")
    del m.params["tokens"]
    m.save(tmp_path / "ids.json")
    old = IdentifierMap.load(tmp_path / "ids.json")
    ident = old.ids[make_records(30)[0].key][0]
    assert old.token_text(ident) == ident


def test_structured_node_tokens_tokenize_one_token_per_node():
    from grace.retrieval.index import IdentifierIndex, default_tokenizer

    recs = make_records(120)
    m = assign("structured", recs, k=4, c=5)
    index = IdentifierIndex.build(m, default_tokenizer(m, recs))
    for n, ident in enumerate(index.identifiers):
        assert len(index.sequences[n]) == len(ident.split())
    assert len(index.trie) == len(recs)


def test_structured_rejects_an_unknown_token_kind():
    with pytest.raises(ValueError, match="tokens must be one of"):
        assign("structured", make_records(10), tokens="words")


def test_structured_extend_fills_leaf_then_opens_a_new_one():
    class Fixed:
        def embed_images(self, paths):
            return np.array([[float(p.name.startswith("far"))] * 2 for p in paths], np.float32)

    old = [ImageRecord(f"{i:064x}", f"images/a{i}.png", 8, 8) for i in range(6)]
    m = assign_identifiers(old, "structured", params={"k": 2, "c": 3}, embedder=Fixed())
    new = [ImageRecord(f"{100 + i:064x}", f"images/far{i}.png", 8, 8) for i in range(5)]
    m2 = m.extend(new, embedder=Fixed())
    new_ids = [m2.ids[r.key][0] for r in new]
    assert len(set(new_ids)) == 5 and all(m2.ids[r.key] == m.ids[r.key] for r in old)
    # the first full leaf cannot take them and the root has its k=2 children, so the leaf
    # spills: an overflow child named past its positions (index >= c=3) that opens new leaves
    assert any(int(i.split()[1].split("_")[1]) >= 3 for i in new_ids)


def test_structured_needs_an_embedder():
    with pytest.raises(Exception, match="embedder"):
        assign_identifiers(make_records(3), "structured")


def test_extend_refuses_images_already_identified():
    recs = make_records(5)
    m = assign("numeric", recs)
    with pytest.raises(InvalidInputError, match="image-already-identified"):
        m.extend(recs[:1])


def test_unknown_scheme_and_params_are_refused():
    with pytest.raises(ValueError, match="unknown identifier scheme"):
        assign_identifiers(make_records(2), "emoji")
    with pytest.raises(ValueError, match="unknown parameter"):
        assign_identifiers(make_records(2), "numeric", params={"branching": 3})


def test_corrupted_map_is_refused(tmp_path):
    m = assign("atomic", make_records(3))
    d = m.to_dict()
    first, second = list(d["ids"])[:2]
    d["ids"][second] = d["ids"][first]
    import json

    (tmp_path / "bad.json").write_text(json.dumps(d))
    with pytest.raises(InvalidInputError, match="bad.json.*shared"):
        IdentifierMap.load(tmp_path / "bad.json")
