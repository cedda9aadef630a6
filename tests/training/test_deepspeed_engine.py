"""make_engine: the loop's train-step API, plain and DeepSpeed ZeRO, on CPU in one process.

DeepSpeed runs here on gloo with a one-rank world; make_engine keeps it from JIT-compiling its
shared-memory comm op, so a cold TORCH_EXTENSIONS_DIR costs nothing. The ``dist_env`` fixture
(conftest.py) restores the environment and tears the process group down, so later tests see no
distributed state.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grace.training.engine import (
    DeepSpeedTrainEngine,
    PlainEngine,
    TrainEngine,
    ensure_dist_env,
    make_engine,
    resolve_ds_config,
)

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "deepspeed"
ZERO2, ZERO3 = CONFIGS / "zero2.json", CONFIGS / "zero3.json"
LR, CLIP, STEPS = 3e-2, 0.5, 4
DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")


class Tiny(torch.nn.Module):
    """Embedding, LayerNorm and two Linears: decayed and non-decayed params, like a real model."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(16, 8)
        self.norm = torch.nn.LayerNorm(8)
        self.fc1 = torch.nn.Linear(8, 16)
        self.fc2 = torch.nn.Linear(16, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(self.norm(self.emb(ids)).mean(1))))


def groups(model: torch.nn.Module) -> list[dict]:
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]


def batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One batch ``n`` times: the loss must fall within a few steps."""
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 16, (8, 5), generator=g), torch.randint(0, 4, (8,), generator=g))] * n


def train(
    engine: TrainEngine, data: list, start: int = 0, norms: list | None = None
) -> list[float]:
    """The loop's step, as training code writes it: lr schedule, forward, backward, step."""
    losses = []
    for i, (ids, y) in enumerate(data, start):
        engine.set_lr(LR * (i + 1) / (STEPS + 2))  # the loop owns the schedule
        with engine.autocast():
            loss = F.cross_entropy(engine.model(ids.to(engine.device)), y.to(engine.device))
        engine.backward(loss)
        norm = engine.step()
        if norms is not None:
            norms.append(norm)
        losses.append(float(loss.detach()))
    return losses


def params(engine: TrainEngine) -> dict[str, torch.Tensor]:
    state = engine.state_dict_for_save()
    assert state is not None
    return state


def fresh(seed: int = 0) -> Tiny:
    torch.manual_seed(seed)
    return Tiny()


def ds_engine(model: torch.nn.Module, config: Path) -> TrainEngine:
    return make_engine(model, groups(model), LR, str(config), grad_clip=CLIP, micro_batch_size=8)


def test_plain_engine_steps_clips_and_resumes(tmp_path):
    model = fresh()
    engine = make_engine(model, groups(model), LR, None, grad_clip=CLIP)
    assert isinstance(engine, PlainEngine) and engine.is_main and engine.model is model
    data = batches(STEPS)
    losses = train(engine, data[:2])
    engine.save_checkpoint(tmp_path, {"step": 2})
    after = train(engine, data[2:3], start=2)
    want = params(engine)
    assert after[0] < losses[0]

    other = fresh(seed=5)
    resumed = make_engine(other, groups(other), LR, None, grad_clip=CLIP)
    assert resumed.load_checkpoint(tmp_path) == {"step": 2}
    train(resumed, data[2:3], start=2)
    for k, v in params(resumed).items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=0)
    with pytest.raises(FileNotFoundError):
        resumed.load_checkpoint(tmp_path / "missing")


def test_zero2_matches_plain_adamw(dist_env):
    """Same seed, data and fp32 math: ZeRO-2 on one rank ends where plain AdamW + clipping does."""
    data = batches(STEPS)
    plain = make_engine(m := fresh(), groups(m), LR, None, grad_clip=CLIP)
    ds = ds_engine(fresh(), ZERO2)
    assert isinstance(ds, DeepSpeedTrainEngine) and ds.is_main
    assert not any(dist_env.iterdir()), "DeepSpeed JIT-built an op (shm comm?): minutes on CI"
    assert type(ds.optimizer).__name__ == "DeepSpeedZeroOptimizer"
    assert type(ds.optimizer.optimizer) is torch.optim.AdamW  # the loop's AdamW, not FusedAdam
    before = {k: v.clone() for k, v in params(ds).items()}  # CPU: live weights, not copies
    plain_norms: list[float] = []
    ds_norms: list[float] = []
    plain_losses, ds_losses = train(plain, data, 0, plain_norms), train(ds, data, 0, ds_norms)
    assert ds_losses[-1] < ds_losses[0]
    torch.testing.assert_close(ds_losses, plain_losses, rtol=1e-5, atol=1e-6)
    assert min(plain_norms) > CLIP  # clipping was active on every step
    torch.testing.assert_close(ds_norms, plain_norms, rtol=1e-5, atol=1e-6)
    got, want = params(ds), params(plain)
    assert got.keys() == want.keys() == before.keys()
    for k in want:
        assert not torch.equal(got[k], before[k]), k
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("config", [ZERO2, ZERO3], ids=["zero2", "zero3"])
def test_deepspeed_checkpoint_resumes_to_the_same_next_step(dist_env, tmp_path, config):
    data = batches(STEPS)
    engine = ds_engine(fresh(), config)
    train(engine, data[:2])
    engine.save_checkpoint(tmp_path, {"step": 2})
    train(engine, data[2:], start=2)
    want = params(engine)  # under ZeRO-3 this gathers the partitioned weights

    # a fresh engine, as a resumed run builds one (ZeRO-3 cannot load into the saving engine)
    resumed = ds_engine(fresh(seed=5), config)
    assert resumed.load_checkpoint(tmp_path) == {"step": 2}
    train(resumed, data[2:], start=2)
    got = params(resumed)
    assert got.keys() == want.keys() == set(Tiny().state_dict())
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)


def test_config_auto_fields_come_from_the_loop():
    cfg = resolve_ds_config(
        json.loads(ZERO3.read_text()), lr=1e-3, grad_clip=0.0, bf16=True, micro_batch_size=4
    )
    assert cfg["train_micro_batch_size_per_gpu"] == 4 and cfg["gradient_accumulation_steps"] == 1
    assert cfg["gradient_clipping"] == 0.0 and cfg["bf16"]["enabled"] is True
    assert "optimizer" not in cfg and "auto" not in json.dumps(cfg)
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True

    own = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}}}
    opt = resolve_ds_config(own, lr=1e-3, grad_clip=1.0, bf16=False, micro_batch_size=1)
    assert opt["optimizer"]["params"]["lr"] == 1e-3 and opt["optimizer"]["params"]["torch_adam"]
    with pytest.raises(ValueError, match="scheduler"):
        resolve_ds_config({"scheduler": {}}, lr=1, grad_clip=1, bf16=False, micro_batch_size=1)
    with pytest.raises(ValueError, match="gradient_accumulation"):
        resolve_ds_config(
            {"gradient_accumulation_steps": 4}, lr=1, grad_clip=1, bf16=False, micro_batch_size=1
        )


def test_dist_env_defaults_never_override_a_launcher(monkeypatch):
    for var in DIST_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "8")
    ensure_dist_env()
    assert os.environ["WORLD_SIZE"] == "8" and "RANK" not in os.environ
    monkeypatch.delenv("WORLD_SIZE")
    ensure_dist_env()
    assert [os.environ[v] for v in ("RANK", "LOCAL_RANK", "WORLD_SIZE")] == ["0", "0", "1"]
    assert os.environ["MASTER_ADDR"] == "127.0.0.1" and int(os.environ["MASTER_PORT"]) > 0
