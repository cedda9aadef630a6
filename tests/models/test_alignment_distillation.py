"""Soft identifier targets from the alignment's ranking (grace.alignment_distillation)."""

from __future__ import annotations

import pytest
import torch

from grace.constants import IGNORE_INDEX
from grace.models.lite.losses import PAD, distillation_loss, gold_sequences, soft_id_targets
from grace.training.distillation import IdGallery

E = 9  # EOS of these hand-made identifiers
SEQUENCES = torch.tensor([[5, 6, E], [5, 7, E], [8, E, PAD]])  # three images


# what each labelled token of the two gold ids is chosen among (its trie node's children)
CHOICES = torch.tensor([[5, 8], [6, 7], [E, -1], [5, 8], [E, -1]])


def test_targets_are_the_teacher_mass_under_the_gold_prefix():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    gold = torch.tensor([[5, 6, E], [8, E, PAD]])  # query 0 is about image 0, query 1 image 2
    got = soft_id_targets(probs, SEQUENCES, gold, CHOICES)
    want = torch.tensor(
        [
            [0.8, 0.2],  # query 0, first token: every image
            [0.625, 0.375],  # after "5": images 0 and 1, renormalised
            [1.0, 0.0],  # after "5 6": image 0 alone
            [0.2, 0.8],  # query 1, first token
            [1.0, 0.0],  # after "8": image 2 alone
        ]
    )
    torch.testing.assert_close(got, want)


def test_choices_are_the_trie_children_along_the_gold_path():
    from grace.retrieval.trie import Trie
    from grace.training.choices import label_choices

    trie = Trie([[5, 6], [5, 7], [8]], eos_token_id=E)
    labels = torch.full((2, 5), IGNORE_INDEX)
    labels[0, 2:] = torch.tensor([5, 6, E])
    labels[1, 3:] = torch.tensor([8, E])
    assert label_choices(labels, trie).tolist() == CHOICES.tolist()
    labels[1, 3] = 6  # no identifier starts with 6
    with pytest.raises(ValueError, match="label row 1: token 6 at answer position 0"):
        label_choices(labels, trie)


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
    choices = CHOICES[:3]
    targets = soft_id_targets(probs, SEQUENCES, gold_sequences(labels, 3), choices)
    matched = targets.clamp(min=1e-9).log().masked_fill(choices < 0, float("-inf"))
    hard = torch.full((3, 2), -20.0).masked_fill(choices < 0, float("-inf"))
    hard[:, 0] = 0.0  # the gold tokens only
    assert distillation_loss(matched, labels, probs, SEQUENCES, choices) < distillation_loss(
        hard, labels, probs, SEQUENCES, choices
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
