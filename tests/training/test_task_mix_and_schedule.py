"""The knobs a fixed wall-clock budget needs: the task mix per epoch and a schedule that anneals
by time as well as by steps."""

from __future__ import annotations

from collections import Counter

import pytest

from grace.data.synth import synthesize
from grace.identifiers import assign_identifiers
from grace.models.backbone import add_identifier_vocabulary, tokenizer_of
from grace.models.settings import TinyBackboneConfig
from grace.models.tiny import build_tiny_backbone
from grace.retrieval.index import IdentifierIndex
from grace.training.config import TrainConfig
from grace.training.examples import ImageInputs, build_examples
from grace.training.schedule import get_lr

TINY = TinyBackboneConfig(
    image_size=32, vision_hidden=32, vision_layers=1, text_hidden=32, text_layers=1, heads=2
)


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    root = tmp_path_factory.mktemp("mix") / "d"
    records = synthesize(root, n=12, seed=3)
    id_map = assign_identifiers(records, "atomic")
    texts = [c for r in records for c in r.captions]
    model, processor = build_tiny_backbone(texts, TINY)
    add_identifier_vocabulary(model, processor, id_map.new_tokens())
    index = IdentifierIndex.build(id_map, tokenizer_of(processor))
    images = ImageInputs(processor, records, root)
    return records, index, processor, images


def _counts(setting, **mix) -> Counter:
    records, index, processor, images = setting
    examples = build_examples(records, index, processor, images, TrainConfig().prompts, **mix)
    return Counter(ex.task for ex in examples)


def test_memorize_repeats_multiplies_only_memorize_examples(setting):
    one, three = _counts(setting), _counts(setting, memorize_repeats=3)
    assert one["memorize"] == len(setting[0])
    assert three["memorize"] == 3 * one["memorize"]
    assert {t: three[t] for t in ("retrieve", "describe", "caption")} == {
        t: one[t] for t in ("retrieve", "describe", "caption")
    }


def test_side_task_captions_caps_describe_and_caption_but_not_retrieve(setting):
    records = setting[0]
    train_images = sum(r.split == "train" and bool(r.captions) for r in records)
    train_captions = sum(len(r.captions) for r in records if r.split == "train")
    assert train_captions > train_images  # the set has several captions per image
    full, capped = _counts(setting), _counts(setting, side_task_captions=1)
    assert full["describe"] == full["caption"] == train_captions
    assert capped["describe"] == capped["caption"] == train_images
    assert capped["retrieve"] == full["retrieve"] == train_captions


def test_task_mix_settings_are_validated():
    with pytest.raises(ValueError, match="memorize_repeats"):
        TrainConfig(memorize_repeats=0)
    with pytest.raises(ValueError, match="side_task_captions"):
        TrainConfig(side_task_captions=0)


def test_dotted_settings_set_one_backbone_field_and_unknown_ones_are_named():
    cfg = TrainConfig.from_dict({"lite.image_grid": 2.0, "lite": {"hidden": 128}, "lr": 1e-3})
    assert (cfg.lite.image_grid, cfg.lite.hidden, cfg.lr) == (2, 128, 1e-3)
    assert isinstance(cfg.lite.image_grid, int)  # a KFP dict parameter's whole float
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match=r"unknown lite settings \['nope'\]"):
        TrainConfig.from_dict({"lite.nope": 1})


def test_schedule_anneals_by_time_when_the_budget_is_wall_clock():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_seconds=100.0)
    total = 10_000  # far more steps than the budget will allow
    assert get_lr(5, total, cfg, seconds=1.0) == pytest.approx(1e-3 * 6 / 10)  # warm-up
    assert get_lr(20, total, cfg, seconds=50.0) == pytest.approx(0.5e-3, rel=1e-6)  # half the time
    assert get_lr(30, total, cfg, seconds=100.0) == pytest.approx(0.0, abs=1e-12)  # budget spent
    assert get_lr(30, total, cfg, seconds=50.0) < get_lr(30, total, cfg, seconds=10.0)


def test_schedule_without_budget_follows_steps_only():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10)
    total = 110
    assert get_lr(60, total, cfg, seconds=1e9) == pytest.approx(0.5e-3, rel=1e-6)
    assert get_lr(110, total, cfg) == pytest.approx(0.0, abs=1e-12)
    # steps running out first still decide, even with time left
    budget = TrainConfig(lr=1e-3, warmup_steps=10, max_seconds=1e6)
    assert get_lr(60, total, budget, seconds=1.0) == pytest.approx(0.5e-3, rel=1e-6)
