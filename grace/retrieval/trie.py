"""A compact array prefix trie over identifier token sequences, for constrained beam search.

A dict-of-dicts trie (GENRE's) spends a Python dict per node; here the whole trie is three flat
int32 arrays (12 bytes per node), built with vectorized numpy from the sorted sequences and read
for a whole beam batch at once (why and how it compares: docs/performance.md#trie-layout).

Layout (CSR, nodes numbered breadth-first, siblings sorted by token):

* ``first_child[n]:first_child[n + 1]`` are the edges leaving node ``n``;
* ``edge_token[e]`` labels edge ``e``, which leads to node ``e + 1`` (breadth-first numbering
  makes the child of edge ``e`` node ``e + 1``, so no child array is needed);
* the end of an identifier is an edge labelled EOS to a leaf, so an identifier may be a prefix of
  another (``[5, 6]`` and ``[5, 6, 7]``: after ``[5, 6]`` both EOS and 7 are allowed);
* ``count[n]`` is the number of live sequences through node ``n``; an edge is allowed iff
  ``count`` of its child is positive, which is how ``remove`` works without rebuilding.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from itertools import chain

import numpy as np
import torch
from transformers import LogitsProcessor

from grace.atomic_io import atomic_path

_FORMAT_VERSION = 1
_PAD = -1  # fills cells past a sequence's EOS; never equal to a token

Columns = list[np.ndarray]
"""Sequences column by column: column ``j`` holds every sequence's token ``j``, EOS right after
its last token, then ``_PAD``. Separate columns let a build free each one once it is used."""


def _as_columns(sequences: Iterable[Sequence[int]] | np.ndarray, eos: int) -> Columns:
    """Sequences as ``Columns`` (int16 when the tokens fit, to halve the build's peak memory).

    Refuses what could not be an identifier: empty sequences, negative tokens, EOS inside one.
    """
    if isinstance(sequences, torch.Tensor):
        sequences = sequences.detach().cpu().numpy()
    if isinstance(sequences, np.ndarray) and sequences.ndim == 2:
        n, width = sequences.shape
        flat = sequences.astype(np.int64, copy=False).ravel()
        lengths = np.full(n, width, dtype=np.int64)
    else:
        if not isinstance(sequences, Sequence):
            sequences = list(sequences)
        n = len(sequences)
        lengths = np.fromiter(map(len, sequences), dtype=np.int64, count=n)
        try:
            flat = np.fromiter(
                chain.from_iterable(sequences), dtype=np.int32, count=int(lengths.sum())
            )
        except OverflowError as e:
            raise ValueError("token ids must be in [0, 2**31)") from e
    if n and lengths.min() == 0:
        raise ValueError("an identifier needs at least one token")
    top = max(int(flat.max()) if flat.size else 0, eos)
    if flat.size and (flat.min() < 0 or top > np.iinfo(np.int32).max):
        raise ValueError("token ids must be in [0, 2**31)")
    if (flat == eos).any():
        raise ValueError(f"EOS ({eos}) cannot occur inside an identifier")
    dtype = np.int16 if top < np.iinfo(np.int16).max else np.int32
    starts = np.cumsum(lengths) - lengths
    cols = []
    for j in range(int(lengths.max()) + 1 if n else 1):
        col = np.full(n, _PAD, dtype=dtype)
        rows = np.flatnonzero(lengths > j)
        col[rows] = flat[starts[rows] + j]
        col[lengths == j] = eos
        cols.append(col)
    return cols


def _widen(cols: Columns, width: int) -> Columns:
    """``cols`` with ``_PAD`` columns added up to ``width``."""
    n = cols[0].size
    return cols + [np.full(n, _PAD, dtype=cols[0].dtype) for _ in range(width - len(cols))]


class Trie:
    """Prefix trie of identifier token sequences; see the module docstring for the layout.

    ``insert`` of a sequence that was never in the trie rebuilds the arrays (O(total tokens),
    under a second per million identifiers): fine for adding thousands of identifiers at a time,
    and it drops the dead nodes ``remove`` leaves behind. Re-inserting a removed sequence and
    ``remove`` only update ``count``.
    """

    def __init__(self, sequences: Sequence[Sequence[int]] = (), *, eos_token_id: int) -> None:
        if not 0 <= int(eos_token_id) <= np.iinfo(np.int32).max:
            raise ValueError("eos_token_id must be a token id in [0, 2**31)")
        self.eos_token_id = int(eos_token_id)
        self._build(_as_columns(sequences, self.eos_token_id))

    # ---- construction -------------------------------------------------------------------------

    def _build(self, cols: Columns) -> None:
        """Arrays from ``Columns`` (duplicates allowed), vectorized; empties ``cols`` as it goes.

        Sort the rows; at each depth a row starts a new node where its prefix differs from the
        previous row's. In sorted order these nodes come sorted by (parent, token): breadth-first.
        """
        n = cols[0].size
        if n:
            order = np.lexsort(cols[::-1])
            for j, col in enumerate(cols):
                cols[j] = col[order]
            del order, col
            same = np.ones(n - 1, dtype=bool)
            for col in cols:
                same &= col[1:] == col[:-1]
            if same.any():
                keep = np.concatenate([[True], ~same])
                for j, col in enumerate(cols):
                    cols[j] = col[keep]
                n = cols[0].size
            del same
        # Pass 1: nodes per depth, so the arrays are allocated once at their final size.
        changed = np.zeros(n, dtype=bool)
        changed[:1] = True
        sizes = [1]
        for col in cols:
            changed[1:] |= col[1:] != col[:-1]
            k = int(np.count_nonzero(changed & (col != _PAD)))
            if k == 0:
                break
            sizes.append(k)
        num_nodes = sum(sizes)
        first_child = np.zeros(num_nodes + 1, dtype=np.int32)  # children counts, then offsets
        edge_token = np.empty(num_nodes - 1, dtype=np.int32)
        count = np.empty(num_nodes, dtype=np.int32)
        count[0] = n
        # Pass 2: fill depth by depth, freeing each column once used.
        changed[:] = False
        changed[:1] = True
        row_node = np.zeros(n, dtype=np.int32)  # each row's node at the depth above, depth-local
        prev_base, base = 0, 1  # first node ids of the depth above and of this depth
        for d, k in enumerate(sizes[1:]):
            col = cols[d]
            changed[1:] |= col[1:] != col[:-1]
            valid = col != _PAD
            new = changed & valid
            parent_slice = slice(1 + prev_base, 1 + prev_base + sizes[d])
            first_child[parent_slice] = np.bincount(row_node[new], minlength=sizes[d])
            edge_token[base - 1 : base - 1 + k] = col[new]
            row_node = np.cumsum(new, dtype=np.int32)
            row_node -= 1
            count[base : base + k] = np.bincount(row_node[valid], minlength=k)
            prev_base, base = base, base + k
            cols[d] = None
            del col, valid, new
        cols.clear()
        np.cumsum(first_child, out=first_child)
        self._set_arrays(first_child, edge_token, count)

    def _set_arrays(self, first_child: np.ndarray, edge_token: np.ndarray, count: np.ndarray):
        self.first_child = first_child
        self.edge_token = edge_token
        self.count = count
        # The root is the widest node and every walk starts there: a token -> child table,
        # unless token ids are so sparse that it would be big (then the root is searched too).
        root_tokens = edge_token[: first_child[1]].astype(np.int64)
        size = int(root_tokens.max()) + 1 if root_tokens.size else 0
        self._root_table = None
        if size <= max(1 << 16, 4 * root_tokens.size):
            self._root_table = np.full(size, -1, dtype=np.int64)
            self._root_table[root_tokens] = np.arange(1, root_tokens.size + 1)
        self._sink = count.size - 1  # a childless node (the last breadth-first) to park dead rows
        self._pruned = bool((count == 0).any())  # dead nodes that lookups must skip
        self._top_token = int(edge_token.max()) if edge_token.size else -1

    # ---- sizes and membership -----------------------------------------------------------------

    @property
    def num_nodes(self) -> int:
        """Nodes, root and EOS leaves included (dead nodes too, until the next rebuild)."""
        return int(self.count.size)

    @property
    def nbytes(self) -> int:
        """Bytes of the arrays: the trie's whole size in memory and (uncompressed) on disk."""
        return int(self.first_child.nbytes + self.edge_token.nbytes + self.count.nbytes)

    def __len__(self) -> int:
        return int(self.count[0])

    def __contains__(self, seq: object) -> bool:
        try:
            cols = _as_columns([seq], self.eos_token_id)  # type: ignore[list-item]
        except (TypeError, ValueError):
            return False
        _, ok = self._walk(cols, live_only=True)
        return bool(ok[0])

    # ---- lookup -------------------------------------------------------------------------------

    def _child(self, node: np.ndarray, tok: np.ndarray, live_only: bool) -> np.ndarray:
        """Child of each ``node`` along the edge labelled ``tok``; -1 where there is none.

        A binary search run in lockstep over the batch, each row within its node's edge slice,
        for only as many rounds as the widest of these nodes needs (the root is a table lookup).
        """
        fc, et = self.first_child, self.edge_token
        if et.size == 0 or node.size == 0:
            return np.full(node.shape, -1, dtype=np.int64)
        if self._root_table is not None and not node.any():  # all at the root: first position
            table = self._root_table
            inside = (tok >= 0) & (tok < table.size)
            child = np.where(inside, table.take(tok, mode="clip"), -1)
        else:
            lo = fc[node].astype(np.int64)
            end = fc[node + 1].astype(np.int64)
            hi = end
            for _ in range(int((end - lo).max()).bit_length()):
                active = lo < hi
                mid = (lo + hi) >> 1
                less = et.take(mid, mode="clip") < tok
                lo = np.where(active & less, mid + 1, lo)
                hi = np.where(active & ~less, mid, hi)
            found = (lo < end) & (et.take(lo, mode="clip") == tok)
            child = np.where(found, lo + 1, -1)
        if live_only:
            child = np.where(self.count.take(child, mode="clip") > 0, child, -1)
        return child

    def _walk(
        self, cols: Columns, live_only: bool, path: bool = False
    ) -> tuple[np.ndarray, np.ndarray]:
        """Follow every row of ``cols`` from the root, ``_PAD`` cells skipped.

        Returns (node reached, or the nodes visited ``(n, width + 1)`` with -1 past the end when
        ``path``; whether the whole row was found).
        """
        n, width = cols[0].size, len(cols)
        node = np.zeros(n, dtype=np.int64)
        ok = np.ones(n, dtype=bool)
        nodes = np.full((n, width + 1), -1, dtype=np.int64) if path else None
        if path:
            nodes[:, 0] = 0
        for j, col in enumerate(cols):
            tok = col.astype(np.int64)
            step = ok & (tok != _PAD)
            if not step.any():
                break
            child = self._child(np.where(step, node, self._sink), tok, live_only)
            ok &= ~step | (child >= 0)
            node = np.where(step & ok, child, node)
            if path:
                nodes[:, j + 1] = np.where(step & ok, child, -1)
        return (nodes if path else node), ok

    def allowed_next(self, prefix: Sequence[int]) -> np.ndarray:
        """Sorted tokens allowed after ``prefix`` (EOS if it is a complete id); empty if invalid."""
        node = 0
        for t in prefix:
            child = self._child(np.array([node]), np.array([int(t)]), live_only=True)[0]
            if child < 0:
                return np.zeros(0, dtype=np.int64)
            node = int(child)
        lo, hi = int(self.first_child[node]), int(self.first_child[node + 1])
        live = self.count[lo + 1 : hi + 1] > 0
        return self.edge_token[lo:hi][live].astype(np.int64)

    def next_token_mask(self, prefixes: np.ndarray | torch.Tensor, vocab_size: int) -> torch.Tensor:
        """Boolean ``(batch, vocab_size)``: which tokens may follow each row of ``prefixes``.

        All rows are walked in lockstep (a loop over positions, none over rows); a row with an
        invalid or already complete prefix gets no allowed token. Tokens >= ``vocab_size`` are
        dropped.
        """
        if isinstance(prefixes, torch.Tensor):
            prefixes = prefixes.detach().cpu().numpy()
        prefixes = np.asarray(prefixes, dtype=np.int64)
        if prefixes.ndim != 2:
            raise ValueError("prefixes must be a (batch, length) matrix")
        batch, length = prefixes.shape
        node = np.zeros(batch, dtype=np.int64)
        for j in range(length):
            node = self.advance(node, prefixes[:, j])
        return self.node_mask(node, vocab_size)

    def advance(self, nodes: np.ndarray, tokens: np.ndarray) -> np.ndarray:
        """The node each of ``nodes`` reaches by its token along a live edge, or a dead end.

        A decoder that keeps each beam's node calls this once per step instead of walking every
        prefix again; a dead end (invalid prefix, or past EOS) allows nothing in ``node_mask``.
        """
        child = self._child(np.asarray(nodes, dtype=np.int64), np.asarray(tokens), live_only=True)
        return np.where(child >= 0, child, self._sink)

    def live_edges(self, nodes: np.ndarray, *, with_degree: bool = False) -> tuple[np.ndarray, ...]:
        """``(row, token, child)`` of every live edge leaving ``nodes[row]``.

        Rows are ascending, and tokens ascending within a row (``with_degree``: also each row's
        number of edges).

        What a decoder that keeps each beam's node needs at a step: the few tokens each beam may
        emit and the node each one leads to, read straight off the CSR arrays (no full-vocabulary
        mask, no search for the child). A dead end (see ``advance``) has no edges. A search
        calls this at every step between model steps, which evict numpy's code and data from
        the caches: each numpy call costs several times what it costs alone, so it makes few.
        """
        nodes = np.asarray(nodes, dtype=np.int64)
        lo = self.first_child[nodes]
        degree = self.first_child[nodes + 1] - lo
        row = np.repeat(np.arange(degree.size), degree)
        # edges of row r: lo[r], lo[r] + 1, ...; child node = edge + 1 (the root has no edge)
        edge = np.arange(row.size) + np.repeat(lo - (np.cumsum(degree) - degree), degree)
        tok = self.edge_token[edge]
        child = edge + 1
        if self._pruned:  # only after ``remove``, until a rebuild
            live = self.count[child] > 0
            row, tok, child = row[live], tok[live], child[live]
            degree = np.bincount(row, minlength=degree.size)
        return (row, tok, child, degree) if with_degree else (row, tok, child)

    def degree(self, nodes: np.ndarray) -> np.ndarray:
        """How many children each of ``nodes`` has (removed ones included until a rebuild)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        return self.first_child[nodes + 1] - self.first_child[nodes]

    @property
    def dead_end(self) -> int:
        """A node without children, where ``advance`` parks rows that left the trie."""
        return int(self._sink)

    @property
    def top_token(self) -> int:
        """The largest token on any edge (-1 if none).

        A search whose vocabulary is larger need not drop tokens it cannot score.
        """
        return self._top_token

    def node_mask(self, nodes: np.ndarray, vocab_size: int) -> torch.Tensor:
        """Boolean ``(len(nodes), vocab_size)``: the live edges leaving each node (root: 0)."""
        nodes = np.asarray(nodes, dtype=np.int64)
        mask = np.zeros((nodes.size, vocab_size), dtype=bool)
        # Beams share prefixes: expand each distinct node once, then copy rows.
        uniq, inverse = np.unique(nodes, return_inverse=True)
        lo = self.first_child[uniq].astype(np.int64)
        deg = self.first_child[uniq + 1].astype(np.int64) - lo
        total = int(deg.sum())
        if total:
            owner = np.repeat(np.arange(uniq.size), deg)
            edge = np.arange(total) - np.repeat(np.cumsum(deg) - deg, deg) + np.repeat(lo, deg)
            tok = self.edge_token[edge]
            keep = (self.count[edge + 1] > 0) & (tok < vocab_size)
            umask = np.zeros((uniq.size, vocab_size), dtype=bool)
            umask[owner[keep], tok[keep]] = True
            mask[:] = umask[inverse]
        return torch.from_numpy(mask)

    # ---- updates ------------------------------------------------------------------------------

    def insert(self, sequences: Sequence[Sequence[int]]) -> None:
        """Add sequences; ones already live are a no-op (see the class docstring for cost)."""
        cols = _as_columns(sequences, self.eos_token_id)
        if cols[0].size == 0:
            return
        nodes, ok = self._walk(cols, live_only=False, path=True)
        if not ok.all():
            live = self._live_columns()
            width = max(len(live), len(cols))
            merged = [
                np.concatenate([a, b])
                for a, b in zip(_widen(live, width), _widen(cols, width), strict=True)
            ]
            del live, cols
            self._build(merged)
            return
        leaf = nodes.max(axis=1)
        _, first = np.unique(leaf, return_index=True)
        dead = first[self.count[leaf[first]] == 0]
        path_nodes = nodes[dead].ravel()
        np.add.at(self.count, path_nodes[path_nodes >= 0], 1)

    def remove(self, sequences: Sequence[Sequence[int]]) -> None:
        """Retire live sequences; none of them is allowed afterwards. All or nothing.

        Raises KeyError, changing nothing, if any sequence is absent (or listed twice).
        """
        try:
            cols = _as_columns(sequences, self.eos_token_id)
        except ValueError as e:
            raise KeyError(str(e)) from e
        if cols[0].size == 0:
            return
        nodes, ok = self._walk(cols, live_only=True, path=True)
        if not ok.all():
            i = int(np.flatnonzero(~ok)[0])
            row = [int(c[i]) for c in cols]
            raise KeyError(f"not in the trie: {tuple(row[: row.index(self.eos_token_id)])}")
        leaf = nodes.max(axis=1)
        if np.unique(leaf).size != leaf.size:
            raise KeyError("a sequence is listed twice for removal")
        path_nodes = nodes.ravel()
        np.subtract.at(self.count, path_nodes[path_nodes >= 0], 1)
        self._pruned = True

    def compact(self) -> None:
        """Rebuild from the live sequences only, dropping the nodes ``remove`` left dead."""
        self._build(self._live_columns())

    # ---- enumeration and persistence ----------------------------------------------------------

    def _live_matrix(self) -> np.ndarray:
        """The live sequences as a ``(n, width)`` matrix (tokens, EOS, ``_PAD``), unsorted."""
        eos = self.edge_token == self.eos_token_id
        node = np.flatnonzero(eos & (self.count[1:] > 0)) + 1
        parts = []
        while node.size and (node > 0).any():
            parts.append(np.where(node > 0, self.edge_token[np.maximum(node, 1) - 1], _PAD))
            parent = np.searchsorted(self.first_child, node - 1, side="right") - 1
            node = np.where(node > 0, parent, 0)
        if not parts:
            return np.zeros((0, 1), dtype=np.int32)
        rev = np.stack(parts[::-1], axis=1)  # right-aligned: pads first, then tokens, then EOS
        lengths = (rev != _PAD).sum(axis=1)
        width = rev.shape[1]
        shift = (np.arange(width)[None, :] + (width - lengths)[:, None]) % width
        return np.take_along_axis(rev, shift, axis=1).astype(np.int32)

    def _live_columns(self) -> Columns:
        mat = self._live_matrix()
        return [np.ascontiguousarray(mat[:, j]) for j in range(mat.shape[1])]

    def sequences(self) -> list[tuple[int, ...]]:
        """All live sequences, sorted (for tests and debugging: slow for millions)."""
        mat = self._live_matrix()
        key = np.where(mat == self.eos_token_id, _PAD, mat)  # a prefix sorts before its extensions
        mat = mat[np.lexsort(key.T[::-1])]
        lengths = np.argmax(mat == self.eos_token_id, axis=1).tolist()
        return [tuple(row[:n]) for row, n in zip(mat.tolist(), lengths, strict=True)]

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically: readers see the old file or the new one."""
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(
                tmp,
                format_version=np.int64(_FORMAT_VERSION),
                eos_token_id=np.int64(self.eos_token_id),
                first_child=self.first_child,
                edge_token=self.edge_token,
                count=self.count,
            )

    @classmethod
    def load(cls, path: str | os.PathLike) -> Trie:
        """Read what ``save`` wrote, checking the arrays fit together."""
        with np.load(path, allow_pickle=False) as z:
            version = int(z["format_version"])
            if version != _FORMAT_VERSION:
                raise ValueError(f"{path}: trie format {version}, expected {_FORMAT_VERSION}")
            first_child = z["first_child"].astype(np.int32, copy=False)
            edge_token = z["edge_token"].astype(np.int32, copy=False)
            count = z["count"].astype(np.int32, copy=False)
            eos = int(z["eos_token_id"])
        n = count.size
        if (
            n < 1
            or first_child.shape != (n + 1,)
            or edge_token.shape != (n - 1,)
            or first_child[0] != 0
            or first_child[-1] != n - 1
            or (np.diff(first_child) < 0).any()
        ):
            raise ValueError(f"{path}: not a consistent trie")
        trie = cls.__new__(cls)
        trie.eos_token_id = eos
        trie._set_arrays(first_child, edge_token, count)
        return trie

    def __repr__(self) -> str:
        return f"Trie({len(self)} sequences, {self.num_nodes} nodes, {self.nbytes} bytes)"


class TrieLogitsProcessor(LogitsProcessor):
    """Constrain ``generate`` to the trie's identifiers: disallowed tokens get -inf.

    Tokens after ``prompt_length`` are the prefix generated so far. A row whose prefix is complete
    or invalid (a finished beam padded past its EOS) may only emit EOS, so beam search never faces
    a row with nothing to pick. If all allowed tokens of a row score -inf, they are raised to
    ``finfo.min / 2`` so the search still picks a valid token rather than an arbitrary one.

    ``renormalize``: the allowed scores are shifted to sum to one (a softmax over the node's
    children: what ``trie_beam_search`` ranks with, computed densely as its reference).
    """

    def __init__(self, trie: Trie, prompt_length: int, renormalize: bool = False) -> None:
        self.trie = trie
        self.prompt_length = int(prompt_length)
        self.renormalize = bool(renormalize)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        mask = self.trie.next_token_mask(input_ids[:, self.prompt_length :], scores.shape[-1])
        out = constrain_scores(scores, mask, self.trie.eos_token_id)
        if self.renormalize:
            out = out - torch.logsumexp(out, dim=-1, keepdim=True)
        return out


def constrain_scores(scores: torch.Tensor, mask: torch.Tensor, eos: int) -> torch.Tensor:
    """``scores`` with tokens outside ``mask`` at -inf (the rules of ``TrieLogitsProcessor``).

    A row that allows nothing may emit EOS only; a row whose allowed tokens all score -inf gets
    them at ``finfo.min / 2``. ``mask`` is modified in place.
    """
    held = mask.numpy()  # shares memory with ``mask``
    stuck = ~held.any(axis=1)
    if stuck.any() and eos < held.shape[1]:
        held[stuck, eos] = True
    if scores.device.type == "cpu" and scores.dtype in (torch.float32, torch.float64):
        # numpy on one thread: torch splits an op this small over its threads, which costs
        # milliseconds a step whenever another process holds a core.
        values = scores.detach().numpy()
        out = np.full_like(values, -np.inf)
        np.copyto(out, values, where=held)
        hopeless = np.flatnonzero(out.max(axis=1) == -np.inf)
        if hopeless.size:
            out[hopeless] = np.where(held[hopeless], np.finfo(out.dtype).min / 2, -np.inf)
        return torch.from_numpy(out)
    mask = mask.to(scores.device)
    out = torch.where(mask, scores, float("-inf"))
    hopeless = out.amax(dim=-1) == float("-inf")
    if hopeless.any():
        floor = torch.finfo(out.dtype).min / 2
        out[hopeless] = torch.where(mask[hopeless], floor, float("-inf")).to(out.dtype)
    return out
