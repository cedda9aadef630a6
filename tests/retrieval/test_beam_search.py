"""The purpose-built trie beam search ranks exactly as ``generate`` with the trie processor."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlamaConfig, LlamaForCausalLM

from grace.retrieval.beam_search import generate_beam_search, trie_beam_search
from grace.retrieval.trie import Trie

EOS, PAD = 3, 1


def _llama_config(**changes) -> LlamaConfig:
    """The tests' small Llama: 60 tokens, 32 wide, 2 layers; ``changes`` override fields."""
    fields = dict(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, num_key_value_heads=2, pad_token_id=PAD,
                  eos_token_id=EOS, bos_token_id=2)  # fmt: skip
    return LlamaConfig(**{**fields, **changes})


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(_llama_config()).eval()


def _ids(n: int, seed: int) -> list[tuple[int, ...]]:
    rng = np.random.default_rng(seed)
    ids = {tuple(int(t) for t in rng.integers(4, 60, rng.integers(1, 5))) for _ in range(n)}
    ids |= {(10, 11), (10, 11, 12), (10, 11, 12, 13)}  # ids that are prefixes of others
    return sorted(ids)


def _prompts() -> dict[str, torch.Tensor]:
    """Three prompts of lengths 3, 6 and 4, left padded."""
    ids = torch.tensor(
        [[PAD, PAD, PAD, 2, 20, 21], [2, 30, 31, 32, 33, 34], [PAD, PAD, 2, 5, 6, 7]]
    )
    return {"input_ids": ids, "attention_mask": (ids != PAD).long()}


def _assert_same(new, ref):
    """The same real hypotheses with the same scores; fillers (no valid id left) in both.

    A filler scores about ``-1e9 / length`` and which one fills a slot is a tie of hopeless
    scores, not a ranking. ``generate`` pads its candidates with such fillers, which may end a
    query before an identifier it would still have found; the children-only search pads with
    nothing, so it may hold a real hypothesis where ``generate`` holds a filler, never the
    reverse.
    """
    width = ref.sequences.shape[2]
    assert new.sequences.shape[:2] == ref.sequences.shape[:2]
    real = ref.scores > -1e6
    if bool(real.all()):  # the same hypotheses in the same order
        assert (new.sequences[..., width:] == PAD).all()
        assert torch.equal(new.sequences[..., :width], ref.sequences)
        torch.testing.assert_close(new.scores, ref.scores, rtol=1e-5, atol=1e-5)
        return
    for q in range(real.shape[0]):  # each of generate's real hypotheses, with its score
        got = {
            tuple(seq[: len(seq) - int((seq == PAD).sum())].tolist()): float(score)
            for seq, score in zip(new.sequences[q], new.scores[q], strict=True)
            if score > -1e6
        }
        for seq, score in zip(ref.sequences[q][real[q]], ref.scores[q][real[q]], strict=True):
            seq = seq[: len(seq) - int((seq == PAD).sum())]
            assert got[tuple(seq.tolist())] == pytest.approx(float(score), abs=1e-5)


def _both(model, inputs, trie, beams, max_new, fused=True):
    kw = dict(num_beams=beams, max_new_tokens=max_new, pad_token_id=PAD)
    return trie_beam_search(model, inputs, trie, fused_steps=fused, **kw), generate_beam_search(
        model, inputs, trie, **kw
    )


def test_plain_llama_gets_fused_steps(llama):
    from grace.retrieval.fused_llama import LlamaSteps

    assert LlamaSteps.of(llama) is not None
    llama.train()
    assert LlamaSteps.of(llama) is None  # training: the model's own forward
    llama.eval()
    config = LlamaConfig(**{**llama.config.to_dict(), "rope_parameters": None})
    config.rope_parameters = {"rope_type": "dynamic", "rope_theta": 100.0, "factor": 2.0}
    dynamic = LlamaForCausalLM(config).eval()
    assert LlamaSteps.of(dynamic) is None  # angles depend on the length: no table of them


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("n_ids, beams", [(3, 4), (40, 4), (40, 10), (300, 10)])
def test_same_sequences_and_scores_as_generate(llama, n_ids, beams, fused):
    ids = _ids(n_ids, seed=n_ids)
    trie = Trie(ids, eos_token_id=EOS)
    new, ref = _both(llama, _prompts(), trie, beams, max(map(len, ids)) + 1, fused)
    assert new.sequences.shape[:2] == (3, beams)
    _assert_same(new, ref)
    # and they are real identifiers, best first
    for row in new.sequences.tolist():
        assert tuple(row[0][: row[0].index(EOS)]) in set(ids)
    assert (new.scores[:, :-1] >= new.scores[:, 1:]).all()


@pytest.mark.parametrize("ids", [[(5, 6)], [(5,), (7, 8)], [(5, 6), (5, 6, 7), (9,)]])
@pytest.mark.parametrize("beams", [3, 4])
def test_fewer_identifiers_than_beams_as_generate(llama, ids, beams):
    """Beams left without a real identifier hold fillers where ``generate`` does."""
    new, ref = _both(llama, _prompts(), Trie(ids, eos_token_id=EOS), beams, 4)
    _assert_same(new, ref)
    assert int((new.scores > -1e6).sum(1).max()) <= len(ids)


@pytest.mark.parametrize("vocab, removed", [(60, False), (50, False), (60, True)])
def test_children_scores_are_the_dense_softmax_renormalized(vocab, removed):
    """Scores from the beams' nodes equal the dense reference: full logits, the processor's
    mask (stuck rows may emit EOS only, tokens past the vocabulary and removed ids are not
    allowed), renormalized over what is allowed; each allowed token leads to the node
    ``advance`` finds, and only the children's scores are computed."""
    from grace.retrieval.beam_search import _children, _Scores
    from grace.retrieval.trie import constrain_scores

    ids = _ids(40, seed=4)
    trie = Trie(ids, eos_token_id=EOS)
    if removed:
        trie.remove(ids[::3])
    rng = np.random.default_rng(0)
    nodes = np.concatenate([rng.integers(0, trie.num_nodes, 30), [0, trie.dead_end]])
    logits = torch.randn(nodes.size, vocab)
    got, tokens, child = _children(trie, nodes, _Scores(None, logits=logits), EOS, 2)
    masked = constrain_scores(logits.log_softmax(-1), trie.node_mask(nodes, vocab), EOS)
    want = (masked - masked.logsumexp(-1, keepdim=True)).numpy()
    dense = np.full_like(want, -np.inf)
    finite = np.isfinite(got)
    dense[np.nonzero(finite)[0], tokens[finite]] = got[finite]
    np.testing.assert_allclose(dense, want, rtol=1e-5, atol=1e-6)
    assert got[-1][finite[-1]].tolist() == [0.0] and tokens[-1][finite[-1]].tolist() == [EOS]
    row, slot = np.nonzero(finite)
    free = ~np.isin(row, np.flatnonzero(~trie.node_mask(nodes, vocab).numpy().any(1)))
    tok = tokens[row, slot]
    assert (child[row, slot][free] == trie.advance(nodes[row], tok)[free]).all()
    assert got.shape[1] == max(2, int(finite.sum(1).max()))  # children wide, not vocab wide


def test_fused_weights_follow_the_model_and_run_with_or_without_onednn(llama, monkeypatch):
    """The cached fused copy is reused while the weights stay, rebuilt once they change in
    place; oneDNN's prepacked matmuls and plain ``F.linear`` (what the CPU probe may pick, and
    what a GPU gets) rank alike."""
    from grace.retrieval import fused_llama as llama_steps
    from grace.retrieval.fused_llama import LlamaSteps

    steps = LlamaSteps.of(llama)
    assert LlamaSteps.of(llama) is steps
    trie = Trie(_ids(40, seed=6), eos_token_id=EOS)
    before = trie_beam_search(
        llama, _prompts(), trie, num_beams=4, max_new_tokens=5, pad_token_id=PAD
    )
    with torch.no_grad():
        llama.lm_head.weight.mul_(3.0)
    try:
        assert LlamaSteps.of(llama) is not steps
        new, ref = _both(llama, _prompts(), trie, 4, 5)
        assert not torch.allclose(new.scores, before.scores)
        torch.testing.assert_close(new.scores, ref.scores, rtol=1e-5, atol=1e-5)
        for pays in (True, False):
            monkeypatch.setattr(llama_steps, "_packing_pays", lambda weights, pays=pays: pays)
            llama._grace_llama_steps = None
            assert LlamaSteps.of(llama).packed is pays
            new, ref = _both(llama, _prompts(), trie, 4, 5)
            _assert_same(new, ref)
        monkeypatch.setattr(llama_steps, "_packed_matmuls", lambda like: False)
        llama._grace_llama_steps = None
        assert not LlamaSteps.of(llama).packed  # no oneDNN: no probe either
    finally:
        with torch.no_grad():
            llama.lm_head.weight.div_(3.0)
        llama._grace_llama_steps = None


def test_grouped_query_attention_and_scaled_rope_fuse_alike():
    """Fused steps pair rotary halves per head: with fewer key heads than query heads and a
    non-default rotary type the rankings are still ``generate``'s."""
    torch.manual_seed(1)
    config = _llama_config(
        intermediate_size=48,
        num_attention_heads=4,
        rope_parameters={"rope_type": "linear", "rope_theta": 100.0, "factor": 2.0},
    )
    model = LlamaForCausalLM(config).eval()
    assert model.model.rotary_emb.rope_type == "linear"
    ids = _ids(40, seed=5)
    new, ref = _both(model, _prompts(), Trie(ids, eos_token_id=EOS), 6, max(map(len, ids)) + 1)
    _assert_same(new, ref)


def test_one_beam_is_greedy_with_a_score(llama):
    ids = _ids(40, seed=1)
    trie = Trie(ids, eos_token_id=EOS)
    new, ref = _both(llama, _prompts(), trie, 1, max(map(len, ids)) + 1)
    width = ref.sequences.shape[2]
    assert torch.equal(new.sequences[..., :width], ref.sequences)
    assert (new.scores < 0).all()  # generate gives greedy search no score; this one keeps it


def test_score_is_the_length_normalised_log_probability(llama):
    """A hypothesis scores the mean over its tokens of log p(token | node), each softmax taken
    over the node's children only (the factorization the lite backbone trains)."""
    ids = _ids(40, seed=2)
    trie = Trie(ids, eos_token_id=EOS)
    inputs = {k: v[1:2] for k, v in _prompts().items()}  # unpadded
    out = trie_beam_search(llama, inputs, trie, num_beams=4, max_new_tokens=6, pad_token_id=PAD)
    seq = out.sequences[0, 0].tolist()
    seq = seq[: seq.index(EOS) + 1]
    full = torch.cat([inputs["input_ids"][0], torch.tensor(seq)])[None]
    with torch.no_grad():
        logits = llama(input_ids=full).logits[0, :-1].float()
    width = inputs["input_ids"].shape[1]
    total = 0.0
    for j, t in enumerate(seq):
        allowed = torch.from_numpy(trie.allowed_next(seq[:j]).astype(np.int64))
        row = logits[width - 1 + j]
        total += (row[t] - row[allowed].logsumexp(0)).item()
    assert out.scores[0, 0].item() == pytest.approx(total / len(seq), abs=1e-4)


def test_no_trie_is_plain_beam_search(llama):
    out = trie_beam_search(
        llama, _prompts(), None, num_beams=4, max_new_tokens=3, pad_token_id=PAD, eos_token_id=EOS
    )
    assert out.sequences.shape == (3, 4, 3)
    with pytest.raises(ValueError, match="eos_token_id"):
        trie_beam_search(llama, _prompts(), None, num_beams=2, max_new_tokens=2, pad_token_id=PAD)


@pytest.mark.slow
def test_grace_model_ranks_alike_with_semantic_ids_and_images(tmp_path):
    from grace.data.synth import synthesize
    from grace.identifiers import assign_identifiers
    from grace.models.settings import TinyBackboneConfig
    from grace.models.tiny import build_tiny_backbone
    from grace.retrieval.retriever import GraceRetriever

    records = synthesize(tmp_path / "d", n=10, seed=3)
    id_map = assign_identifiers(records, "semantic", params={"id_splits": ["train", "test"]})
    assert any(len(v) > 1 for v in id_map.ids.values())  # several ids for an image
    texts = [c for r in records for c in r.captions]
    model, processor = build_tiny_backbone(texts, TinyBackboneConfig(text_layers=1), seed=1)
    gm = GraceRetriever(model, processor, id_map, records)
    queries = ["a red circle", "two large blue squares on the left of a yellow cross"]
    images = [Image.open(tmp_path / "d" / r.path).convert("RGB") for r in records[:3]]
    new = (gm.retrieve(queries, k=5, num_beams=6), gm.recall_identifiers(images, num_beams=3))
    gm.search = generate_beam_search
    ref = (gm.retrieve(queries, k=5, num_beams=6), gm.recall_identifiers(images, num_beams=3))
    for got, want in zip(new[0] + new[1], ref[0] + ref[1], strict=True):
        got, want = (
            (got if isinstance(got, list) else [got]),
            (want if isinstance(want, list) else [want]),
        )
        assert [h.key for h in got] == [h.key for h in want]
        assert [h.identifier for h in got] == [h.identifier for h in want]
        np.testing.assert_allclose([h.score for h in got], [h.score for h in want], atol=1e-4)
    assert all(len(hits) == len({h.key for h in hits}) for hits in new[0])


@pytest.mark.slow
def test_bench_command_writes_plot_and_logs_to_mlflow(tmp_path, monkeypatch):
    import json

    import mlflow
    from typer.testing import CliRunner

    from grace.cli import app

    monkeypatch.chdir(tmp_path)  # MLflow puts artifacts beside the working directory
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["bench", "--kind", "search", "--out", "b", "--sizes", "100,2000", "--queries", "2"]
    args += ["--batch-size", "2"]
    args += ["--repeats", "1", "--beams", "3", "--no-reference", "--mlflow-uri", uri]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert (tmp_path / "b" / "query_latency.png").read_bytes()[:4] == b"\x89PNG"
    result = json.loads((tmp_path / "b" / "query_latency.json").read_text())
    assert [r["ids"] for r in result["rows"]] == [100, 2000]
    assert all(r["grace_ms"] > 0 and r["dense_ms"] > 0 for r in result["rows"])
    assert "Crossover, GRACE against dense" in res.output
    mlflow.set_tracking_uri(uri)
    runs = mlflow.search_runs(experiment_names=["grace-bench"], output_format="list")
    assert len(runs) == 1
    assert runs[0].data.metrics["floor_ms"] > 0
    artifacts = mlflow.artifacts.list_artifacts(run_id=runs[0].info.run_id)
    assert [a.path for a in artifacts] == ["query_latency.png"]


@pytest.mark.slow
def test_bench_times_the_lite_backbone_and_its_sentence_encoding(tmp_path):
    import json

    from typer.testing import CliRunner

    from grace.cli import app

    args = ["bench", "--kind", "search", "--out", str(tmp_path), "--sizes", "100,2000"]
    args += ["--queries", "2", "--batch-size", "2", "--repeats", "1", "--beams", "3"]
    args += ["--no-reference"]
    res = CliRunner().invoke(app, [*args, "--backbone", "lite"])
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "query_latency.json").read_text())
    assert result["config"]["backbone"] == "lite"
    assert all(r["encode_ms"] > 0 and r["encode_batched_ms"] > 0 for r in result["rows"])
    assert "MiniLM single" in res.output
    assert "Crossover, GRACE + MiniLM encoding against dense" in res.output
    bad = CliRunner().invoke(app, [*args, "--backbone", "huge"])
    assert bad.exit_code != 0 and "expected one of tiny, lite" in bad.output


@pytest.mark.slow
def test_bench_times_each_identifier_scheme_by_default(tmp_path):
    """``grace bench`` with defaults measures the default scheme beside atomic and numeric."""
    import json

    from typer.testing import CliRunner

    from grace.cli import app
    from grace.constants import DEFAULT_ID_SCHEME

    args = ["bench", "--out", str(tmp_path), "--sizes", "300,1200", "--queries", "2"]
    args += ["--batch-size", "2", "--repeats", "1", "--beams", "3"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    result = json.loads((tmp_path / "scheme_cost.json").read_text())
    grace_rows = [r for r in result["rows"] if r["scheme"] != "dense"]
    assert [r["scheme"] for r in grace_rows[:3]] == [DEFAULT_ID_SCHEME, "atomic", "numeric"]
    assert all(r["single_ms"] > 0 and r["train_step_ms"] > 0 for r in grace_rows)
    by = {(r["scheme"], r["ids"]): r for r in grace_rows}
    assert by[("atomic", 1200)]["max_fanout"] == 1200  # the root holds every image
    assert by[("structured", 1200)]["max_fanout"] <= 101  # bounded by max(k, c + 1)
    assert f"Targets, {DEFAULT_ID_SCHEME} at 1,200 over 300 ids" in res.output
    bad = CliRunner().invoke(app, [*args, "--schemes", "atomic,bogus"])
    assert bad.exit_code == 2 and "expected some of" in bad.output


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this torch")
def test_packing_probe_follows_the_faster_matmul(monkeypatch):
    """The probe packs only when oneDNN's matmul is clearly the faster one here."""
    from grace.retrieval import fused_llama as llama_steps

    weights = [torch.randn(48, 32), torch.randn(60, 48)]
    slow = lambda x, w: time.sleep(2e-4)  # noqa: E731
    monkeypatch.setattr(llama_steps, "_packed_linear", slow)
    assert not llama_steps._packing_pays(weights)
    monkeypatch.setattr(llama_steps, "_packed_linear", lambda x, w: None)
    monkeypatch.setattr(llama_steps.F, "linear", slow)
    assert llama_steps._packing_pays(weights)


def test_rebuilt_fused_weights_keep_the_probed_matmul_path(llama, monkeypatch):
    """Changed weights rebuild the fused copy on the path chosen before, without a new probe."""
    from grace.retrieval import fused_llama as llama_steps
    from grace.retrieval.fused_llama import LlamaSteps

    calls = []
    monkeypatch.setattr(llama_steps, "_packed_matmuls", lambda like: True)
    monkeypatch.setattr(llama_steps, "_packing_pays", lambda weights: calls.append(1) or False)
    llama._grace_llama_steps = None
    try:
        first = LlamaSteps.of(llama)
        with torch.no_grad():
            llama.lm_head.weight.mul_(2.0)
        rebuilt = LlamaSteps.of(llama)
        assert rebuilt is not first and rebuilt.packed is first.packed is False
        assert len(calls) == 1
    finally:
        with torch.no_grad():
            llama.lm_head.weight.div_(2.0)
        llama._grace_llama_steps = None
