"""GRACE training: it memorizes a tiny set, grows the vocabulary for atomic ids, resumes to the
same weights after an interruption, writes checkpoints atomically, and trains under ZeRO-2."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from grace.data.synth import synthesize
from grace.errors import GraceError, InvalidInputError
from grace.identifiers import assign_identifiers
from grace.models.backbone import add_identifier_vocabulary, tokenizer_of
from grace.models.tiny import build_tiny_backbone
from grace.retrieval.index import IdentifierIndex
from grace.retrieval.retriever import GraceRetriever
from grace.training import loop, train
from grace.training.config import TrainConfig
from grace.training.engine import DeepSpeedTrainEngine, PlainEngine

pytestmark = pytest.mark.usefixtures("one_thread")
ZERO2 = Path(__file__).resolve().parents[2] / "configs" / "deepspeed" / "zero2.json"


def load_images(root: Path, records) -> list[Image.Image]:
    out = []
    for r in records:
        with Image.open(root / r.path) as im:
            out.append(im.convert("RGB"))
    return out


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(run / "model" / "model.safetensors")


# ---- learning to memorize and to retrieve ------------------------------------------------------
@pytest.mark.slow
def test_memorizes_every_image_and_retrieves_its_training_queries(memorized):
    gm, records = memorized.model, memorized.records
    for task in ("memorize", "retrieve"):
        losses = [m[f"loss_{task}"] for m in memorized.metrics if f"loss_{task}" in m]
        assert losses[-1] < losses[0] / 20, task
    found = gm.recall_identifiers(load_images(memorized.root, records))
    memorization = sum(
        h is not None and h.key == r.key for h, r in zip(found, records, strict=True)
    )
    assert memorization / len(records) >= 0.9

    queries = [c for r in records for c in r.captions]
    gold = [r.key for r in records for _ in r.captions]
    ranked = gm.retrieve(queries, k=3, num_beams=3)
    at_1 = sum(bool(row) and row[0].key == g for row, g in zip(ranked, gold, strict=True))
    assert at_1 / len(queries) >= 0.8, f"R@1 on its training queries: {at_1}/{len(queries)}"


@pytest.mark.slow
def test_saved_model_loads_and_answers_like_the_trained_one(memorized):
    loaded = GraceRetriever.load(memorized.out / "model")
    assert loaded.info["complete"] and loaded.info["steps"] == len(memorized.metrics)
    assert [r.key for r in loaded.records] == [r.key for r in memorized.records]
    queries = [r.captions[0] for r in memorized.records]
    want = memorized.model.retrieve(queries, k=3, num_beams=3)
    got = loaded.retrieve(queries, k=3, num_beams=3)
    assert [[h.key for h in row] for row in got] == [[h.key for h in row] for row in want]


# ---- atomic identifiers: one new token per image ----------------------------------------------
def test_atomic_ids_add_one_token_per_image_with_mean_initialised_rows(small_backbone, tmp_path):
    records = synthesize(tmp_path / "d", n=10, seed=1)
    id_map = assign_identifiers(records, "atomic")
    model, processor = build_tiny_backbone(
        [c for r in records for c in r.captions], small_backbone, seed=0
    )
    tok = tokenizer_of(processor)
    n_before = len(tok)
    emb_before = model.get_input_embeddings().weight.detach().clone()
    head_before = model.get_output_embeddings().weight.detach().clone()

    added = add_identifier_vocabulary(model, processor, id_map.new_tokens())
    assert added == len(records) == len(set(id_map.new_tokens()))
    assert len(tok) == n_before + added
    emb = model.get_input_embeddings().weight.detach()
    head = model.get_output_embeddings().weight.detach()
    assert emb.shape[0] == head.shape[0] == len(tok)
    assert torch.equal(emb[:n_before], emb_before) and torch.equal(head[:n_before], head_before)
    for new, old in ((emb[n_before:], emb_before), (head[n_before:], head_before)):
        torch.testing.assert_close(new, old.mean(0).expand_as(new), atol=1e-4, rtol=0)
    index = IdentifierIndex.build(id_map, tok)
    assert all(len(s) == 1 and s[0] >= n_before for s in index.sequences)
    assert len({s[0] for s in index.sequences}) == len(records)
    assert add_identifier_vocabulary(model, processor, id_map.new_tokens()) == 0
    assert model.get_input_embeddings().weight.shape[0] == len(tok)


def test_training_with_atomic_ids_saves_the_grown_vocabulary(small_backbone, tmp_path):
    records = synthesize(tmp_path / "d", n=6, seed=2)
    id_map = assign_identifiers(records, "atomic")
    cfg = TrainConfig(
        backbone="tiny", tiny=small_backbone, epochs=1, batch_size=8, checkpoint_every=0
    )
    train(records, tmp_path / "d", id_map, tmp_path / "run", cfg, progress=False)
    gm = GraceRetriever.load(tmp_path / "run" / "model")
    assert gm.model.get_input_embeddings().weight.shape[0] == len(gm.tokenizer)
    for ident, _ in id_map.identifiers():
        assert len(gm.tokenizer(ident, add_special_tokens=False)["input_ids"]) == 1, ident


# ---- resuming ----------------------------------------------------------------------------------
def resume_config(backbone, **kw) -> TrainConfig:
    """53 steps of batch 4 over all four tasks; pseudo-queries for the 2 test images at epoch 1."""
    settings = dict(
        epochs=3, batch_size=4, lr=3e-3, warmup_steps=2, pseudo_queries="caption",
        pseudo_query_at=0.3,
    )  # fmt: skip
    return TrainConfig(backbone="tiny", tiny=backbone, **{**settings, "checkpoint_every": 0, **kw})


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_backbone, one_thread):
    root = tmp_path_factory.mktemp("resume") / "data"
    records = synthesize(root, n=8, seed=3, test_fraction=0.25)
    id_map = assign_identifiers(records, "numeric")
    out = root.parent / "uninterrupted"
    trace: list[tuple[int, float, float]] = []
    train(
        records,
        root,
        id_map,
        out,
        resume_config(small_backbone),
        progress=False,
        callback=lambda s, m: trace.append((s, m["lr"], m["loss"])),
    )
    return records, root, id_map, out, trace


def checkpoints_resumed_from(monkeypatch) -> list[str]:
    """The checkpoint folders (``step-N``) the plain engine loads from, in order, as it does."""
    resumed_from: list[str] = []
    real_load = PlainEngine.load_checkpoint

    def load(self, ckpt_dir):
        resumed_from.append(Path(ckpt_dir).parent.name)
        return real_load(self, ckpt_dir)

    monkeypatch.setattr(PlainEngine, "load_checkpoint", load)
    return resumed_from


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    differ = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[0]}"


@pytest.mark.slow
@pytest.mark.parametrize("stop", [7, 30], ids=["before-pseudo-queries", "after-pseudo-queries"])
def test_resumed_run_ends_with_the_same_weights(uninterrupted, small_backbone, tmp_path, stop):
    """Bit-identical: same init (out/init), same batches, optimizer state restored, no dropout,
    and the lr schedule does not depend on where the run was interrupted."""
    records, root, id_map, want, trace = uninterrupted
    assert len(trace) > stop
    out = tmp_path / "run"
    cfg = resume_config(small_backbone)
    seen: list[tuple[int, float, float]] = []
    record = lambda s, m: seen.append((s, m["lr"], m["loss"]))  # noqa: E731
    gm = train(
        records, root, id_map, out, cfg, progress=False, callback=record, stop_after_steps=stop
    )
    assert gm.info["steps"] == stop and not gm.info["complete"]
    assert not (out / "model").exists()  # the checkpoint is the artifact of an interrupted run
    assert [c.name for c in (out / "checkpoints").iterdir()] == [f"step-{stop:08d}"]
    gm = train(records, root, id_map, out, cfg, progress=False, callback=record)
    assert gm.info["complete"] and gm.info["steps"] == len(trace)
    assert seen == trace
    assert_same_weights(out, want)


@pytest.mark.slow
def test_checkpoint_killed_while_written_is_never_resumed_from(
    uninterrupted, small_backbone, tmp_path, monkeypatch
):
    records, root, id_map, want, _ = uninterrupted
    out = tmp_path / "run"
    cfg = resume_config(small_backbone, checkpoint_every=5)
    real_save = PlainEngine.save_checkpoint
    calls = []

    def killed_on_second_save(self, ckpt_dir, client_state=None):
        calls.append(ckpt_dir)
        real_save(self, ckpt_dir, client_state)
        if len(calls) == 2:
            raise KeyboardInterrupt  # killed after the weights, before the loop position

    monkeypatch.setattr(PlainEngine, "save_checkpoint", killed_on_second_save)
    with pytest.raises(KeyboardInterrupt):
        train(records, root, id_map, out, cfg, progress=False)
    monkeypatch.setattr(PlainEngine, "save_checkpoint", real_save)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000005"]
    # what a non-atomic writer would have left: a step folder without its loop position
    (out / "checkpoints" / "step-00000009" / "engine").mkdir(parents=True)
    assert loop._latest_checkpoint(out).name == "step-00000005"

    resumed_from = checkpoints_resumed_from(monkeypatch)
    train(records, root, id_map, out, cfg, progress=False)
    assert resumed_from == ["step-00000005"]
    assert_same_weights(out, want)


@pytest.mark.slow
def test_resume_on_other_data_ids_or_settings_is_refused(uninterrupted, small_backbone, tmp_path):
    records, root, id_map, _, _ = uninterrupted
    out = tmp_path / "run"
    cfg = resume_config(small_backbone)
    train(records, root, id_map, out, cfg, progress=False, stop_after_steps=3)
    atomic, fewer = assign_identifiers(records, "atomic"), id_map.remove([records[0].key])
    refused = {
        "identifiers: another identifier map (8 ids -> 8, scheme numeric -> atomic)": (
            records, atomic, cfg
        ),
        "data: another image set (8 images -> 7)": (records[1:], fewer, cfg),
        "setting lr: 0.003 -> 0.001": (records, id_map, replace(cfg, lr=1e-3)),
    }  # fmt: skip
    for message, (recs, ids, c) in refused.items():
        with pytest.raises(GraceError, match="cannot resume") as e:
            train(recs, root, ids, out, c, progress=False, stop_after_steps=4)
        assert message in str(e.value)
    assert [c.name for c in (out / "checkpoints").iterdir()] == ["step-00000003"]  # untouched
    # how long it goes on may change: the run resumes
    gm = train(records, root, id_map, out, replace(cfg, max_seconds=600.0), progress=False,
               stop_after_steps=4)  # fmt: skip
    assert gm.info["steps"] == 4


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before(
    uninterrupted, small_backbone, tmp_path, monkeypatch
):
    records, root, id_map, want, _ = uninterrupted
    out = tmp_path / "run"
    cfg = resume_config(small_backbone, checkpoint_every=5)
    train(records, root, id_map, out, cfg, progress=False, stop_after_steps=12)
    ckpts = out / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-00000010", "step-00000012"]
    (newest,) = (ckpts / "step-00000012" / "engine").iterdir()
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a disk that filled
    (ckpts / ".step-00000015.partial" / "engine").mkdir(parents=True)  # killed writers' leftovers
    (out / ".model.k2j4x9").mkdir()
    (out / ".fingerprint.json.abc.tmp").write_text("{")
    resumed_from = checkpoints_resumed_from(monkeypatch)
    with pytest.warns(UserWarning, match="step-00000012.*sha256.*older checkpoint"):
        train(records, root, id_map, out, cfg, progress=False)
    assert resumed_from == ["step-00000010"]
    assert not [p.name for p in [*out.iterdir(), *ckpts.iterdir()] if p.name.startswith(".")]
    assert_same_weights(out, want)


def test_an_image_changed_since_validation_is_refused(small_backbone, tmp_path):
    root = tmp_path / "data"
    records = synthesize(root, n=4, seed=5, test_fraction=0.0)
    changed = root / records[2].path
    Image.new("RGB", (8, 8), (1, 2, 3)).save(changed)  # after the scan that keyed it
    cfg = TrainConfig(backbone="tiny", tiny=small_backbone, epochs=1, batch_size=4)
    with pytest.raises(InvalidInputError) as e:
        train(records, root, assign_identifiers(records, "numeric"), tmp_path / "run", cfg,
              progress=False)  # fmt: skip
    (p,) = e.value.problems
    assert (p.file, p.rule) == (str(changed), "unchanged-image")
    assert not (tmp_path / "run" / "model").exists()


class RankEngine:
    """Records what one rank of a multi-GPU run does while a checkpoint is written."""

    def __init__(self, is_main: bool):
        self.is_main = is_main
        self.calls: list[str] = []

    def barrier(self) -> None:
        self.calls.append("barrier")

    def save_checkpoint(self, ckpt_dir, client_state=None) -> None:
        self.calls.append(f"save {Path(ckpt_dir).parent.name}")
        Path(ckpt_dir).mkdir(parents=True)  # (each rank writes its own shard file in there)


def test_every_rank_writes_its_shards_into_the_same_checkpoint_folder(tmp_path):
    """A per-rank temporary folder would keep only one rank's optimizer shards: the run could
    not resume. All ranks save into one hidden folder that only rank 0 renames into place."""
    main, other = RankEngine(is_main=True), RankEngine(is_main=False)
    loop._save_checkpoint(main, tmp_path, 7, (0, 7), None, keep=2, seconds=1.5)
    assert main.calls == ["barrier", "save .step-00000007.partial", "barrier", "barrier"]
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step-00000007"]
    state = json.loads((tmp_path / "checkpoints" / "step-00000007" / loop.STATE_FILE).read_text())
    assert state["step"] == 7 and state["seconds"] == 1.5  # a resumed run keeps its time budget
    (tmp_path / "checkpoints" / ".step-00000008.partial").mkdir()  # as rank 0 makes it
    loop._save_checkpoint(other, tmp_path, 8, (0, 8), None, keep=2, seconds=2.0)
    assert other.calls == main.calls[:1] + ["save .step-00000008.partial", "barrier", "barrier"]
    assert loop._latest_checkpoint(tmp_path).name == "step-00000007"  # rank 0's job


# ---- DeepSpeed ZeRO-2 through the real loop ---------------------------------------------------
@pytest.mark.slow
def test_zero2_trains_through_the_loop_like_plain_adamw(dist_env, small_backbone, tmp_path):
    """Memorize-only batches (every image held out) give every parameter a gradient at every
    step, so one-rank ZeRO-2 must do the plain loop's math; then the full task mix under ZeRO-2
    (text-only batches leave the vision tower without gradients) trains and saves a model."""
    records = synthesize(tmp_path / "d", n=6, seed=4)
    held_out = [replace(r, split="test") for r in records]
    id_map = assign_identifiers(records, "numeric")
    cfg = TrainConfig(
        backbone="tiny", tiny=small_backbone, epochs=4, batch_size=2, lr=3e-3, checkpoint_every=0
    )
    runs = {}
    for name, ds in (("plain", None), ("zero2", str(ZERO2))):
        losses: list[float] = []
        train(
            held_out,
            tmp_path / "d",
            id_map,
            tmp_path / name,
            replace(cfg, deepspeed=ds),
            progress=False,
            callback=lambda s, m, losses=losses: losses.append(m["loss"]),
        )
        runs[name] = losses
    assert not any(dist_env.iterdir()), "DeepSpeed JIT-built an op"
    assert len(runs["zero2"]) == 12 and runs["zero2"][-1] < runs["zero2"][0]
    torch.testing.assert_close(runs["zero2"], runs["plain"], rtol=1e-4, atol=1e-5)
    plain, zero2 = weights(tmp_path / "plain"), weights(tmp_path / "zero2")
    assert plain.keys() == zero2.keys()
    for k in plain:
        torch.testing.assert_close(zero2[k], plain[k], rtol=1e-4, atol=1e-5, msg=k)

    engines = []
    real_make = loop.make_engine

    def spy(*a, **kw):
        engines.append(real_make(*a, **kw))
        return engines[-1]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loop, "make_engine", spy)
        mix = replace(cfg, deepspeed=str(ZERO2), epochs=1)
        gm = train(records, tmp_path / "d", id_map, tmp_path / "mix", mix, progress=False)
    engine = engines[0]
    assert isinstance(engine, DeepSpeedTrainEngine) and engine.model.zero_optimization_stage() == 2
    assert gm.info["complete"]
    loaded = GraceRetriever.load(tmp_path / "mix" / "model")
    hits = loaded.retrieve([records[0].captions[0]], k=3, num_beams=3)[0]
    assert hits and all(h.key in id_map.ids for h in hits)


# ---- progress bar ------------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal(small_backbone, tmp_path, capsys, monkeypatch):
    records = synthesize(tmp_path / "d", n=4, seed=5)
    id_map = assign_identifiers(records, "numeric")
    cfg = TrainConfig(
        backbone="tiny", tiny=small_backbone, epochs=2, batch_size=2, checkpoint_every=0
    )
    train(records, tmp_path / "d", id_map, tmp_path / "log", cfg)
    assert "grace train" not in capsys.readouterr().err  # a log file gets no bar updates
    terminal = Terminal()
    monkeypatch.setattr("sys.stderr", terminal)
    train(records, tmp_path / "d", id_map, tmp_path / "tty", cfg)
    assert "grace train" in terminal.getvalue()
    assert "left=" in terminal.getvalue() and "(steps)" in terminal.getvalue()


class _RunsCodeWhenUnpickled:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))  # any callable: here, one that leaves a trace


def test_a_checkpoint_that_would_run_code_when_loaded_is_refused(tmp_path):
    import pickle

    from grace.training.engine import _PLAIN_CKPT

    model = torch.nn.Linear(2, 2)
    engine = PlainEngine(model, torch.optim.AdamW(model.parameters()), grad_clip=0.0, bf16=False)
    engine.save_checkpoint(tmp_path / "engine")
    engine.load_checkpoint(tmp_path / "engine")  # our own checkpoints load
    marker = tmp_path / "code-ran"
    tampered = {
        "model": model.state_dict(),
        "optimizer": engine.optimizer.state_dict(),
        "client_state": {"x": _RunsCodeWhenUnpickled(marker)},
    }
    torch.save(tampered, tmp_path / "engine" / _PLAIN_CKPT)
    with pytest.raises(pickle.UnpicklingError):
        engine.load_checkpoint(tmp_path / "engine")
    assert not marker.exists()
