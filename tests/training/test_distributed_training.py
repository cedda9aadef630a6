"""Data-parallel training in N local processes (``TrainConfig.processes``), on CPU with gloo.

Two ranks, each on its half of every global batch, must follow the loss curve of one process
on the whole batch: memorize-only with atomic ids gives every example the same number of target
tokens, so the mean of the two half-batch losses is the whole-batch loss and DeepSpeed's
gradient average is the whole-batch gradient.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from grace.data.synth import synthesize
from grace.errors import GraceError
from grace.identifiers import assign_identifiers
from grace.models.settings import LiteBackboneConfig
from grace.retrieval.retriever import GraceRetriever
from grace.training import train
from grace.training.config import TrainConfig
from grace.training.distributed import shard

ZERO2 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"


@given(
    batch=st.lists(st.integers(), min_size=1, max_size=40, unique=True),
    world=st.integers(1, 9),
)
def test_shards_cover_the_batch_once_and_leave_no_rank_idle(batch, world):
    shares = [shard(batch, rank, world) for rank in range(world)]
    assert all(shares), "every rank needs work for the collective backward"
    if len(batch) >= world:
        flat = [x for s in shares for x in s]
        assert sorted(flat) == sorted(batch)  # disjoint and complete
        assert max(map(len, shares)) - min(map(len, shares)) <= 1
    else:
        assert {x for s in shares for x in s} == set(batch)
    with pytest.raises(ValueError, match="outside a world"):
        shard(batch, world, world)


@pytest.fixture(scope="module")
def memorize_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("dp-data")
    records = synthesize(root, n=16, seed=3, test_fraction=0.0)
    return records, root, assign_identifiers(records, "atomic")


CONFIG = TrainConfig(
    lite=LiteBackboneConfig(hidden=64, layers=1, heads=2, vocab_size=400, alignment_weight=0.0),
    retrieve_task=False,
    describe_task=False,
    caption_task=False,
    epochs=3,
    batch_size=8,
    warmup_steps=1,
    checkpoint_every=0,
    num_threads=1,
    deepspeed=str(ZERO2),
)


@pytest.mark.slow
def test_two_processes_follow_the_one_process_loss_curve(memorize_set, tmp_path):
    records, root, ids = memorize_set
    curves: dict[int, list[tuple[int, float]]] = {1: [], 2: []}
    for n in (1, 2):
        cfg = replace(CONFIG, processes=n)

        def log(step: int, metrics: dict[str, float], n: int = n) -> None:
            curves[n].append((step, metrics["loss"]))

        gm = train(records, root, ids, tmp_path / f"p{n}", cfg, log, progress=False)
        assert gm.info["world_size"] == n
    steps = 3 * 16 // 8
    assert [s for s, _ in curves[2]] == list(range(1, steps + 1))  # every step, in order
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[2]]
    for (_, one), (_, two) in zip(curves[1], curves[2], strict=True):
        assert two == pytest.approx(one, rel=1e-4)
    saved = GraceRetriever.load(tmp_path / "p2" / "model")  # rank 0 wrote it, whole
    assert saved.info["world_size"] == 2 and saved.info["complete"]


def test_processes_without_deepspeed_are_refused_with_the_fix(memorize_set, tmp_path):
    records, root, ids = memorize_set
    cfg = replace(CONFIG, processes=2, deepspeed=None)
    with pytest.raises(GraceError, match="needs a DeepSpeed config.*zero2.json"):
        train(records, root, ids, tmp_path / "run", cfg, progress=False)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_launched_rank_without_deepspeed_is_refused(memorize_set, tmp_path, monkeypatch):
    """Under an outside launcher (torchrun, deepspeed) a rank alone would train on half the data."""
    records, root, ids = memorize_set
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(GraceError, match="2 ranks need a DeepSpeed config"):
        train(records, root, ids, tmp_path / "run", replace(CONFIG, deepspeed=None))


def test_processes_must_be_positive():
    with pytest.raises(ValueError, match="processes must be >= 1"):
        TrainConfig(processes=0)
