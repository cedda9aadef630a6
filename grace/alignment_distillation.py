"""Soft identifier targets from the query-image alignment: learning to retrieve by distillation.

Why: the lite backbone's alignment space (a projected query against every projected image)
ranks held-out queries about as well as the dense baseline, yet the decoder's own map from a
query to an arbitrary identifier (numeric ids: three random digits) generalizes poorly beyond
the queries it was trained on, because a hard label per query is a lookup table, not a smooth
function. Here a retrieve example also learns, at each identifier token, the alignment's
probability mass over the gallery's images grouped by that token (given the gold prefix, as
teacher forcing feeds it): a smooth target, so queries between the trained ones land on the
identifiers of the images the alignment puts near them. On the demo set it raised numeric ids'
held-out R@10 and kept their memorization from collapsing (BENCHMARKS.md, runs 40-44).

The teacher is the model's own alignment, detached: no second model, nothing at inference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grace.identifier_index import IdentifierIndex
from grace.task_examples import IGNORE_INDEX, ImageInputs

PAD = -1  # past an identifier's EOS in ``IdGallery.sequences``


@dataclass
class IdGallery:
    """Every image of a run with its canonical identifier: what the teacher ranks."""

    features: dict[str, torch.Tensor]
    """The images' processor tensors (``image_features``), one row per image."""
    sequences: torch.Tensor
    """``(images, max_len)`` canonical identifier tokens + EOS, then ``PAD``."""

    @classmethod
    def build(cls, images: ImageInputs, index: IdentifierIndex) -> IdGallery:
        canonical: dict[str, tuple[int, ...]] = {}
        for key, seq in zip(index.keys, index.sequences, strict=True):
            canonical.setdefault(key, seq)  # an image's first id, as retrieve examples answer
        rows = [canonical[r.key] + (index.eos_token_id,) for r in images.records]
        seqs = torch.full((len(rows), max(map(len, rows))), PAD, dtype=torch.long)
        for n, row in enumerate(rows):
            seqs[n, : len(row)] = torch.tensor(row)
        return cls(images.batch(list(range(len(rows)))), seqs)

    def to(self, device: torch.device | str) -> IdGallery:
        return IdGallery(
            {k: v.to(device) for k, v in self.features.items()}, self.sequences.to(device)
        )

    def inputs(
        self,
        gold: list[int] | None = None,
        size: int | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The forward keyword arguments that switch the distillation loss on for a batch.

        With ``size`` below the gallery's, the teacher ranks the batch's own images (``gold``,
        rows of this gallery) and a random sample of the others, ``size`` in all: the step's
        cost stays bounded however many images the run has. A sample is still a fair target:
        the gold prefix always has mass, and the rest is an unbiased estimate of the
        alignment's spread over the whole gallery.
        """
        n = self.sequences.shape[0]
        if size is None or size >= n:
            rows = None
        else:
            keep = torch.zeros(n, dtype=torch.bool)
            keep[list(gold or [])] = True
            others = (~keep).nonzero().squeeze(1)
            need = max(size - int(keep.sum()), 0)
            keep[others[torch.randperm(len(others), generator=generator)[:need]]] = True
            rows = keep.nonzero().squeeze(1).to(self.sequences.device)
        features, sequences = self.features["image_features"], self.sequences
        return {
            "id_gallery_features": features if rows is None else features[rows],
            "id_gallery_sequences": sequences if rows is None else sequences[rows],
        }


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
    """Cross-entropy of the answer logits (``(labelled tokens, vocab)``) against the soft
    targets of :func:`soft_id_targets`."""
    gold = gold_sequences(labels, sequences.shape[1])
    targets = soft_id_targets(image_probs, sequences, gold, answer_logits.shape[-1])
    return -(targets * answer_logits.float().log_softmax(-1)).sum(-1).mean()
