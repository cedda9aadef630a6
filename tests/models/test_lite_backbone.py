"""The default ``lite`` backbone: frozen encoders in the processor, projectors + a small Llama
decoder in the model, trained and searched through the same code as any HF backbone."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from PIL import Image

from grace.data.synth import synthesize
from grace.identifiers import assign_identifiers
from grace.models.factory import load_backbone
from grace.models.lite.losses import distillation_loss
from grace.models.lite.modeling_lite import GraceLiteForConditionalGeneration, build_lite_backbone
from grace.models.lite.processing_lite import IMAGE_TOKEN, SENTENCE_TOKEN, GraceLiteProcessor
from grace.models.prompts import Prompts, retrieve_turn, user_turn
from grace.models.settings import LiteBackboneConfig
from grace.retrieval.beam_search import generate_beam_search, trie_beam_search
from grace.retrieval.index import IdentifierIndex
from grace.retrieval.retriever import GraceRetriever
from grace.training import train
from grace.training.choices import label_choices
from grace.training.config import TrainConfig
from grace.training.distillation import IdGallery
from grace.training.examples import ImageInputs, TextInputs, build_examples, collate

SMALL_LITE = LiteBackboneConfig(hidden=64, layers=1, heads=2, vocab_size=400)


@pytest.fixture(scope="module")
def lite_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("lite") / "data"
    records = synthesize(root, n=10, seed=5, test_fraction=0.2)
    return root, records


@pytest.fixture(scope="module")
def backbone(lite_set):
    _, records = lite_set
    texts = [c for r in records for c in r.captions] + ["Which image shows:"]
    return build_lite_backbone(texts, SMALL_LITE, seed=0)


@pytest.fixture(scope="module")
def id_backbone(lite_set):
    """A lite backbone whose structured per-node ids live in its identifier table."""
    from grace.models.backbone import add_identifier_vocabulary

    root, records = lite_set
    id_map = assign_identifiers(
        records, "structured", params={"k": 2, "c": 3}, embedder=_PixelEmbedder(), root=root
    )
    texts = [c for r in records for c in r.captions] + ["Which image shows:"]
    model, processor = build_lite_backbone(texts, SMALL_LITE, seed=1)
    add_identifier_vocabulary(model, processor, id_map.new_tokens())
    with torch.no_grad():  # apart from each other, so the children's scores differ
        model.identifiers.outputs.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        model.identifiers.inputs.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    return model.eval(), processor, id_map


class _PixelEmbedder:
    """Mean colour of each image: embeddings enough to build a k-means tree from."""

    def embed_images(self, paths):
        import numpy as np

        return np.stack(
            [np.asarray(Image.open(p).convert("RGB"), np.float32).mean((0, 1)) for p in paths]
        )


def _images(root: Path, records) -> list[Image.Image]:
    return [Image.open(root / r.path).convert("RGB") for r in records]


def test_the_placeholder_is_the_last_prompt_token(backbone):
    """The answer's first token is predicted at the feature's own position (see the template)."""
    model, processor = backbone
    tok = processor.tokenizer
    image_prompt = user_turn(processor, "Which identifier?", with_image=True)
    text_prompt = user_turn(processor, "Which image shows: a red disc", with_image=False)
    last = [
        processor(text=[p], images=i)["input_ids"][0, -1].item()
        for p, i in ((image_prompt, [[Image.new("RGB", (8, 8))]]), (text_prompt, None))
    ]
    assert last == [
        tok.convert_tokens_to_ids(IMAGE_TOKEN),
        tok.convert_tokens_to_ids(SENTENCE_TOKEN),
    ]


def test_processor_gives_frozen_features_and_checks_placeholders(backbone, lite_set):
    root, records = lite_set
    _, processor = backbone
    pics = _images(root, records[:2])
    prompt = user_turn(processor, "Which identifier?", with_image=True)
    enc = processor(text=[prompt] * 2, images=[[p] for p in pics], padding=True)
    assert enc["image_features"].shape == (2, 1, 1280)
    assert not torch.equal(enc["image_features"][0], enc["image_features"][1])
    q = processor(text=["a red disc", "a blue square"], padding=True)
    assert q["sentence_features"].shape == (2, 1, 384)
    # unit-norm sentence embeddings of different texts differ
    assert torch.allclose(q["sentence_features"].norm(dim=-1), torch.ones(2, 1), atol=1e-5)
    assert not torch.allclose(q["sentence_features"][0], q["sentence_features"][1])
    with pytest.raises(ValueError, match="placeholders"):
        processor(text=[prompt], images=[[pics[0], pics[1]]])
    with pytest.raises(ValueError, match="not both"):
        processor(text=[prompt, "a red disc"], images=[[pics[0]]], padding=True)


@pytest.mark.parametrize("query_words", [False, True])
def test_query_words_decide_whether_the_decoder_reads_a_query_as_tokens(
    lite_set, query_words, tmp_path
):
    """Off (the default) a query is one placeholder token carrying its sentence feature; on, its
    words come first as tokens. The feature is the same either way, and the setting is saved."""
    _, records = lite_set
    texts = [c for r in records for c in r.captions] + ["Which image shows:"]
    cfg = dataclasses.replace(SMALL_LITE, query_words=query_words)
    _, processor = build_lite_backbone(texts, cfg, seed=0)
    query = records[0].captions[0]
    enc = processor(text=[retrieve_turn(processor, Prompts(), query)])
    ids = enc["input_ids"][0].tolist()
    sentence = processor.tokenizer.convert_tokens_to_ids(SENTENCE_TOKEN)
    assert ids[-1] == sentence
    assert (len(ids) == 1) is not query_words
    reference = processor.sentence_features([Prompts().retrieve.format(query=query)])
    assert torch.equal(enc["sentence_features"], reference)
    processor.save_pretrained(tmp_path)
    assert GraceLiteProcessor.from_pretrained(tmp_path).query_words is query_words


def test_processors_saved_before_query_words_keep_reading_words(backbone, tmp_path):
    """A checkpoint's processor JSON without the setting was trained on word prompts."""
    import json

    from grace.models.lite.processing_lite import PROCESSOR_FILE

    _, processor = backbone
    processor.save_pretrained(tmp_path)
    settings = json.loads((tmp_path / PROCESSOR_FILE).read_text())
    del settings["query_words"]
    (tmp_path / PROCESSOR_FILE).write_text(json.dumps(settings))
    old = GraceLiteProcessor.from_pretrained(tmp_path)
    assert old.query_words is True
    assert len(old(text=[retrieve_turn(old, Prompts(), "a red disc")])["input_ids"][0]) > 1


def test_forward_rejects_features_that_do_not_fit_the_placeholders(backbone, lite_set):
    model, processor = backbone
    prompt = user_turn(processor, "Which identifier?", with_image=True)
    enc = processor(text=[prompt], images=[[Image.new("RGB", (16, 16))]])
    enc["image_features"] = torch.cat([enc["image_features"]] * 2)
    with pytest.raises(ValueError, match="placeholder"):
        model(**enc)


@pytest.mark.parametrize("with_image", [False, True])
def test_trie_search_prefills_features_fused_and_ranks_as_generate(
    backbone, lite_set, with_image, monkeypatch
):
    """Featured prompts (sentence or image) go through the fused prefill, via the model's
    ``prompt_embeddings``, and still rank as ``generate`` does (left-padded batch)."""
    import numpy as np

    from grace.retrieval.trie import Trie

    model, processor = backbone
    root, records = lite_set
    tok = processor.tokenizer
    tok.padding_side = "left"
    if with_image:
        prompt = user_turn(processor, "Which identifier?", with_image=True)
        inputs = processor(text=[prompt] * 2, images=[[p] for p in _images(root, records[:2])])
    else:
        texts = ["Which image shows: a red disc", "Which image shows: a big blue square on top"]
        prompts = [user_turn(processor, t, with_image=False) for t in texts]
        inputs = processor(text=prompts, padding=True)
        assert (inputs["attention_mask"] == 0).any()  # padded
    rng = np.random.default_rng(0)
    ids = {tuple(int(t) for t in rng.integers(20, 120, rng.integers(1, 4))) for _ in range(60)}
    trie = Trie(sorted(ids), eos_token_id=tok.eos_token_id)
    calls = []
    embed = model.prompt_embeddings
    monkeypatch.setattr(
        model, "prompt_embeddings", lambda *a, **k: calls.append(1) or embed(*a, **k)
    )
    kw = dict(num_beams=5, max_new_tokens=4, pad_token_id=tok.pad_token_id)
    training = model.training
    model.eval()  # fused steps are for inference only
    try:
        ours = trie_beam_search(model, dict(inputs), trie, **kw)
        ref = generate_beam_search(model, dict(inputs), trie, **kw)
    finally:
        model.train(training)
    assert calls
    width = ref.sequences.shape[2]
    assert torch.equal(ours.sequences[..., :width], ref.sequences)
    torch.testing.assert_close(ours.scores, ref.scores, rtol=1e-5, atol=1e-5)


def test_retrieve_batches_carry_their_images_for_the_alignment_loss(backbone, lite_set):
    root, records = lite_set
    model, processor = backbone
    index = IdentifierIndex.build(assign_identifiers(records, "numeric"), processor.tokenizer)
    images, texts = ImageInputs(processor, records, root), TextInputs(processor)
    prompts = TrainConfig().prompts
    examples = build_examples(
        records,
        index,
        processor,
        images,
        prompts,
        ("memorize", "retrieve"),
        texts=texts,
        align=True,
    )
    retrieve = [e for e in examples if e.task == "retrieve"][:4]
    batch = collate(retrieve, images, processor.tokenizer.pad_token_id, texts)
    assert batch["sentence_features"].shape == (4, 1, 384)
    assert batch["gold_image_features"].shape == (4, 1, 1280)
    with_align = model(**batch).loss
    without = model(**{k: v for k, v in batch.items() if k != "gold_image_features"}).loss
    assert with_align > without  # InfoNCE is positive; dropping the gold images drops it
    # its rows name the answer's image: the gold features are those of that image
    gold = [e.gold for e in retrieve]
    assert torch.equal(batch["gold_image_features"], images.batch(gold)["image_features"])


def test_loss_on_answer_positions_equals_the_causal_lm_loss_over_all_logits(backbone, lite_set):
    root, records = lite_set
    model, processor = backbone
    index = IdentifierIndex.build(assign_identifiers(records, "numeric"), processor.tokenizer)
    images, texts = ImageInputs(processor, records, root), TextInputs(processor)
    examples = build_examples(
        records, index, processor, images, TrainConfig().prompts, ("memorize", "retrieve"),
        texts=texts,
    )  # fmt: skip
    for task in ("memorize", "retrieve"):
        batch = collate([e for e in examples if e.task == task][:5], images,
                        processor.tokenizer.pad_token_id, texts)  # fmt: skip
        labels = batch.pop("labels")
        with torch.no_grad():
            full = model(**batch).logits  # no labels: every position's logits
            out = model(**batch, labels=labels)
        expected = model.loss_function(logits=full, labels=labels, vocab_size=full.shape[-1])
        assert out.logits.shape == (int((labels[:, 1:] != -100).sum()), full.shape[-1])
        torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)


def test_save_and_load_round_trip(backbone, tmp_path):
    model, processor = backbone
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    m2, p2 = load_backbone(tmp_path)
    assert isinstance(m2, GraceLiteForConditionalGeneration)
    assert isinstance(p2, GraceLiteProcessor)
    assert p2.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # the frozen encoders are not in the checkpoint
    assert not any("efficient" in k or "bert" in k for k in sd2)


@pytest.mark.slow
def test_train_memorizes_and_retrieves_with_the_lite_backbone(lite_set, tmp_path, one_thread):
    root, records = lite_set
    id_map = assign_identifiers(records, "numeric")
    cfg = TrainConfig(
        lite=SMALL_LITE,
        epochs=60,
        batch_size=16,
        lr=3e-3,
        warmup_steps=5,
        caption_task=False,
        distill_gallery_size=4,  # of 10 images: the sampled teacher trains too
        checkpoint_every=0,
        num_threads=1,
    )
    gm = train(records, root, id_map, tmp_path / "run", cfg, progress=False)
    loaded = GraceRetriever.load(tmp_path / "run" / "model")
    pics = _images(root, records)
    hits = loaded.recall_identifiers(pics)
    assert [h.key for h in hits] == [r.key for r in records]
    train_caption = next(r for r in records if r.split == "train")
    top = loaded.retrieve([train_caption.captions[0]], k=3)[0]
    assert top[0].key == train_caption.key
    assert loaded.describe([id_map.ids[train_caption.key][0]])[0]  # some text comes back
    # the fused trie search and transformers' generate rank the same on this model
    q = loaded._text_inputs([user_turn(loaded.processor, "Which image shows: a disc", False)])
    kw = dict(
        num_beams=4,
        max_new_tokens=loaded.max_id_tokens + 1,
        pad_token_id=loaded.tokenizer.pad_token_id,
    )
    ours = trie_beam_search(loaded.model, q, loaded.index.trie, **kw)
    ref = generate_beam_search(loaded.model, q, loaded.index.trie, **kw)
    assert ours.sequences.tolist() == ref.sequences[:, :, : ours.sequences.shape[2]].tolist()
    assert torch.allclose(ours.scores, ref.scores, atol=1e-4)
    assert gm.info["steps"] > 0


def test_retrieve_batches_with_the_gallery_add_the_weighted_distillation_loss(backbone, lite_set):
    root, records = lite_set
    model, processor = backbone
    assert model.config.distill_weight == SMALL_LITE.distill_weight > 0
    index = IdentifierIndex.build(assign_identifiers(records, "numeric"), processor.tokenizer)
    images, texts = ImageInputs(processor, records, root), TextInputs(processor)
    examples = build_examples(
        records, index, processor, images, TrainConfig().prompts, ("retrieve",), texts=texts
    )
    batch = collate(examples[:4], images, processor.tokenizer.pad_token_id, texts)
    batch["label_choices"] = label_choices(batch["labels"], index.trie)
    gallery = IdGallery.build(images, index)
    assert gallery.sequences.shape[0] == len(records)
    out = model(**batch, **gallery.inputs())
    plain = model(**batch)
    query = model.model.sentence_projector(batch["sentence_features"])
    probs = model.gallery_probs(query, gallery.features["image_features"])
    torch.testing.assert_close(probs.sum(1), torch.ones(4))
    extra = distillation_loss(
        out.logits, batch["labels"], probs, gallery.sequences, batch["label_choices"]
    )
    torch.testing.assert_close(out.loss, plain.loss + model.config.distill_weight * extra)
    assert extra > 0


def test_identifier_rows_are_a_table_of_their_own_saved_and_loaded(id_backbone, tmp_path):
    model, processor, id_map = id_backbone
    v, rows = model.text_vocab_size, model.identifiers.rows
    assert rows == len(id_map.new_tokens()) > 0
    assert len(processor.tokenizer) == v + rows
    assert model.lm_head.weight.shape[0] == model.get_input_embeddings().weight.shape[0] == v
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    m2, _ = load_backbone(tmp_path)
    assert m2.config.identifier_rows == rows
    torch.testing.assert_close(m2.identifiers.outputs, model.identifiers.outputs)
    tokens = torch.tensor([[3, v, v + rows - 1]])
    torch.testing.assert_close(m2.token_embeddings(tokens), model.token_embeddings(tokens))
    want = torch.cat([model.lm_head.weight[3:4], model.identifiers.outputs[[0, -1]]])
    torch.testing.assert_close(model.output_rows(tokens)[0], want)


@pytest.mark.parametrize("task", ["memorize", "retrieve"])
def test_identifier_loss_is_the_dense_softmax_renormalized_over_the_siblings(
    id_backbone, lite_set, task
):
    """The children-only loss equals the dense reference: full logits over text and identifier
    rows, each labelled token's softmax restricted to its trie node's children."""
    model, processor, id_map = id_backbone
    root, records = lite_set
    index = IdentifierIndex.build(id_map, processor.tokenizer)
    images, texts = ImageInputs(processor, records, root), TextInputs(processor)
    examples = build_examples(
        records, index, processor, images, TrainConfig().prompts, (task,), texts=texts
    )
    batch = collate([e for e in examples if e.task == task][:5], images,
                    processor.tokenizer.pad_token_id, texts)  # fmt: skip
    labels = batch.pop("labels")
    choices = label_choices(labels, index.trie)
    assert choices.shape[1] < len(processor.tokenizer) // 10  # a node's children, not the vocab
    with torch.no_grad():
        full = model(**batch).logits[:, :-1][labels[:, 1:] != -100]  # (labelled, V + N)
        out = model(**batch, labels=labels, label_choices=choices)
    y = labels[:, 1:][labels[:, 1:] != -100]
    allowed = torch.zeros(full.shape, dtype=torch.long)
    allowed.scatter_add_(1, choices.clamp(min=0), (choices >= 0).long())
    masked = full.masked_fill(allowed == 0, float("-inf"))
    want = (masked.logsumexp(1) - full.gather(1, y[:, None])[:, 0]).mean()
    torch.testing.assert_close(out.loss, want, rtol=1e-5, atol=1e-5)
    assert out.logits.shape == choices.shape


def test_a_step_touches_only_the_identifier_rows_its_batch_uses(id_backbone, lite_set):
    """Sparse gradients: the rows a batch's children name, nothing of the table's size."""
    model, processor, id_map = id_backbone
    root, records = lite_set
    index = IdentifierIndex.build(id_map, processor.tokenizer)
    images, texts = ImageInputs(processor, records, root), TextInputs(processor)
    examples = build_examples(
        records, index, processor, images, TrainConfig().prompts, ("memorize",), texts=texts
    )
    batch = collate(examples[:2], images, processor.tokenizer.pad_token_id, texts)
    choices = label_choices(batch["labels"], index.trie)
    model.zero_grad(set_to_none=True)
    model(**batch, label_choices=choices).loss.backward()
    grad = model.identifiers.outputs.grad
    assert grad.is_sparse
    used = set(choices[choices >= model.text_vocab_size].tolist())
    touched = set((grad.coalesce().indices()[0] + model.text_vocab_size).tolist())
    assert touched == used and len(used) < model.identifiers.rows
    model.zero_grad(set_to_none=True)


@pytest.mark.parametrize("with_image", [False, True])
def test_search_over_identifier_rows_ranks_as_the_dense_reference(
    id_backbone, lite_set, with_image
):
    """Identifier tokens past the text vocabulary, fed back through the identifier table and
    scored from their output rows, rank as ``generate`` over the full logits renormalized."""
    model, processor, id_map = id_backbone
    root, records = lite_set
    tok = processor.tokenizer
    tok.padding_side = "left"
    index = IdentifierIndex.build(id_map, tok)
    if with_image:
        prompt = user_turn(processor, "Which identifier?", with_image=True)
        inputs = processor(text=[prompt] * 3, images=[[p] for p in _images(root, records[:3])])
    else:
        texts = ["Which image shows: a red disc", "Which image shows: a big blue square on top"]
        prompts = [user_turn(processor, t, with_image=False) for t in texts]
        inputs = processor(text=prompts, padding=True)
    kw = dict(num_beams=4, max_new_tokens=5, pad_token_id=tok.pad_token_id)
    ours = trie_beam_search(model, dict(inputs), index.trie, **kw)
    ref = generate_beam_search(model, dict(inputs), index.trie, **kw)
    width = ref.sequences.shape[2]
    assert torch.equal(ours.sequences[..., :width], ref.sequences)
    torch.testing.assert_close(ours.scores, ref.scores, rtol=1e-5, atol=1e-5)
    assert (ours.sequences[..., 0] >= model.text_vocab_size).all()  # identifier rows
