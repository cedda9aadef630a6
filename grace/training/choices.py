"""What each identifier token of a batch is chosen among: its trie node's children.

Training scores an identifier answer the way beam search ranks it, one softmax per tree node
over that node's children (:meth:`GraceLiteForConditionalGeneration._answer_loss`), so a step
costs the fan-out of the nodes on the gold paths and not the catalog's size.
"""

from __future__ import annotations

import numpy as np
import torch

from grace.constants import IGNORE_INDEX
from grace.retrieval.trie import Trie

# tasks whose answers are identifiers, scored among trie children; the others answer in text
ID_TASKS = ("memorize", "retrieve")


def label_choices(labels: torch.Tensor, trie: Trie) -> torch.Tensor:
    """``(labelled tokens, K)`` the tokens each labelled token was chosen among, -1 padded.

    Rows follow the labelled tokens in row-major order (``labels[:, 1:] != IGNORE_INDEX``), the
    order of the lite model's answer logits; within a row tokens ascend (``Trie.live_edges``).
    Each label row's tokens must be an identifier of ``trie`` and its EOS.

    Args:
        labels: ``(batch, seq)`` the batch's labels, ``IGNORE_INDEX`` off the answers.
        trie: The identifiers' trie (with their EOS).

    Returns:
        The padded choices, on ``labels``' device.

    Raises:
        ValueError: If an answer leaves the trie (a label that is no identifier).
    """
    targets = labels[:, 1:]
    keep = (targets != IGNORE_INDEX).cpu().numpy()
    tokens = targets.cpu().numpy()
    batch = tokens.shape[0]
    lengths = keep.sum(1)
    answers = np.zeros((batch, int(lengths.max(initial=0))), dtype=np.int64)
    for row in range(batch):  # an answer is contiguous, but find it wherever it starts
        answers[row, : lengths[row]] = tokens[row][keep[row]]
    per_depth: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    nodes = np.zeros(batch, dtype=np.int64)
    for j in range(answers.shape[1]):
        rows = np.flatnonzero(lengths > j)
        row, tok, _child = trie.live_edges(nodes[rows])
        gold = answers[rows, j]
        if not np.isin(np.arange(rows.size), row[tok == gold[row]]).all():
            bad = int(rows[~np.isin(np.arange(rows.size), row[tok == gold[row]])][0])
            raise ValueError(
                f"label row {bad}: token {int(answers[bad, j])} at answer position {j} is not "
                "in the identifier trie (an identifier answer must be a trie path + EOS)"
            )
        per_depth.append((rows, row, tok))
        nodes[rows] = trie.advance(nodes[rows], gold)
    width = max((np.bincount(r).max(initial=0) for _, r, _ in per_depth if r.size), default=1)
    out = np.full((batch, answers.shape[1], int(width)), -1, dtype=np.int64)
    for j, (rows, row, tok) in enumerate(per_depth):
        degree = np.bincount(row, minlength=rows.size)
        slot = np.arange(row.size) - np.repeat(np.cumsum(degree) - degree, degree)
        out[rows[row], j, slot] = tok
    valid = np.arange(answers.shape[1])[None, :] < lengths[:, None]
    return torch.from_numpy(out[valid]).to(labels.device)


def choice_positions(answers: list[list[int]], trie: Trie) -> int:
    """How many tokens of ``answers`` (identifier + EOS each) are a choice among 2+ children.

    The positions the factorized loss averages over (a single child is no choice); counted
    from the nodes' degrees along each path, without listing any node's children.
    """
    if not answers:
        return 0
    width = max(map(len, answers))
    padded = np.full((len(answers), width), -1, dtype=np.int64)
    for row, answer in enumerate(answers):
        padded[row, : len(answer)] = answer
    nodes = np.zeros(len(answers), dtype=np.int64)
    total = 0
    for j in range(width):
        rows = np.flatnonzero(padded[:, j] >= 0)
        total += int((trie.degree(nodes[rows]) > 1).sum())
        nodes[rows] = trie.advance(nodes[rows], padded[rows, j])
    return total
