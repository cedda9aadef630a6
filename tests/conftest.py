"""Fixtures shared by several test modules: a one-process DeepSpeed world, a small backbone,
one GRACE model trained once per session on a tiny set it memorizes, and a stand-in KFP API
server for the real kfp.Client.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch

from grace.configuration_grace import TinyBackboneConfig, TrainConfig
from grace.identifiers import IdentifierMap, assign_identifiers
from grace.modeling_grace import GraceModel
from grace.records import ImageRecord
from grace.synth import synthesize
from grace.training_grace import train

if TYPE_CHECKING:
    from tests.kfp_api_standin import KfpApiStandIn

DIST_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "LOCAL_RANK", "WORLD_SIZE")
# Half the default tiny backbone's width and depth: trains in seconds, still memorizes a dozen.
SMALL_BACKBONE = TinyBackboneConfig(
    vision_hidden=64, vision_layers=1, text_hidden=128, text_layers=2, vocab_size=600
)


@pytest.fixture(scope="module")
def dist_env(tmp_path_factory) -> Iterator[Path]:
    """A one-process world for DeepSpeed, undone afterwards (env and process group); yields an
    empty TORCH_EXTENSIONS_DIR, to check that nothing gets JIT-compiled."""
    ext_dir = tmp_path_factory.mktemp("torch_extensions")
    with pytest.MonkeyPatch.context() as mp:
        for var in DIST_VARS:
            mp.delenv(var, raising=False)
        mp.setenv("TORCH_EXTENSIONS_DIR", str(ext_dir))
        yield ext_dir
        if torch.distributed.is_initialized():
            # through DeepSpeed, which also drops its cached groups: the next module's
            # deepspeed.initialize would otherwise broadcast over a destroyed world group
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from a second thread, and on a CPU shared with other jobs two
    threads spin-wait on each other: several times slower."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def small_backbone() -> TinyBackboneConfig:
    return SMALL_BACKBONE


@dataclass
class TrainedRun:
    records: list[ImageRecord]
    root: Path
    id_map: IdentifierMap
    out: Path
    model: GraceModel
    metrics: list[dict[str, float]]  # per step, from the training callback


@pytest.fixture(scope="session")
def memorized(tmp_path_factory) -> TrainedRun:
    """12 train images with numeric ids, trained until it knows them (about 300 steps)."""
    root = tmp_path_factory.mktemp("memorized") / "data"
    records = synthesize(root, n=12, seed=3, test_fraction=0.0)
    id_map = assign_identifiers(records, "numeric")
    cfg = TrainConfig(
        backbone="tiny",
        tiny=SMALL_BACKBONE,
        epochs=40,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        describe_task=True,
        caption_task=False,
        checkpoint_every=0,
        num_threads=1,
    )
    out = root.parent / "run"
    metrics: list[dict[str, float]] = []
    gm = train(
        records,
        root,
        id_map,
        out,
        cfg,
        progress=False,
        callback=lambda s, m: metrics.append(m),
    )
    return TrainedRun(records, root, id_map, out, gm, metrics)


@pytest.fixture
def kfp_api(tmp_path, monkeypatch) -> Iterator[KfpApiStandIn]:
    """The KFP API stand-in, and a kfp.Client that sees only it: no ~/.config/kfp context
    (namespace, cookies) and no KF_PIPELINES_* variables (one renames experiments)."""
    import kfp

    from tests.kfp_api_standin import kfp_api_standin

    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    for var in list(os.environ):
        if var.startswith("KF_PIPELINES_"):
            monkeypatch.delenv(var)
    with kfp_api_standin() as standin:
        yield standin
