"""Soft identifier targets from the query-image alignment: learning to retrieve by distillation.

At each identifier token a retrieve example also learns the alignment's probability mass over
the gallery's images grouped by that token, given the gold prefix (as teacher forcing feeds it).
The teacher is the model's own alignment, detached: no second model, nothing at inference.
Why, and what it gained: docs/training.md#alignment-distillation, docs/experiments.md.
"""

from __future__ import annotations

import torch

from grace.constants import IGNORE_INDEX

PAD = -1  # past an identifier's EOS in ``IdGallery.sequences``


def gold_sequences(labels: torch.Tensor, width: int) -> torch.Tensor:
    """``(batch, width)`` each row's labelled tokens (identifier + EOS), then ``PAD``."""
    targets = labels[:, 1:]
    out = torch.full((labels.shape[0], width), PAD, dtype=torch.long, device=labels.device)
    for row in range(labels.shape[0]):
        tokens = targets[row][targets[row] != IGNORE_INDEX]
        if tokens.numel() > width:
            raise ValueError(
                f"label row {row} has {tokens.numel()} tokens, longer than any identifier "
                f"({width}): distillation applies to retrieve answers only"
            )
        out[row, : tokens.numel()] = tokens
    return out


def soft_id_targets(
    image_probs: torch.Tensor, sequences: torch.Tensor, gold: torch.Tensor, choices: torch.Tensor
) -> torch.Tensor:
    """Per labelled token, the distribution over its choices that ``image_probs`` implies.

    ``image_probs`` ``(batch, images)``: the teacher's probability of each gallery image for a
    query; ``sequences`` ``(images, L)`` their identifiers; ``gold`` ``(batch, L)`` each query's
    own identifier; ``choices`` ``(labelled tokens, K)`` the trie children each labelled token
    is chosen among (ascending, -1 padded; rows in the order of ``gold != PAD``, row-major).
    At position ``j`` the target of choice ``t`` is the mass of the images whose identifier
    starts with the gold's first ``j`` tokens and has ``t`` next, renormalised: a distribution
    over the same children the answer's softmax is over, so nothing here grows with the
    vocabulary. Returns ``(labelled tokens, K)``.
    """
    batch, width = gold.shape
    row_of = torch.full((batch, width), -1, dtype=torch.long, device=gold.device)
    labelled = gold != PAD
    row_of[labelled] = torch.arange(int(labelled.sum()), device=gold.device)
    # sorted, with the padding last, so that ``searchsorted`` finds each image's next token
    big = torch.iinfo(torch.long).max
    ordered = torch.where(choices < 0, big, choices)
    out = torch.zeros(choices.shape, dtype=image_probs.dtype, device=image_probs.device)
    same_prefix = torch.ones(batch, sequences.shape[0], dtype=torch.bool, device=gold.device)
    for j in range(width):
        if j:
            same_prefix &= sequences[None, :, j - 1] == gold[:, j - 1, None]
        queries = torch.nonzero(labelled[:, j]).flatten()
        if not queries.numel():
            continue
        rows = row_of[queries, j]
        nxt = sequences[:, j].expand(queries.numel(), -1).contiguous()
        slot = torch.searchsorted(ordered[rows], nxt).clamp(max=choices.shape[1] - 1)
        hit = ordered[rows].gather(1, slot) == nxt
        weight = image_probs[queries] * (same_prefix[queries] & hit & (nxt != PAD))
        out[rows] = out[rows].scatter_add(1, slot, weight)
    return out / out.sum(-1, keepdim=True).clamp(min=1e-12)


def distillation_loss(
    answer_logits: torch.Tensor,
    labels: torch.Tensor,
    image_probs: torch.Tensor,
    sequences: torch.Tensor,
    choices: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of the answer logits against the soft targets of :func:`soft_id_targets`.

    Args:
        answer_logits: ``(labelled tokens, K)`` logits of the labelled tokens' choices.
        labels: ``(batch, seq)`` labels of the retrieve batch (``IGNORE_INDEX`` off the answers).
        image_probs: ``(batch, images)`` the teacher's probability of each gallery image.
        sequences: ``(images, L)`` the gallery's identifier tokens + EOS, then ``PAD``.
        choices: ``(labelled tokens, K)`` what each labelled token is chosen among.

    Returns:
        The mean cross-entropy, a scalar.
    """
    gold = gold_sequences(labels, sequences.shape[1])
    targets = soft_id_targets(image_probs, sequences, gold, choices)
    log_probs = answer_logits.float().log_softmax(-1).masked_fill(choices < 0, 0.0)
    return -(targets * log_probs).sum(-1).mean()
