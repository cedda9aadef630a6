"""The dual encoder (embedder for structured ids, dense baseline) and the embedder plumbing."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.identifiers.base import ImageEmbedder
from grace.models.dual_encoder.configuration import DualEncoderConfig
from grace.models.dual_encoder.modeling import DualEncoder, build_vocab, split_words
from grace.models.dual_encoder.training import _lr, clip_loss, train_dual_encoder
from grace.models.embedders import (
    ClipEmbedder,
    DualEncoderEmbedder,
    _features,
    dense_rank,
    make_embedder,
)

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 190, 30),
    "blue": (30, 40, 220),
    "yellow": (235, 225, 30),
    "white": (250, 250, 250),
    "black": (5, 5, 5),
    "purple": (140, 30, 170),
    "orange": (250, 140, 0),
    "cyan": (0, 215, 215),
    "pink": (250, 150, 190),
    "brown": (120, 70, 20),
    "olive": (110, 120, 20),
}

TINY = DualEncoderConfig(
    image_size=16,
    widths=(16, 32),
    embed_dim=32,
    word_dim=32,
    text_width=32,
    steps=120,
    max_seconds=None,
    batch_size=12,
    lr=3e-3,
    warmup_steps=5,
)


def _draw_set(root: Path) -> list[ImageRecord]:
    """12 grey images with one coloured square each, captioned by its colour."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i, (name, rgb) in enumerate(COLOURS.items()):
        im = Image.new("RGB", (16, 16), (128, 128, 128))
        im.paste(rgb, (4, 4, 12, 12))
        path = f"images/{i:03d}.png"
        im.save(root / path)
        caps = (f"a {name} square", f"the square is {name}")
        records.append(ImageRecord(f"k{i}", path, 16, 16, caps, "train"))
    return records


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("squares")
    records = _draw_set(root)
    losses: list[float] = []
    model = train_dual_encoder(
        records, root, TINY, progress=False, callback=lambda s, m: losses.append(m["loss"])
    )
    return root, records, model, losses


def _paths(root: Path, records: list[ImageRecord]) -> list[Path]:
    return [root / r.path for r in records]


def test_training_reduces_loss_and_retrieves_its_captions(tiny):
    root, records, model, losses = tiny
    assert len(losses) == TINY.steps
    assert np.mean(losses[-10:]) < 0.3 * np.mean(losses[:5])
    emb = DualEncoderEmbedder(model)
    images = emb.embed_images(_paths(root, records))
    for j in range(2):  # both caption templates, every image
        texts = emb.embed_texts([r.captions[j] for r in records])
        top1 = dense_rank(texts, images, 1)[:, 0]
        assert (top1 == np.arange(len(records))).mean() >= 0.9


def test_embeddings_are_unit_float32_rows(tiny):
    root, records, model, _ = tiny
    emb = DualEncoderEmbedder(model)
    assert isinstance(emb, ImageEmbedder)
    images = emb.embed_images(_paths(root, records))
    texts = emb.embed_texts(["a red square", "unseen words only", ""])
    assert images.dtype == np.float32 and images.shape == (12, TINY.embed_dim)
    assert texts.dtype == np.float32 and texts.shape == (3, TINY.embed_dim)
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert emb.embed_images([]).shape == (0, TINY.embed_dim)
    assert emb.embed_texts([]).shape == (0, TINY.embed_dim)
    # batching does not change the result (eval-mode batch norm)
    small = DualEncoderEmbedder(model, batch_size=5).embed_images(_paths(root, records))
    np.testing.assert_allclose(small, images, atol=1e-5)


def test_save_load_round_trip(tiny, tmp_path):
    root, records, model, _ = tiny
    out = tmp_path / "enc"
    model.save(out)
    model.save(out)  # overwriting an existing save is fine (atomic swap)
    meta = json.loads((out / "dual_encoder.json").read_text())
    assert meta["vocab"][:2] == ["<pad>", "<unk>"] and "red" in meta["vocab"]
    loaded = DualEncoder.load(out)
    assert loaded.config == model.config and loaded.vocab == model.vocab
    paths = _paths(root, records)
    assert np.array_equal(loaded.embed_images(paths), model.embed_images(paths))
    texts = ["a red square", "the square is blue"]
    assert np.array_equal(loaded.embed_texts(texts), model.embed_texts(texts))
    via_spec = make_embedder(f"dual-encoder:{out}", records, root)
    assert np.array_equal(via_spec.embed_images(paths), model.embed_images(paths))
    with pytest.raises(FileNotFoundError):
        DualEncoder.load(tmp_path / "missing")


def _state(model: DualEncoder) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_training_is_deterministic_for_a_seed(tiny):
    root, records, _, _ = tiny
    cfg = replace(TINY, steps=15)
    a = _state(train_dual_encoder(records, root, cfg, progress=False))
    torch.manual_seed(123)  # the caller's global RNG state must not matter
    b = _state(train_dual_encoder(records, root, cfg, progress=False))
    c = _state(train_dual_encoder(records, root, replace(cfg, seed=1), progress=False))
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_text_tower_is_order_aware():
    vocab = build_vocab(["red circle and blue square"])
    for kind in ("gru", "transformer"):
        torch.manual_seed(0)
        model = DualEncoder(replace(TINY, text_encoder=kind), vocab)
        e = model.embed_texts(["red circle and blue square", "blue circle and red square"])
        assert not np.allclose(e[0], e[1], atol=1e-4), kind


def test_only_train_split_captions_are_learned(tiny):
    root, records, _, _ = tiny
    held_out = [replace(r, split="test", captions=(f"zebra {r.captions[0]}",)) for r in records[:3]]
    uncaptioned = [replace(r, key=r.key + "x", captions=()) for r in records[3:5]]
    mixed = [*held_out, *uncaptioned, *records[5:]]
    model = train_dual_encoder(mixed, root, replace(TINY, steps=2), progress=False)
    assert "zebra" not in model.vocab and "red" not in model.vocab  # red is only on records[0]
    assert split_words("Zebra-crossing, 2 RED!") == ["zebra", "crossing", "2", "red"]
    with pytest.raises(GraceError, match="at least 2"):
        train_dual_encoder(held_out, root, TINY, progress=False)


def test_time_budget_stops_training(tiny):
    root, records, _, _ = tiny
    steps: list[int] = []
    lrs: list[float] = []

    def cb(step: int, m: dict[str, float]) -> None:
        steps.append(step)
        lrs.append(m["lr"])

    cfg = replace(TINY, steps=10**6, max_seconds=1.0, warmup_steps=1)
    train_dual_encoder(records, root, cfg, progress=False, callback=cb)
    assert 1 <= len(steps) < 10**6 and steps == list(range(1, len(steps) + 1))
    assert max(lrs) <= TINY.lr


def test_cosine_decay_follows_the_clock_when_seconds_run_out_first():
    # The schedule is a pure function of (step, elapsed), tested apart from the wall clock so a
    # loaded CI machine cannot make it pass or fail.
    cfg = replace(TINY, steps=10**6, max_seconds=10.0, warmup_steps=1)
    early, late = _lr(5, 0.5, cfg), _lr(5, 9.5, cfg)
    assert early > 0.9 * cfg.lr and late < 0.01 * cfg.lr
    assert _lr(5, 9.5, replace(cfg, max_seconds=None)) > 0.9 * cfg.lr  # steps alone: still early


def test_transformer_text_encoder_trains(tiny):
    root, records, _, _ = tiny
    losses: list[float] = []
    cfg = replace(TINY, text_encoder="transformer", text_heads=2, steps=60)
    model = train_dual_encoder(
        records, root, cfg, progress=False, callback=lambda s, m: losses.append(m["loss"])
    )
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
    assert model.embed_texts(["a red square"]).shape == (1, TINY.embed_dim)


def test_make_embedder_trains_within_budget_and_rejects_bad_specs(tiny):
    root, records, _, _ = tiny
    emb = make_embedder(
        "dual-encoder",
        records,
        root,
        max_seconds=0.5,
        config=replace(TINY, steps=10**6),
        progress=False,
    )
    assert emb.embed_images(_paths(root, records)[:2]).shape == (2, TINY.embed_dim)
    for bad in ("kmeans", "clip", "clip:", "dual-encoders:x"):
        with pytest.raises(GraceError, match="unknown embedder"):
            make_embedder(bad, records, root)


def test_config_round_trip_and_validation():
    cfg = DualEncoderConfig(widths=[8, 16], image_size=16)
    assert cfg.widths == (8, 16)
    d = json.loads(json.dumps(cfg.to_dict()))
    assert DualEncoderConfig.from_dict({**d, "from_the_future": 1}) == cfg
    with pytest.raises(ValueError, match="divisible"):
        DualEncoderConfig(image_size=20, widths=(8, 16, 32))
    with pytest.raises(ValueError, match="text_encoder"):
        DualEncoderConfig(text_encoder="bag-of-words")


def test_clip_loss_counts_identical_captions_as_positives():
    # images 0 and 1 share a caption and each scores the other's copy highest: not an error
    logits = torch.tensor([[-5.0, 5.0, -5.0], [5.0, -5.0, -5.0], [-5.0, -5.0, 5.0]])
    dup = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    eye = torch.eye(3, dtype=torch.bool)
    assert clip_loss(logits, dup) < 0.6 * clip_loss(logits, eye)
    # with distinct captions it is the plain symmetric CLIP loss
    target = torch.arange(3)
    plain = 0.5 * (
        torch.nn.functional.cross_entropy(logits, target)
        + torch.nn.functional.cross_entropy(logits.T, target)
    )
    assert torch.allclose(clip_loss(logits, eye), plain)


def test_dense_rank():
    text = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    images = np.array([[0.0, 1.0], [1.0, 0.0], [0.6, 0.8]], np.float32)
    assert dense_rank(text, images, 2).tolist() == [[1, 2], [0, 2]]
    assert dense_rank(text, images, 10).shape == (2, 3)


# ---------------------------------------------------------------------------------------------
# a real CLIP from a local folder (tiny, random, saved by the test: nothing from the hub)
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("clip")
    words = ["<pad>", "<unk>", "a", "red", "blue", "square", "the", "is"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>"
    ).save_pretrained(out)
    small = {"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1}
    config = CLIPConfig(
        text_config={
            **small,
            "num_attention_heads": 2,
            "vocab_size": len(words),
            "max_position_embeddings": 16,
            "pad_token_id": 0,
            "bos_token_id": 1,
            "eos_token_id": 1,
        },
        vision_config={**small, "num_attention_heads": 2, "image_size": 32, "patch_size": 8},
        projection_dim=8,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    ).save_pretrained(out)
    return out


def test_clip_embedder_offline(tiny_clip, tiny):
    root, records, _, _ = tiny
    emb = ClipEmbedder(tiny_clip, batch_size=5)
    assert isinstance(emb, ImageEmbedder)
    paths = _paths(root, records)
    images = emb.embed_images(paths)
    texts = emb.embed_texts(["a red square", "the square is blue", "zebra"])
    assert images.shape == (12, 8) and texts.shape == (3, 8) and images.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(images, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1.0, atol=1e-5)
    assert not np.allclose(images[0], images[1])  # different pictures, different embeddings
    # the same numbers as the CLIP model's own towers + projections
    with torch.no_grad():
        px = emb.image_processor(
            images=[Image.open(p).convert("RGB") for p in paths[:2]], return_tensors="pt"
        )["pixel_values"]
        pooled = emb.model.vision_model(pixel_values=px).pooler_output
        ref = torch.nn.functional.normalize(emb.model.visual_projection(pooled), dim=-1)
    np.testing.assert_allclose(images[:2], ref.numpy(), atol=1e-5)
    via_spec = make_embedder(f"clip:{tiny_clip}", records, root)
    np.testing.assert_allclose(via_spec.embed_texts(["a red square"]), texts[:1], atol=1e-6)
    with pytest.raises(FileNotFoundError):
        ClipEmbedder(tiny_clip / "missing")


def test_features_accepts_tensor_or_model_output():
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    t = torch.ones(2, 3)
    assert _features(t) is t
    assert _features(BaseModelOutputWithPooling(pooler_output=t)) is t
