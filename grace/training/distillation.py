"""The gallery that alignment distillation ranks: every image of a run with its canonical id.

The loss itself is in :mod:`grace.models.lite.losses`; design in
docs/training.md#alignment-distillation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from grace.models.lite.losses import PAD
from grace.retrieval.index import IdentifierIndex
from grace.training.examples import ImageInputs


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
