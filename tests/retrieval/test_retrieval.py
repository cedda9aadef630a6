"""Constrained retrieval, describe and caption: every answer is a live identifier, whatever the
scheme and however untrained the model; retired ids never come back; mixed-length ids resolve
under wide beam search even when finished beams are padded."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from grace.data.synth import synthesize
from grace.errors import GraceError
from grace.identifiers import SCHEME_NAMES, IdentifierMap, assign_identifiers
from grace.models.backbone import add_identifier_vocabulary
from grace.models.tiny import build_tiny_backbone
from grace.retrieval.index import IdentifierIndex, default_tokenizer
from grace.retrieval.retriever import GraceRetriever

pytestmark = pytest.mark.usefixtures("one_thread")
ODD_QUERIES = ["a red circle", "zebra on the moon", "0 1 2", "<img_3>", "x"]


class RandomEmbedder:
    """Stand-in image embedder for structured ids (no dual encoder to train)."""

    def embed_images(self, paths):
        rng = np.random.default_rng(len(paths))
        v = rng.normal(size=(len(paths), 8)).astype(np.float32)
        return v / np.linalg.norm(v, axis=1, keepdims=True)


def random_init_model(records, id_map: IdentifierMap, backbone) -> GraceRetriever:
    """A never-trained GRACE model: its scores say nothing, so only the trie keeps it valid."""
    texts = [c for r in records for c in r.captions]
    texts += [id_map.token_text(i) for i, _ in id_map.identifiers()]
    model, processor = build_tiny_backbone(texts, backbone, seed=1)
    add_identifier_vocabulary(model, processor, id_map.new_tokens())
    return GraceRetriever(model, processor, id_map, records)


def load_images(root, records) -> list[Image.Image]:
    out = []
    for r in records:
        with Image.open(root / r.path) as im:
            out.append(im.convert("RGB"))
    return out


def assert_live(rows, id_map: IdentifierMap, k: int) -> None:
    for row in rows:
        assert 1 <= len(row) <= k
        assert len({h.key for h in row}) == len(row), "an image twice in one ranking"
        for h in row:
            assert h.identifier in id_map.ids.get(h.key, []), (h, "not a live id of its image")
        assert [h.score for h in row] == sorted((h.score for h in row), reverse=True)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes") / "data"
    return synthesize(root, n=14, seed=7), root


@pytest.mark.parametrize("scheme", SCHEME_NAMES)
def test_random_init_model_returns_only_live_ids_and_never_retired_ones(
    shapes, small_backbone, scheme
):
    records, root = shapes
    params = {"k": 2, "c": 4} if scheme == "structured" else None
    embedder = RandomEmbedder() if scheme == "structured" else None
    id_map = assign_identifiers(records, scheme, params=params, embedder=embedder, root=root)
    if scheme == "semantic":
        assert max(len(v) for v in id_map.ids.values()) > 1  # several valid ids per image
    gm = random_init_model(records, id_map, small_backbone)
    queries = ODD_QUERIES + [c for r in records[:6] for c in r.captions[:1]]
    assert_live(gm.retrieve(queries, k=10, num_beams=10), id_map, 10)
    assert_live(gm.retrieve(queries[:3], k=3, num_beams=1), id_map, 1)  # greedy: one answer
    memorized = gm.recall_identifiers(load_images(root, records))
    assert_live([[h] for h in memorized], id_map, 1)

    retired = [r.key for r in records[::2]]
    smaller = id_map.remove(retired)
    gm_smaller = GraceRetriever(gm.model, gm.processor, smaller, records)
    rows = gm_smaller.retrieve(queries, k=10, num_beams=10)
    assert_live(rows, smaller, 10)
    assert not {h.key for row in rows for h in row} & set(retired)
    if max(len(v) for v in smaller.ids.values()) == 1:  # one id each: beams enough for all
        assert all(len(row) == min(10, len(smaller)) for row in rows)
    found = gm_smaller.recall_identifiers(load_images(root, records))
    assert not {h.key for h in found} & set(retired)


@pytest.mark.slow
def test_trained_model_never_returns_retired_images(memorized):
    """Retire the images the model knows best for these queries: it must answer with others."""
    gm, records = memorized.model, memorized.records
    retired = [r.key for r in records[:6]]
    queries = [c for r in records[:6] for c in r.captions]
    before = gm.retrieve(queries, k=1, num_beams=3)
    assert sum(row[0].key in retired for row in before) >= len(queries) // 2
    smaller = memorized.id_map.remove(retired)
    gm2 = GraceRetriever(gm.model, gm.processor, smaller, records, gm.prompts)
    rows = gm2.retrieve(queries, k=5, num_beams=5)
    assert_live(rows, smaller, 5)
    assert not {h.key for row in rows for h in row} & set(retired)
    found = gm2.recall_identifiers(load_images(memorized.root, records[:6]))
    assert all(h is None or h.key not in retired for h in found)


# ---- beam search pads finished beams; ids of 1, 2 and 3 tokens must all resolve ----------------
MIXED_IDS = ["5", "42", "417", "903", "128", "77", "3", "610", "256", "999"]


@pytest.mark.parametrize("pad", ["tiny-tokenizer", "zero"])
def test_three_token_ids_resolve_with_ten_beams(shapes, small_backbone, pad):
    """With pad id 0 transformers' beam search pads finished beams with EOS instead of pad:
    resolving cuts at the first EOS, so a 3-token id still comes back (and so do 1-token ids
    finished two steps earlier). The tiny tokenizer avoids the case with a non-zero pad id."""
    records, _ = shapes
    records = records[: len(MIXED_IDS)]
    id_map = IdentifierMap(
        "numeric", ids={r.key: [i] for r, i in zip(records, MIXED_IDS, strict=True)}
    )
    gm = random_init_model(records, id_map, small_backbone)
    lengths = {i: len(s) for i, s in zip(gm.index.identifiers, gm.index.sequences, strict=True)}
    assert lengths["417"] == 3 and lengths["42"] == 2 and lengths["5"] == 1
    assert gm.tokenizer.pad_token_id != 0
    assert gm.model.generation_config.pad_token_id == gm.tokenizer.pad_token_id
    if pad == "zero":
        gm.tokenizer.pad_token = gm.tokenizer.convert_ids_to_tokens(0)
        gm.model.generation_config.pad_token_id = 0
        assert gm.tokenizer.pad_token_id == 0
    rows = gm.retrieve(ODD_QUERIES, k=10, num_beams=10)
    for row in rows:  # ten beams, ten valid ids: every one of them, none lost as "invalid"
        assert sorted(h.identifier for h in row) == sorted(MIXED_IDS)


def test_resolve_cuts_at_the_first_eos(shapes):
    records = shapes[0][: len(MIXED_IDS)]
    id_map = IdentifierMap(
        "numeric", ids={r.key: [i] for r, i in zip(records, MIXED_IDS, strict=True)}
    )
    tok = default_tokenizer(id_map, records, vocab_size=300)
    index = IdentifierIndex.build(id_map, tok)
    seq, eos, pad = index.sequences[index.position["417"]], tok.eos_token_id, tok.pad_token_id
    want = ("417", records[MIXED_IDS.index("417")].key)
    assert index.resolve([*seq, eos]) == want
    assert index.resolve([*seq, eos, eos, eos]) == want  # finished beam padded with EOS
    assert index.resolve([*seq, eos, pad, pad]) == want  # ... or with pad
    assert index.resolve([*seq, eos, *seq]) == want
    assert index.resolve(seq) == want  # cut by max_new_tokens before its EOS
    assert index.resolve(seq[:2]) is None  # "41" is a prefix, not an id
    assert index.resolve([*seq, seq[-1], eos]) is None  # "4177" is no id


# ---- describe and caption ----------------------------------------------------------------------
@pytest.mark.slow
def test_describe_known_ids_and_refuse_unknown_ones(memorized):
    gm, records = memorized.model, memorized.records
    ids = [memorized.id_map.ids[r.key][0] for r in records[:3]]
    texts = gm.describe(ids)
    assert len(texts) == 3 and all(isinstance(t, str) and t.strip() for t in texts)
    vocabulary = {w for r in records for c in r.captions for w in c.replace(",", " ").split()}
    words = [w for t in texts for w in t.replace(",", " ").split()]
    assert sum(w in vocabulary for w in words) >= 0.8 * len(words), texts  # it learned to describe
    assert gm.describe(ids[:1]) == texts[:1]  # deterministic, batch-independent
    with pytest.raises(GraceError, match="unknown identifier '4242'"):
        gm.describe([ids[0], "4242"])
    retired = GraceRetriever(
        gm.model, gm.processor, memorized.id_map.remove([records[0].key]), records, gm.prompts
    )
    with pytest.raises(GraceError, match=f"unknown identifier '{ids[0]}'"):
        retired.describe([ids[0]])


@pytest.mark.slow
def test_caption_gives_one_text_per_image(memorized):
    images = load_images(memorized.root, memorized.records[:3])
    texts = memorized.model.caption(images, max_new_tokens=8, batch_size=2)
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert memorized.model.caption([]) == []
