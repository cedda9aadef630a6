"""Pseudo-queries for images without train captions: which captions ``nearest`` picks, which
source a run uses, and that a training run really learns them."""

from __future__ import annotations

import json

import pytest
import torch

from grace.data.synth import synthesize
from grace.errors import GraceError
from grace.identifiers import assign_identifiers
from grace.models.lite.modeling_lite import build_lite_backbone
from grace.models.prompts import user_turn
from grace.models.settings import LiteBackboneConfig
from grace.training import train
from grace.training.config import TrainConfig
from grace.training.examples import ImageInputs, TextInputs
from grace.training.loop import STATE_FILE
from grace.training.pseudo_queries import nearest_captions, resolve_source

SMALL_LITE = LiteBackboneConfig(hidden=64, layers=1, heads=2, vocab_size=400)


@pytest.fixture(scope="module")
def lite(tmp_path_factory):
    root = tmp_path_factory.mktemp("pseudo") / "data"
    records = synthesize(root, n=12, seed=7, test_fraction=0.25)
    texts = [c for r in records for c in r.captions] + ["Which image shows:"]
    model, processor = build_lite_backbone(texts, SMALL_LITE, seed=0)
    return root, records, model.eval(), processor


def test_nearest_picks_the_train_captions_the_alignment_ranks_first(lite):
    root, records, model, processor = lite
    prompts = TrainConfig().prompts
    needy = [r for r in records if r.split == "test"]
    images, texts = ImageInputs(processor, records, root), TextInputs(processor)
    got = nearest_captions(model, processor, records, needy, images, texts, prompts, 3, chunk=1)

    train_captions = [c for r in records if r.split == "train" for c in r.captions]
    asked = [user_turn(processor, prompts.retrieve.format(query=c), False) for c in train_captions]
    with torch.no_grad():
        q = model.align_queries(processor(text=asked, padding=True)["sentence_features"])
    assert set(got) == {r.key for r in needy}
    for r in needy:
        feats = images.batch([records.index(r)])["image_features"]
        with torch.no_grad():
            scores = (model.align_images(feats) @ q.T)[0]
        expected = [train_captions[j] for j in scores.argsort(descending=True)[:3].tolist()]
        assert got[r.key] == expected
        held_out = set(r.captions)
        assert not held_out & set(got[r.key])  # only train captions, never the image's own
    # one chunk or many: the same answer
    same = nearest_captions(model, processor, records, needy, images, texts, prompts, 3)
    assert same == got


def test_nearest_gives_at_most_as_many_captions_as_there_are(lite):
    root, records, model, processor = lite
    needy = [r for r in records if r.split == "test"][:1]
    images, texts = ImageInputs(processor, records, root), TextInputs(processor)
    n_train = len({c for r in records if r.split == "train" for c in r.captions})
    got = nearest_captions(
        model, processor, records, needy, images, texts, TrainConfig().prompts, 999
    )
    assert len(got[needy[0].key]) == n_train
    no_text = [r for r in records if r.split == "test"]  # a set whose train images have no text
    assert (
        nearest_captions(model, processor, no_text, needy, images, texts, TrainConfig().prompts, 3)
        == {}
    )


def test_source_auto_is_nearest_only_where_the_backbone_aligns(lite, small_backbone):
    _, _, model, _ = lite
    assert resolve_source("auto", model) == "nearest"
    from grace.models.tiny import build_tiny_backbone

    tiny, _ = build_tiny_backbone(["a red disc"], small_backbone, seed=0)
    assert resolve_source("auto", tiny) == "off"
    assert resolve_source("caption", tiny) == "caption"
    with pytest.raises(GraceError, match="nearest.*aligns queries with images"):
        resolve_source("nearest", tiny)
    with pytest.raises(ValueError, match="pseudo_queries must be one of"):
        TrainConfig(pseudo_queries="yes")
    with pytest.raises(ValueError, match="pseudo_query_at"):
        TrainConfig(pseudo_query_at=1.0)


def test_caption_pseudo_queries_need_the_caption_task(lite, tmp_path):
    root, records, _, _ = lite
    cfg = TrainConfig(
        lite=SMALL_LITE, epochs=2, batch_size=8, caption_task=False, pseudo_queries="caption",
        checkpoint_every=0,
    )  # fmt: skip
    with pytest.raises(GraceError, match="caption_task=true"):
        train(
            records,
            root,
            assign_identifiers(records, "atomic"),
            tmp_path / "r",
            cfg,
            progress=False,
        )


@pytest.mark.slow
def test_a_run_learns_its_nearest_pseudo_queries(lite, tmp_path, one_thread):
    """Held-out images get train captions as queries at pseudo_query_at; they are checkpointed,
    and the trained model ranks the held-out image it was given to among the first three for
    it (beside the caption's own train image, which keeps its query too)."""
    root, records, _, _ = lite
    id_map = assign_identifiers(records, "atomic")
    cfg = TrainConfig(
        lite=SMALL_LITE, epochs=60, batch_size=16, lr=3e-3, warmup_steps=5,
        describe_task=False, caption_task=False, pseudo_query_at=0.5,
        pseudo_queries_per_image=1, checkpoint_every=100, seed=1,
    )  # fmt: skip
    gm = train(records, root, id_map, tmp_path / "run", cfg, progress=False)
    ckpts = sorted((tmp_path / "run" / "checkpoints").glob("step-*"))
    pseudo = json.loads((ckpts[-1] / STATE_FILE).read_text())["pseudo_queries"]
    held_out = [r for r in records if r.split == "test"]
    assert set(pseudo) == {r.key for r in held_out}
    queries = [pseudo[r.key][0] for r in held_out]
    top = gm.retrieve(queries, k=3)
    assert all(r.key in [h.key for h in row] for r, row in zip(held_out, top, strict=True))
