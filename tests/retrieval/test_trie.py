"""The array trie against a naive dict-of-dicts reference, and constrained beam search with it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from grace.retrieval.trie import Trie, TrieLogitsProcessor

EOS = 3
VOCAB = 12  # tokens 0..11 with EOS = 3 among them: EOS sorts between other tokens


class RefTrie:
    """The obvious trie: a dict per node, EOS as a key to an empty dict. Slow, clearly right."""

    def __init__(self, seqs=()):
        self.root: dict = {}
        for s in seqs:
            self.insert(s)

    def insert(self, seq) -> None:
        node = self.root
        for t in (*seq, EOS):
            node = node.setdefault(t, {})

    def remove(self, seq) -> None:
        path = [self.root]
        for t in (*seq, EOS):
            path.append(path[-1][t])
        for t, parent, child in zip(reversed((*seq, EOS)), path[-2::-1], path[:0:-1], strict=True):
            if not child:
                del parent[t]

    def allowed(self, prefix) -> list[int]:
        node = self.root
        for t in prefix:
            if t not in node:
                return []
            node = node[t]
        return sorted(node)


class SearchedRootTrie(Trie):
    """The same trie without the root lookup table, as for sparse huge token ids."""

    def _set_arrays(self, *arrays):
        super()._set_arrays(*arrays)
        self._root_table = None


token = st.integers(0, VOCAB - 1).filter(lambda t: t != EOS)
sequence = st.lists(token, min_size=1, max_size=5).map(tuple)
seq_sets = st.sets(sequence, min_size=0, max_size=25)


def prefixes_to_check(seqs, rng: np.random.Generator) -> set[tuple[int, ...]]:
    out: set[tuple[int, ...]] = {()}
    for s in seqs:
        for k in range(len(s) + 1):
            out.add(s[:k])
        out.add((*s, EOS))  # complete: nothing allowed
        out.add((*s, EOS, 1))
    for _ in range(10):  # mostly invalid
        out.add(tuple(int(t) for t in rng.integers(0, VOCAB, rng.integers(1, 7))))
    return out


def assert_matches(trie: Trie, ref: RefTrie, live: set, rng: np.random.Generator) -> None:
    assert len(trie) == len(live)
    assert trie.sequences() == sorted(live)
    prefixes = prefixes_to_check(live, rng)
    for p in prefixes:
        assert trie.allowed_next(p).tolist() == ref.allowed(p), p
    by_len: dict[int, list] = {}
    for p in prefixes:
        by_len.setdefault(len(p), []).append(p)
    vocab = VOCAB - 2  # tokens >= vocab_size are dropped from the mask
    for n, group in by_len.items():
        batch = np.array(group, dtype=np.int64).reshape(len(group), n)
        mask = trie.next_token_mask(torch.from_numpy(batch), vocab)
        assert mask.dtype == torch.bool and mask.shape == (len(group), vocab)
        for row, p in zip(mask, group, strict=True):
            want = [t for t in ref.allowed(p) if t < vocab]
            assert torch.nonzero(row).flatten().tolist() == want, p
        # the same rows from the nodes a decoder keeps: live edges and the nodes they lead to
        node = np.zeros(len(group), dtype=np.int64)
        for j in range(n):
            node = trie.advance(node, batch[:, j])
        row, tok, child, degree = trie.live_edges(node, with_degree=True)
        assert (np.diff(row) >= 0).all()
        assert degree.tolist() == [len(ref.allowed(p)) for p in group]
        for i, p in enumerate(group):
            assert tok[row == i].tolist() == ref.allowed(p), p
        if row.size:
            assert (child == trie.advance(node[row], tok)).all()
        dead = trie.live_edges(np.array([trie.dead_end]))[0]
        assert dead.size == 0


@settings(max_examples=60, deadline=None)
@given(seqs=seq_sets, extra=seq_sets, cls=st.sampled_from([Trie, SearchedRootTrie]), data=st.data())
def test_matches_reference_through_removals_and_inserts(seqs, extra, cls, data):
    rng = np.random.default_rng(len(seqs))
    trie = cls(sorted(seqs), eos_token_id=EOS)
    ref = RefTrie(seqs)
    live = set(seqs)
    assert_matches(trie, ref, live, rng)
    for s in live:
        assert s in trie
    gone = data.draw(st.sets(st.sampled_from(sorted(live)))) if live else set()
    trie.remove(list(gone))
    for s in gone:
        ref.remove(s)
        assert s not in trie
    live -= gone
    assert_matches(trie, ref, live, rng)
    back = data.draw(st.sets(st.sampled_from(sorted(gone)))) if gone else set()
    added = back | extra
    trie.insert(list(added))  # some revive removed sequences, some rebuild, some are no-ops
    for s in added:
        ref.insert(s)
    live |= added
    assert_matches(trie, ref, live, rng)
    trie.compact()
    assert_matches(trie, ref, live, rng)


def test_id_that_is_prefix_of_another():
    trie = Trie([(5, 6), (5, 6, 7)], eos_token_id=EOS)
    assert trie.allowed_next([5, 6]).tolist() == [EOS, 7]
    assert trie.allowed_next([5, 6, 7]).tolist() == [EOS]
    assert trie.allowed_next([5, 6, EOS]).tolist() == []
    trie.remove([(5, 6)])
    assert trie.allowed_next([5, 6]).tolist() == [7]
    assert (5, 6) not in trie and (5, 6, 7) in trie
    trie.insert([(5, 6)])
    assert trie.allowed_next([5, 6]).tolist() == [EOS, 7]
    assert len(trie) == 2


def test_remove_then_reinsert_without_rebuild():
    trie = Trie([(1, 2), (1, 4)], eos_token_id=EOS)
    arrays = trie.first_child
    trie.remove([(1, 2)])
    assert trie.allowed_next([1]).tolist() == [4]
    trie.insert([(1, 2)])
    assert trie.first_child is arrays  # revived through counts only
    assert trie.allowed_next([1]).tolist() == [2, 4]


def test_remove_absent_raises_and_changes_nothing():
    trie = Trie([(1, 2), (1, 4)], eos_token_id=EOS)
    with pytest.raises(KeyError):
        trie.remove([(1, 2), (1, 5)])
    with pytest.raises(KeyError):
        trie.remove([(1,)])  # a prefix of an id is not an id
    with pytest.raises(KeyError):
        trie.remove([(1, 2), (1, 2)])
    assert trie.sequences() == [(1, 2), (1, 4)]
    trie.remove([(1, 2)])
    with pytest.raises(KeyError):
        trie.remove([(1, 2)])


def test_insert_existing_is_noop_and_bad_input_refused():
    trie = Trie([(1, 2)], eos_token_id=EOS)
    trie.insert([(1, 2), (1, 2)])
    assert len(trie) == 1 and trie.num_nodes == 4
    for bad in ([()], [(1, EOS)], [(-1,)]):
        with pytest.raises(ValueError):
            trie.insert(bad)
    with pytest.raises(TypeError):
        Trie([(1,)], 3)  # eos is keyword-only


def test_large_token_ids_and_array_input():
    big = [(40_000, 2**31 - 2), (40_000, 7), (2**31 - 2,)]
    trie = Trie(big, eos_token_id=70_000)
    assert trie.allowed_next([40_000]).tolist() == [7, 2**31 - 2]
    assert trie.allowed_next([2**31 - 2]).tolist() == [70_000]
    # a batch with no rows (its root is searched, not a table): nothing to look up, no error
    none = np.zeros(0, dtype=np.int64)
    assert trie.advance(none, none).shape == (0,)
    assert all(a.size == 0 for a in trie.live_edges(none))
    assert trie.live_edges([0])[1].tolist() == [40_000, 2**31 - 2]  # a list of nodes works too
    with pytest.raises(ValueError):
        Trie([(2**31,)], eos_token_id=EOS)
    arr = np.array([[1, 2], [1, 4], [1, 2]])
    for seqs in (arr, torch.from_numpy(arr)):
        assert Trie(seqs, eos_token_id=EOS).sequences() == [(1, 2), (1, 4)]


def test_empty_trie():
    trie = Trie(eos_token_id=EOS)
    assert len(trie) == 0 and trie.num_nodes == 1 and trie.sequences() == []
    assert trie.allowed_next([]).tolist() == [] and (1,) not in trie
    assert not trie.next_token_mask(np.zeros((3, 0), dtype=np.int64), 8).any()
    assert not trie.next_token_mask(np.ones((2, 2), dtype=np.int64), 8).any()
    trie.insert([(7,)])
    assert trie.sequences() == [(7,)]


def test_save_load_roundtrip(tmp_path):
    trie = Trie([(1, 2), (1, 2, 9), (8,)], eos_token_id=EOS)
    trie.remove([(8,)])
    path = tmp_path / "sub" / "trie.npz"
    trie.save(path)
    trie.save(path)  # overwrite in place
    back = Trie.load(path)
    assert back.eos_token_id == EOS and back.sequences() == [(1, 2), (1, 2, 9)]
    assert back.nbytes == trie.nbytes and back.num_nodes == trie.num_nodes
    assert back.allowed_next([]).tolist() == [1]
    assert [p.name for p in path.parent.iterdir()] == ["trie.npz"]  # no temporary left


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_processor_clamps_all_minus_inf_rows_and_frees_stuck_rows(dtype):
    trie = Trie([(5, 6), (5, 7)], eos_token_id=EOS)
    proc = TrieLogitsProcessor(trie, prompt_length=1)
    input_ids = torch.tensor([[0, 5], [0, 5], [0, 9], [0, 5], [0, 5]])  # row 2: invalid prefix
    scores = torch.zeros(5, 10, dtype=dtype)
    scores[1] = float("-inf")  # the model rules out everything
    scores[3, 6] = float("-inf")
    scores[4, 6:8] = float("-inf")  # ... or everything the trie allows
    out = proc(input_ids, scores)
    assert out.dtype == dtype and out.shape == scores.shape
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [6, 7]
    assert out[0, 6] == 0
    floor = torch.finfo(dtype).min / 2
    for row in (1, 4):
        assert torch.isfinite(out[row]).nonzero().flatten().tolist() == [6, 7]
        assert (out[row, [6, 7]] == floor).all()
    assert torch.isfinite(out[2]).nonzero().flatten().tolist() == [EOS]
    assert torch.isfinite(out[3]).nonzero().flatten().tolist() == [7]


def test_constrained_beam_search_returns_only_valid_ids():
    from transformers import LlamaConfig, LlamaForCausalLM, LogitsProcessorList

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=50,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        pad_token_id=1,
        eos_token_id=3,
        bos_token_id=2,
    )
    model = LlamaForCausalLM(config).eval()
    rng = np.random.default_rng(0)
    ids = {tuple(int(t) for t in rng.integers(4, 50, rng.integers(1, 5))) for _ in range(40)}
    ids |= {(10, 11), (10, 11, 12)}  # an id that is a prefix of another
    trie = Trie(sorted(ids), eos_token_id=3)
    max_len = max(map(len, ids))
    prompt = torch.tensor([[2, 20, 21, 22], [2, 30, 31, 32]])
    with torch.no_grad():
        out = model.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            num_beams=4,
            num_return_sequences=4,
            max_new_tokens=max_len + 1,
            logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, prompt.shape[1])]),
            do_sample=False,
            pad_token_id=1,
            eos_token_id=3,
        )
    assert out.shape[0] == 8
    for row in out[:, prompt.shape[1] :].tolist():
        assert 3 in row, row
        assert tuple(row[: row.index(3)]) in ids, row
