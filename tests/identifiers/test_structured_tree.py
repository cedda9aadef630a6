"""The structured-id tree: bounded fan-out at every size, stable ids, the large-node build path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from grace.identifiers.structured import (
    _place_many,
    node_tokens,
    structured_identifiers,
    tree_stats,
)


def _blobs(n: int, dim: int = 8, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(6, dim)) * 4
    return (centres[rng.integers(0, 6, n)] + rng.normal(size=(n, dim))).astype(np.float32)


def _assert_prefix_free(ids: list[str]) -> None:
    """No identifier's token sequence is a proper prefix of another's (the trie needs that)."""
    seqs = {tuple(node_tokens(i)) for i in ids}
    assert len(seqs) == len(ids)
    for s in seqs:
        for n in range(1, len(s)):
            assert s[:n] not in seqs


def _leaf_sizes(ids: list[str]) -> dict[tuple[str, ...], int]:
    out: dict[tuple[str, ...], int] = {}
    for i in ids:
        parent = tuple(i.split()[:-1])
        out[parent] = out.get(parent, 0) + 1
    return out


def test_build_bounds_fanout_and_leaf_size():
    ids, tree = structured_identifiers(_blobs(700), k=4, c=10, seed=0)
    stats = tree_stats(tree)
    assert len(set(ids)) == 700
    assert stats["max_fanout"] <= 10 and stats["overflows"] == 0
    assert max(_leaf_sizes(ids).values()) <= 10
    _assert_prefix_free(ids)


def test_build_is_deterministic_for_a_seed():
    emb = _blobs(300)
    assert (
        structured_identifiers(emb, k=3, c=20, seed=1)[0]
        == (structured_identifiers(emb, k=3, c=20, seed=1)[0])
    )


@pytest.mark.parametrize("faiss_available", [True, False])
def test_large_nodes_take_the_sample_path(monkeypatch, faiss_available):
    """Above ``sklearn_max_points`` a node is split on a sample (FAISS, else mini-batch)."""
    if not faiss_available:
        import builtins

        real_import = builtins.__import__

        def no_faiss(name, *args, **kwargs):
            if name == "faiss":
                raise ImportError("faiss hidden by the test")
            return real_import(name, *args, **kwargs)

        monkeypatch.setattr(builtins, "__import__", no_faiss)
    else:
        pytest.importorskip("faiss")
    emb = _blobs(3000, seed=3)
    ids, tree = structured_identifiers(emb, k=5, c=50, seed=0, sklearn_max_points=200)
    stats = tree_stats(tree)
    assert len(set(ids)) == 3000
    assert stats["max_fanout"] <= 50
    assert max(_leaf_sizes(ids).values()) <= 50
    _assert_prefix_free(ids)
    # the clustering still means something: rows of one blob share a first token far more
    # often than a random split of 5 would give
    rng = np.random.default_rng(3)
    blob = rng.normal(size=(6, 8)) * 4  # same draw as _blobs: recover the blob of each row
    labels = ((emb[:, None, :] - blob[None]) ** 2).sum(-1).argmin(1)
    first = np.array([i.split()[0] for i in ids])
    same = np.mean([np.mean(first[labels == b] == _mode(first[labels == b])) for b in range(6)])
    assert same > 0.6


def _mode(a: np.ndarray) -> str:
    values, counts = np.unique(a, return_counts=True)
    return str(values[counts.argmax()])


@settings(max_examples=25, deadline=None)
@given(
    k=st.integers(2, 5),
    c=st.integers(1, 6),
    n_old=st.integers(1, 40),
    n_new=st.integers(1, 120),
    same_place=st.booleans(),
    seed=st.integers(0, 3),
)
def test_extension_keeps_fanout_bounded_and_old_ids(k, c, n_old, n_new, same_place, seed):
    """However new images arrive (all onto one point included), no node passes its bound."""
    old = _blobs(n_old, dim=4, seed=seed)
    ids, tree = structured_identifiers(old, k=k, c=c, seed=seed)
    before = list(ids)
    if same_place:  # the adversarial case: every new image lands in the same leaf
        new = np.repeat(old[:1], n_new, axis=0)
    else:
        new = _blobs(n_new, dim=4, seed=seed + 10)
    new_ids = [" ".join(p) for p in _place_many(tree, new, k=k, c=c)]
    everything = before + new_ids
    assert ids == before  # nothing already issued is renamed
    assert len(set(everything)) == len(everything)
    _assert_prefix_free(everything)
    stats = tree_stats(tree)
    assert stats["max_fanout"] <= max(k, c + 1)
    # depth grows like log n, not like n: twice log_k(n / c) plus the levels of the first build
    n = len(everything)
    bound = 2 * math.ceil(math.log(max(n / c, 1), k)) + 4
    assert stats["max_depth"] <= bound, (stats, bound)


def test_extension_of_a_tree_without_caches_loads_as_before():
    """Trees saved before the bounded placement (no ``full`` caches) extend the same way."""
    emb = _blobs(60, dim=4)
    ids, tree = structured_identifiers(emb, k=3, c=5, seed=0)
    more = _blobs(30, dim=4, seed=9)
    with_caches = [" ".join(p) for p in _place_many(tree, more, k=3, c=5)]

    def strip(node):
        node.pop("full", None)
        node.pop("plain_depth", None)
        for ch in node.get("children", []):
            strip(ch)
        if "overflow" in node:
            strip(node["overflow"])

    _, fresh = structured_identifiers(emb, k=3, c=5, seed=0)
    strip(fresh)
    assert [" ".join(p) for p in _place_many(fresh, more, k=3, c=5)] == with_caches
