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

The build clusters a node with sklearn's ``KMeans(n_init=3)`` up to ``sklearn_max_points``
(10,000) images, so small sets get the same identifiers as they always did, and with FAISS
k-means on a seeded sample, then an exact assignment of every image, above that (1M images in
minutes on 2 cores). It runs from an explicit stack over index arrays: no recursion limit, no
per-node copy of the embedding matrix.

The tree (centroids included) is kept in the map's state, so new images descend it to the
nearest leaf and take its next free position. Fan-out stays bounded as images arrive: an inner
node never gets more than ``k`` children and a leaf never more than ``c`` positions plus one
*overflow* child, so a decoder step chooses among at most ``max(k, c + 1)`` options. When the
nearest leaf is full, the image goes, in this order, to (1) a new leaf centred on it under the
nearest ancestor with fewer than ``k`` children; (2) the nearest free place under the nearest
ancestor of the leaf's neighbourhood (its parent, up through the overflow nodes above it) that
is not yet full; (3) else a full leaf spills: it gets one extra child, named by its next unused
position (``d_c`` for a leaf of ``c``: no position of that leaf is, or will be, that number),
an inner node that opens up to ``k`` leaves of its own. The spill is at the shallowest node of
the neighbourhood that still has a leaf without an overflow, so the neighbourhood fills
breadth first and depth grows like ``2 log_k(n / c)`` even if every new image lands in the same
place. Nothing existing is renamed, positions of removed images are never reused, and no
identifier is a node of another (positions and overflow names of a leaf are distinct numbers).
Inner nodes cache whether they are full in ``"full"``; trees without it (or without overflows)
load and extend as before.
"""

from __future__ import annotations

import base64
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.cluster import KMeans, MiniBatchKMeans
from sklearn.exceptions import ConvergenceWarning

from grace.errors import GraceError

# k=10: a 10-beam search keeps every first-level branch of a catalog, which retrieved better
# than the paper's k=30 (BENCHMARKS.md#retrieval-quality-on-the-demo-set); c=100 keeps 1000
# images at two levels. Maps store their parameters, so older maps keep theirs.
DEFAULT_K, DEFAULT_C = 10, 100
SKLEARN_MAX_POINTS = 10_000  # nodes up to this size: sklearn KMeans, ids as they always were
FAISS_POINTS_PER_CENTROID = 1024  # sample size per cluster for FAISS training on a large node
ASSIGN_CHUNK = 65_536  # rows per nearest-centroid search: bounds the copy of a large node


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
        return {"k": DEFAULT_K, "c": DEFAULT_C, "seed": 0, "tokens": "node"}

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
        _check_kc(k, c)
        _tokens_of(id_map)  # refuse an unknown token rule before the k-means
        tree = id_map.state.get("tree")
        if tree is None:
            ids, id_map.state["tree"] = structured_identifiers(emb, k=k, c=c, seed=seed)
        else:
            ids = [" ".join(p) for p in _place_many(tree, emb, k=k, c=c)]
        return {r.key: [i] for r, i in zip(records, ids, strict=True)}

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


def _check_kc(k: int, c: int) -> None:
    if k < 2 or c < 1:
        raise ValueError(f"structured ids need k >= 2 and c >= 1, got k={k} c={c}")


# ---- build -------------------------------------------------------------------------------


def structured_identifiers(
    emb: np.ndarray,
    k: int = DEFAULT_K,
    c: int = DEFAULT_C,
    seed: int = 0,
    *,
    sklearn_max_points: int = SKLEARN_MAX_POINTS,
) -> tuple[list[str], dict[str, Any]]:
    """Build the hierarchical k-means tree of ``emb`` and every row's identifier.

    What ``StructuredScheme`` does for a new map, without a map, embedder or records.

    Args:
        emb (`np.ndarray`): ``(n, dim)`` embeddings, one row per image (cast to float32).
        k (`int`): Branching: children of an inner node, at most.
        c (`int`): Leaf size: images of a leaf, at most.
        seed (`int`): Seed of the k-means.
        sklearn_max_points (`int`): Nodes of up to this many images are split with sklearn's
            ``KMeans(n_init=3)`` (the identifiers of every set up to this size are those of
            earlier versions), larger ones with FAISS k-means on a sample.

    Returns:
        `tuple[list[str], dict]`: The identifiers in row order, and the tree (JSON-ready, the
        map's ``state["tree"]``) that places further images.
    """
    _check_kc(k, c)
    emb = np.asarray(emb, dtype=np.float32)  # no copy when it is float32 already
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be a 2-d array, got shape {emb.shape}")
    ids: list[str] = [""] * emb.shape[0]
    holder: list[Any] = [None]
    # (rows of the node, its depth, its path, the list its dict goes in, index there)
    stack: list[tuple[np.ndarray, int, tuple[str, ...], list[Any], int]] = [
        (np.arange(emb.shape[0]), 0, (), holder, 0)
    ]
    while stack:  # depth first, explicitly: a tree of any depth fits, no recursion limit
        idx, depth, prefix, slot, at = stack.pop()
        if len(idx) <= c:
            for pos, i in enumerate(idx.tolist()):
                ids[i] = " ".join((*prefix, f"{depth}_{pos}"))
            slot[at] = {"leaf": True, "next": len(idx)}
            continue
        labels = _cluster(emb, idx, min(k, len(idx)), seed, sklearn_max_points)
        groups = _groups(idx, labels)
        if len(groups) < 2:  # identical embeddings: k-means cannot split, so split by order
            groups = np.array_split(idx, min(k, -(-len(idx) // c)))
        centroids = np.stack([emb[g].mean(axis=0) for g in groups])
        children: list[Any] = [None] * len(groups)
        slot[at] = {"leaf": False, "centroids": _encode(centroids), "children": children}
        for j in reversed(range(len(groups))):  # popped in order 0, 1, ...
            stack.append((groups[j], depth + 1, (*prefix, f"{depth}_{j}"), children, j))
    return ids, holder[0]


def _groups(idx: np.ndarray, labels: np.ndarray) -> list[np.ndarray]:
    """``idx[labels == j]`` for each label present, in label order, in one stable sort."""
    order = np.argsort(labels, kind="stable")  # stable: rows keep their order inside a group
    sorted_labels = labels[order]
    cuts = np.flatnonzero(sorted_labels[1:] != sorted_labels[:-1]) + 1
    return np.split(idx[order], cuts)


def _cluster(
    emb: np.ndarray, idx: np.ndarray, n_clusters: int, seed: int, sklearn_max_points: int
) -> np.ndarray:
    """k-means labels of the rows ``idx`` of ``emb``."""
    if len(idx) <= sklearn_max_points:
        with warnings.catch_warnings():  # duplicate embeddings are handled by the caller
            warnings.simplefilter("ignore", ConvergenceWarning)
            km = KMeans(n_clusters=n_clusters, n_init=3, random_state=seed)
            return km.fit_predict(emb[idx])
    # A large node: Lloyd's iterations on a seeded sample (k-means centroids settle long before
    # every point is seen), then every row to its nearest centroid, a chunk at a time so that
    # the node's rows are never copied at once.
    n_sample = min(len(idx), n_clusters * FAISS_POINTS_PER_CENTROID)
    sample = np.sort(np.random.default_rng(seed).choice(len(idx), n_sample, replace=False))
    x = np.ascontiguousarray(emb[idx[sample]])
    try:
        import faiss  # only in the dev extra: the library must work without it
    except ImportError:
        faiss = None
    if faiss is not None:
        km = faiss.Kmeans(
            emb.shape[1],
            n_clusters,
            niter=25,
            seed=seed,
            max_points_per_centroid=FAISS_POINTS_PER_CENTROID,
            verbose=False,
        )
        km.train(x)
        index = km.index
    else:  # the same role, slower: sklearn's mini-batch k-means on the sample
        mbk = MiniBatchKMeans(n_clusters=n_clusters, n_init=3, random_state=seed, batch_size=4096)
        index = _FlatL2(mbk.fit(x).cluster_centers_.astype(np.float32))
    labels = np.empty(len(idx), dtype=np.int64)
    for s in range(0, len(idx), ASSIGN_CHUNK):
        _, nearest = index.search(np.ascontiguousarray(emb[idx[s : s + ASSIGN_CHUNK]]), 1)
        labels[s : s + ASSIGN_CHUNK] = nearest[:, 0]
    return labels


class _FlatL2:
    """Nearest centroid by squared L2, ``faiss.IndexFlatL2.search``'s shape, in numpy."""

    def __init__(self, centroids: np.ndarray) -> None:
        self.centroids = centroids
        self.sq = (centroids**2).sum(axis=1)

    def search(self, x: np.ndarray, n: int) -> tuple[None, np.ndarray]:
        d = self.sq[None, :] - 2.0 * (x @ self.centroids.T)  # + |x|^2, the same for every row
        return None, d.argmin(axis=1)[:, None]


def tree_stats(tree: dict[str, Any]) -> dict[str, int]:
    """Shape of a structured-id tree: what bounds a decoder step and the identifier length.

    Args:
        tree (`dict`): A tree from ``structured_identifiers`` or a map's ``state["tree"]``.

    Returns:
        `dict[str, int]`: ``nodes`` (inner nodes and leaves), ``leaves``, ``overflows`` (leaves
        with an overflow child), ``max_fanout`` (the most children or positions, removed ones
        included, plus an overflow, of any node: a decoder step's choices) and ``max_depth``
        (edges from the root to the deepest node).
    """
    out = {"nodes": 0, "leaves": 0, "overflows": 0, "max_fanout": 0, "max_depth": 0}
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        out["nodes"] += 1
        out["max_depth"] = max(out["max_depth"], depth)
        if node["leaf"]:
            out["leaves"] += 1
            # positions 0..next-1; after a spill ``next`` also counts the overflow's name
            out["max_fanout"] = max(out["max_fanout"], int(node["next"]))
            if "overflow" in node:
                out["overflows"] += 1
                stack.append((node["overflow"], depth + 1))
        else:
            out["max_fanout"] = max(out["max_fanout"], len(node["children"]))
            stack.extend((ch, depth + 1) for ch in node["children"])
    return out


# ---- incremental placement -----------------------------------------------------------------


def _place(tree: dict[str, Any], e: np.ndarray, c: int, k: int) -> list[str]:
    """The identifier parts of a new image ``e``, placed in ``tree`` (the module docstring)."""
    return _place_many(tree, np.asarray(e, np.float32)[None, :], k=k, c=c)[0]


def _place_many(tree: dict[str, Any], emb: np.ndarray, *, k: int, c: int) -> list[list[str]]:
    """Place the rows of ``emb`` in ``tree`` one after another; their identifier parts.

    The same as ``_place`` row by row, but centroids are decoded once and encoded once.
    """
    placer = _Placer(tree, k, c)
    try:
        return [placer.place(e) for e in np.asarray(emb, np.float32)]
    finally:
        placer.flush()  # an error half way leaves a consistent tree of what was placed


class _Placer:
    """Places images in a tree; keeps the decoded centroids of the nodes it has seen."""

    def __init__(self, tree: dict[str, Any], k: int, c: int) -> None:
        self.tree, self.k, self.c = tree, k, c
        self._cents: dict[int, tuple[dict[str, Any], np.ndarray]] = {}  # id(node) -> node, cents
        self._dirty: set[int] = set()

    # -- centroids --
    def cents(self, node: dict[str, Any]) -> np.ndarray:
        hit = self._cents.get(id(node))
        if hit is None:
            hit = self._cents[id(node)] = (node, _decode(node["centroids"]))
        return hit[1]

    def nearest(self, node: dict[str, Any], e: np.ndarray) -> np.ndarray:
        """Child indices of ``node`` from the nearest centroid to ``e`` (ties: lower first)."""
        d = ((self.cents(node) - e) ** 2).sum(axis=1)
        return np.argsort(d, kind="stable")

    def add_child(self, node: dict[str, Any], centre: np.ndarray, child: dict[str, Any]) -> int:
        cents = np.vstack([self.cents(node), centre[None, :]])
        self._cents[id(node)] = (node, cents)
        self._dirty.add(id(node))
        node["children"].append(child)
        return len(node["children"]) - 1

    def flush(self) -> None:
        for key in self._dirty:
            node, cents = self._cents[key]
            node["centroids"] = _encode(cents)
        self._dirty.clear()

    # -- caches on inner nodes, derivable from the tree: whether the node is full, and how many
    # levels down its nearest leaf without an overflow is. Trees without them compute them.
    def full(self, node: dict[str, Any]) -> bool:
        """No free position and no free child slot anywhere below ``node``."""
        if node["leaf"]:
            over = node.get("overflow")
            return node["next"] >= self.c if over is None else self.full(over)
        if "full" not in node:
            self._recompute(node)
        return node["full"]

    def plain_depth(self, node: dict[str, Any]) -> int:
        """Levels from ``node`` down to the nearest leaf without an overflow (0: it is one)."""
        if node["leaf"]:
            over = node.get("overflow")
            return 0 if over is None else 1 + self.plain_depth(over)
        if "plain_depth" not in node:
            self._recompute(node)
        return node["plain_depth"]

    def _recompute(self, node: dict[str, Any]) -> None:
        children = node["children"]
        node["full"] = len(children) >= self.k and all(self.full(ch) for ch in children)
        node["plain_depth"] = 1 + min(self.plain_depth(ch) for ch in children)

    def refresh(self, nodes: list[dict[str, Any]]) -> None:
        """Recompute the caches along a changed path, bottom up (only its nodes changed)."""
        for node in reversed(nodes):
            if not node["leaf"]:
                self._recompute(node)

    # -- placement --
    def place(self, e: np.ndarray) -> list[str]:
        # nodes[i] is at depth i; names[i] is the name of nodes[i + 1] under nodes[i]
        nodes, names = self.descend([self.tree], [], e)
        leaf = nodes[-1]
        if leaf["next"] < self.c:
            return self.take(nodes, names)
        region = self.region(nodes)
        for i in range(len(nodes) - 2, -1, -1):  # ancestors, nearest first
            node = nodes[i]
            if node["leaf"]:  # a leaf with an overflow: that is its only child
                continue
            if len(node["children"]) < self.k:  # (1) a free child slot: a leaf centred on e
                return self.open_leaf(nodes[: i + 1], names[:i], e)
            if i in region and not self.full(node):  # (2) free room in the neighbourhood
                return self.into_room(nodes[: i + 1], names[:i], e)
        if not region:  # the root is a full leaf: it spills itself
            return self.spill(nodes, names, e)
        # (3) the neighbourhood is full: its shallowest leaf without an overflow spills, so it
        # fills breadth first (ties: the nearer child)
        top = min(region)
        nodes, names = nodes[: top + 1], names[:top]
        node = nodes[-1]
        while not node["leaf"] or "overflow" in node:
            if node["leaf"]:
                over = node["overflow"]
                nodes, names, node = [*nodes, over], [*names, int(node["overflow_at"])], over
                continue
            children, want = node["children"], self.plain_depth(node) - 1
            order = self.nearest(node, e).tolist()
            j = next(j for j in order if self.plain_depth(children[j]) == want)
            nodes, names, node = [*nodes, children[j]], [*names, j], children[j]
        return self.spill(nodes, names, e)

    def descend(
        self, nodes: list[dict[str, Any]], names: list[int], e: np.ndarray
    ) -> tuple[list[dict[str, Any]], list[int]]:
        """From ``nodes[-1]`` down to the nearest leaf without an overflow."""
        node = nodes[-1]
        while True:
            if node["leaf"]:
                over = node.get("overflow")
                if over is None:
                    return nodes, names
                nodes.append(over)
                names.append(int(node["overflow_at"]))
                node = over
                continue
            j = int(self.nearest(node, e)[0])
            node = node["children"][j]
            nodes.append(node)
            names.append(j)

    def region(self, nodes: list[dict[str, Any]]) -> set[int]:
        """Depths of the neighbourhood of the leaf ``nodes[-1]``.

        Its parent, up through overflow nodes (the children of leaves), to the first inner node
        that is not one, included.
        """
        out: set[int] = set()
        i = len(nodes) - 2
        while i >= 0:
            out.add(i)
            if i == 0 or not nodes[i - 1]["leaf"]:
                break
            i -= 2  # nodes[i] is an overflow: go on at the parent of its leaf
        return out

    def take(self, nodes: list[dict[str, Any]], names: list[int]) -> list[str]:
        leaf = nodes[-1]
        pos = leaf["next"]
        leaf["next"] = pos + 1
        self.refresh(nodes)
        return _parts(names, pos)

    def open_leaf(self, nodes: list[dict[str, Any]], names: list[int], e: np.ndarray) -> list[str]:
        leaf = {"leaf": True, "next": 0}
        j = self.add_child(nodes[-1], e, leaf)
        return self.take([*nodes, leaf], [*names, j])

    def into_room(self, nodes: list[dict[str, Any]], names: list[int], e: np.ndarray) -> list[str]:
        """Place ``e`` below ``nodes[-1]``, which is not full: nearest non-full children down."""
        node = nodes[-1]
        while True:
            if node["leaf"]:
                over = node.get("overflow")
                if over is None:  # not full, so it has a free position
                    return self.take(nodes, names)
                nodes, names, node = [*nodes, over], [*names, int(node["overflow_at"])], over
                continue
            order = self.nearest(node, e).tolist()
            children = node["children"]
            if self.full(children[order[0]]) and len(children) < self.k:
                return self.open_leaf(nodes, names, e)
            j = next(j for j in order if not self.full(children[j]))
            nodes, names, node = [*nodes, children[j]], [*names, j], children[j]

    def spill(self, nodes: list[dict[str, Any]], names: list[int], e: np.ndarray) -> list[str]:
        """Give the full leaf ``nodes[-1]`` its overflow child, an inner node with one leaf."""
        leaf = nodes[-1]
        at = int(leaf["next"])  # never a position of this leaf, now or later
        first = {"leaf": True, "next": 0}
        over = {"leaf": False, "centroids": _encode(e[None, :]), "children": [first]}
        leaf["overflow"], leaf["overflow_at"], leaf["next"] = over, at, at + 1
        return self.take([*nodes, over, first], [*names, at, 0])


def _parts(names: list[int], pos: int) -> list[str]:
    return [*(f"{d}_{j}" for d, j in enumerate(names)), f"{len(names)}_{pos}"]
