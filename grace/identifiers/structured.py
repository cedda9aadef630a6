"""Structured identifiers: the path to an image in a hierarchical k-means tree of its embedding.

As in the paper: branching ``k``, leaves of at most ``c`` images, and level-prefixed parts, the
last one being the position inside the leaf: ``0_12 1_3 2_27``. Images close in embedding space
share prefixes, so an identifier carries information a query can predict. The paper's k=30,
c=30 split every node of 31-60 images into up to 30 leaves of one or two, a level of nodes
that each see almost no training; the default c=100 keeps 1000 images at two levels.

How the parts become tokens is the ``tokens`` parameter. ``level`` (the paper's, and what a map
without the parameter uses) makes each part a token shared by every node of its level, so the
last token, a position whose meaning is arbitrary per leaf, has to be stored in the decoder's
weights as a random code, and memorizes far worse than per-node tokens (BENCHMARKS.md).
``node`` (the default for new maps) gives every tree node a token of its own,
``<0_12> <0_12,1_3> <0_12,1_3,2_27>``: a prefix-aware output layer in the spirit of NCI's PAWA
decoder, where each step chooses among one node's children and the leaf token is an output row
of its image, as an atomic id is. The identifier strings are the same either way.

The tree (centroids included) is kept in the map's state, so new images descend it to the nearest
leaf and take its next free position; a full leaf makes the parent open a new leaf centred on
the new image. Positions of removed images are never reused.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans
from sklearn.exceptions import ConvergenceWarning

from grace.errors import GraceError


def _encode(a: np.ndarray) -> dict[str, Any]:
    a = np.ascontiguousarray(a, dtype="<f4")
    return {"shape": list(a.shape), "f32_b64": base64.b64encode(a.tobytes()).decode("ascii")}


def _decode(d: dict[str, Any]) -> np.ndarray:
    raw = base64.b64decode(d["f32_b64"])
    return np.frombuffer(raw, dtype="<f4").reshape(d["shape"]).copy()


class StructuredScheme:
    """Paths in a hierarchical k-means tree of the images' embeddings (see the module docstring).

    Parameters: ``k`` (branching), ``c`` (leaf size), ``seed`` and ``tokens`` (``node`` or
    ``level``).
    """

    name = "structured"

    def default_params(self) -> dict[str, Any]:
        return {"k": 30, "c": 100, "seed": 0, "tokens": "node"}

    def issue(self, id_map, records, *, embedder=None, captioner=None, root=None):
        if not records:
            return {}
        if embedder is None:
            raise GraceError(
                "the structured scheme needs an image embedder (e.g. --embedder dual-encoder)"
            )
        base = Path(root) if root is not None else Path(".")
        emb = np.asarray(embedder.embed_images([base / r.path for r in records]), np.float32)
        if emb.shape[0] != len(records):
            raise ValueError("the embedder returned a different number of embeddings")
        k, c, seed = (int(id_map.params[p]) for p in ("k", "c", "seed"))
        if k < 2 or c < 1:
            raise ValueError(f"structured ids need k >= 2 and c >= 1, got k={k} c={c}")
        _tokens_of(id_map)  # refuse an unknown token rule before the k-means
        tree = id_map.state.get("tree")
        if tree is None:
            paths: dict[int, list[str]] = {}
            id_map.state["tree"] = _build(np.arange(len(records)), emb, 0, [], paths, k, c, seed)
            return {r.key: [" ".join(paths[i])] for i, r in enumerate(records)}
        return {r.key: [" ".join(_place(tree, e, c))] for r, e in zip(records, emb, strict=True)}

    def token_text(self, id_map, identifier: str) -> str:
        return " ".join(_tokens_of(id_map)(identifier))

    def new_tokens(self, id_map) -> list[str]:
        split = _tokens_of(id_map)
        return list(dict.fromkeys(t for i in sorted(id_map.issued()) for t in split(i)))


def _tokens_of(id_map) -> Callable[[str], list[str]]:
    """Identifier -> tokens for this map: ``str.split`` per level, ``node_tokens`` per node."""
    kind = id_map.params.get("tokens", "level")  # maps from before the parameter: level tokens
    rules = {"level": str.split, "node": node_tokens}
    if kind not in rules:
        raise ValueError(f"structured ids: tokens must be one of {tuple(rules)}, got {kind!r}")
    return rules[kind]


def node_tokens(identifier: str) -> list[str]:
    """One token per tree node on the path: ``0_12 1_3`` -> ``<0_12>``, ``<0_12,1_3>``.

    Every token ends with ``>``, which no part contains, so no token is a prefix of another and
    a tokenizer's added-token matching cannot split one into two.
    """
    parts = identifier.split()
    return ["<" + ",".join(parts[: n + 1]) + ">" for n in range(len(parts))]


def _build(
    idx: np.ndarray,
    emb: np.ndarray,
    depth: int,
    prefix: list[str],
    paths: dict[int, list[str]],
    k: int,
    c: int,
    seed: int,
) -> dict[str, Any]:
    if len(idx) <= c:
        for pos, i in enumerate(idx):
            paths[int(i)] = [*prefix, f"{depth}_{pos}"]
        return {"leaf": True, "next": len(idx)}
    x = emb[idx]
    with warnings.catch_warnings():  # duplicate embeddings are handled just below
        warnings.simplefilter("ignore", ConvergenceWarning)
        labels = KMeans(n_clusters=min(k, len(idx)), n_init=3, random_state=seed).fit_predict(x)
    groups = [idx[labels == j] for j in np.unique(labels)]
    if len(groups) < 2:  # identical embeddings: k-means cannot split, so split by order
        groups = np.array_split(idx, min(k, -(-len(idx) // c)))
    children, centroids = [], []
    for j, members in enumerate(groups):
        centroids.append(emb[members].mean(axis=0))
        children.append(
            _build(members, emb, depth + 1, [*prefix, f"{depth}_{j}"], paths, k, c, seed)
        )
    return {"leaf": False, "centroids": _encode(np.stack(centroids)), "children": children}


def _place(tree: dict[str, Any], e: np.ndarray, c: int) -> list[str]:
    """Descend to the nearest leaf and take its next position, opening a new leaf when full."""
    node, parent, depth, path = tree, None, 0, []
    while not node["leaf"]:
        cents = _decode(node["centroids"])
        j = int(np.argmin(((cents - e) ** 2).sum(axis=1)))
        parent, node, depth, path = node, node["children"][j], depth + 1, [*path, f"{depth}_{j}"]
    if node["next"] < c or parent is None:  # a root leaf has no parent to open a sibling in
        pos = node["next"]
        node["next"] += 1
        return [*path, f"{depth}_{pos}"]
    cents = _decode(parent["centroids"])
    parent["centroids"] = _encode(np.vstack([cents, e[None, :]]))
    parent["children"].append({"leaf": True, "next": 1})
    j = len(parent["children"]) - 1
    return [*path[:-1], f"{depth - 1}_{j}", f"{depth}_0"]
