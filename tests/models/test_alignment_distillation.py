"""Soft identifier targets from the alignment's ranking (grace.alignment_distillation)."""

from __future__ import annotations

import pytest
import torch

from grace.constants import IGNORE_INDEX
from grace.models.lite.losses import PAD, distillation_loss, gold_sequences, soft_id_targets
from grace.training.distillation import IdGallery

E = 9  # EOS of these hand-made identifiers
SEQUENCES = torch.tensor([[5, 6, E], [5, 7, E], [8, E, PAD]])  # three images


def test_targets_are_the_teacher_mass_under_the_gold_prefix():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    gold = torch.tensor([[5, 6, E], [8, E, PAD]])  # query 0 is about image 0, query 1 image 2
    got = soft_id_targets(probs, SEQUENCES, gold, vocab=10)
    want = torch.zeros(5, 10)
    want[0, 5], want[0, 8] = 0.8, 0.2  # query 0, first token: every image
    want[1, 6], want[1, 7] = 0.625, 0.375  # after "5": images 0 and 1, renormalised
    want[2, E] = 1.0  # after "5 6": image 0 alone
    want[3, 5], want[3, 8] = 0.2, 0.8  # query 1, first token
    want[4, E] = 1.0  # after "8": image 2 alone
    torch.testing.assert_close(got, want)


def test_gold_sequences_read_the_labelled_tokens_and_refuse_longer_answers():
    labels = torch.full((2, 6), IGNORE_INDEX)
    labels[0, 3:] = torch.tensor([5, 6, E])
    labels[1, 4:] = torch.tensor([8, E])
    assert gold_sequences(labels, 3).tolist() == [[5, 6, E], [8, E, PAD]]
    caption = torch.full((1, 8), IGNORE_INDEX)
    caption[0, 1:] = torch.arange(7)
    with pytest.raises(ValueError, match="label row 0 has 7 tokens"):
        gold_sequences(caption, 3)


def test_loss_is_smallest_when_the_logits_match_the_targets():
    probs = torch.tensor([[0.5, 0.3, 0.2]])
    labels = torch.full((1, 4), IGNORE_INDEX)
    labels[0, 1:] = torch.tensor([5, 6, E])
    targets = soft_id_targets(probs, SEQUENCES, gold_sequences(labels, 3), vocab=10)
    matched = targets.clamp(min=1e-9).log()
    hard = torch.full((3, 10), -20.0)
    hard[torch.arange(3), torch.tensor([5, 6, E])] = 0.0  # the gold tokens only
    assert distillation_loss(matched, labels, probs, SEQUENCES) < distillation_loss(
        hard, labels, probs, SEQUENCES
    )


def test_a_bounded_gallery_keeps_the_batch_images_and_samples_the_rest():
    n = 50
    features = torch.arange(n, dtype=torch.float32)[:, None]  # a row's feature is its index
    sequences = torch.stack([torch.arange(n), torch.full((n,), E)], 1)
    gallery = IdGallery({"image_features": features}, sequences)
    whole = gallery.inputs([3], size=n)
    assert whole["id_gallery_features"].shape[0] == n

    def rows(seed: int) -> list[int]:
        got = gallery.inputs([3, 41], size=8, generator=torch.Generator().manual_seed(seed))
        picked = got["id_gallery_features"][:, 0].long()
        assert got["id_gallery_sequences"][:, 0].tolist() == picked.tolist()  # rows stay paired
        return picked.tolist()

    assert len(rows(0)) == 8 and {3, 41} <= set(rows(0))
    assert rows(0) == rows(0) and rows(0) != rows(1)  # seeded: a resumed run draws the same
    assert len(gallery.inputs(list(range(10)), size=4)["id_gallery_sequences"]) == 10
