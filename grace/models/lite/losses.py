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
    image_probs: torch.Tensor, sequences: torch.Tensor, gold: torch.Tensor, vocab: int
) -> torch.Tensor:
    """Per labelled token, the distribution over the vocabulary that ``image_probs`` implies.

    ``image_probs`` ``(batch, images)``: the teacher's probability of each gallery image for a
    query; ``sequences`` ``(images, L)`` their identifiers; ``gold`` ``(batch, L)`` each query's
    own identifier. At position ``j`` the target of token ``t`` is the mass of the images whose
    identifier starts with the gold's first ``j`` tokens and has ``t`` next, renormalised.
    Returns ``(labelled tokens, vocab)`` rows in the order of ``gold != PAD`` (row-major), the
    order of the lite model's answer logits.
    """
    batch, width = gold.shape
    out = torch.zeros(batch, width, vocab, dtype=image_probs.dtype, device=image_probs.device)
    same_prefix = torch.ones(batch, sequences.shape[0], dtype=torch.bool, device=gold.device)
    for j in range(width):
        if j:
            same_prefix &= sequences[None, :, j - 1] == gold[:, j - 1, None]
        weight = image_probs * same_prefix
        out[:, j].index_add_(1, sequences[:, j].clamp(min=0), weight * (sequences[:, j] != PAD))
    out = out[gold != PAD]
    return out / out.sum(-1, keepdim=True).clamp(min=1e-12)


def distillation_loss(
    answer_logits: torch.Tensor,
    labels: torch.Tensor,
    image_probs: torch.Tensor,
    sequences: torch.Tensor,
) -> torch.Tensor:
    """Cross-entropy of the answer logits against the soft targets of :func:`soft_id_targets`.

    Args:
        answer_logits: ``(labelled tokens, vocab)`` logits of the labelled positions.
        labels: ``(batch, seq)`` labels of the retrieve batch (``IGNORE_INDEX`` off the answers).
        image_probs: ``(batch, images)`` the teacher's probability of each gallery image.
        sequences: ``(images, L)`` the gallery's identifier tokens + EOS, then ``PAD``.

    Returns:
        The mean cross-entropy, a scalar.
    """
    gold = gold_sequences(labels, sequences.shape[1])
    targets = soft_id_targets(image_probs, sequences, gold, answer_logits.shape[-1])
    return -(targets * answer_logits.float().log_softmax(-1)).sum(-1).mean()
