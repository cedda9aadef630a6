"""Evaluation: Recall@K and memorization on rankings whose answer is known, the dense baseline in
the same harness, and the metrics.json + report.html it writes."""

from __future__ import annotations

import html
import json
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from grace.data.synth import synthesize
from grace.errors import GraceError
from grace.evaluation.metrics import evaluate, held_out_queries, recall_at_k
from grace.evaluation.reports import write_report
from grace.identifiers import assign_identifiers
from grace.retrieval.retriever import Hit

pytestmark = pytest.mark.usefixtures("one_thread")


def test_recall_at_k_on_a_hand_made_ranking():
    ranked = [["a", "b", "c"], ["b", "a"], ["c", "d", "e", "f", "g", "h"], []]
    gold = ["a", "a", "h", "a"]
    assert recall_at_k(ranked, gold, ks=(1, 2, 5, 6)) == {
        "R@1": 0.25,  # only the first query has its image first
        "R@2": 0.5,
        "R@5": 0.5,  # "h" is sixth
        "R@6": 0.75,  # the empty ranking (no valid id) never counts
    }
    assert recall_at_k([], [], ks=(1,)) == {"R@1": 0.0}
    with pytest.raises(ValueError, match="2 rankings for 1 queries"):
        recall_at_k([["a"], ["b"]], ["a"])


@pytest.fixture(scope="module")
def half_held_out(tmp_path_factory):
    """6 images, 3 of them test (their captions are the queries); one caption needs escaping."""
    root = tmp_path_factory.mktemp("eval") / "data"
    records = synthesize(root, n=6, seed=11, test_fraction=0.5)
    test = [r for r in records if r.split == "test"]
    assert len(test) == 3 and all(len(r.captions) >= 2 for r in test)
    tricky = replace(test[0], captions=("a red <square> & a 'blue' circle", *test[0].captions[1:]))
    records = [tricky if r.key == tricky.key else r for r in records]
    return records, root


class ScriptedModel:
    """Stands in for a GraceRetriever with answers fixed in advance, so every metric is known:
    queries of test image 0 rank it first, of image 1 second, of image 2 not at all; it knows
    the identifier of every image except test image 2."""

    def __init__(self, records, root):
        self.id_map = assign_identifiers(records, "numeric")
        self.records = records
        self.test = [r for r in records if r.split == "test"]
        self.gold_of = {c: r.key for r in self.test for c in r.captions}
        self.key_of_pixels = {_pixels(root, r): r.key for r in records}
        self.forgotten = self.test[2].key

    def hit(self, key: str, score: float = 0.0) -> Hit:
        return Hit(self.id_map.ids[key][0], key, "", score)

    def retrieve(self, queries, k, num_beams, batch_size):
        assert num_beams >= k == 10
        t = [r.key for r in self.test]
        others = [r.key for r in self.records if r.split == "train"]
        ranking = {t[0]: [t[0], t[1]], t[1]: [t[0], t[1], t[2]], t[2]: [t[0], t[1], *others]}
        return [[self.hit(key) for key in ranking[self.gold_of[q]]] for q in queries]

    def recall_identifiers(self, images, batch_size):
        keys = [self.key_of_pixels[im.tobytes()] for im in images]
        return [None if key == self.forgotten else self.hit(key) for key in keys]


def _pixels(root, record) -> bytes:
    with Image.open(root / record.path) as im:
        return im.convert("RGB").tobytes()


class OracleEmbedder:
    """A dense baseline that knows the answer: a query's vector is its image's one-hot."""

    def __init__(self, records, root):
        self.row_of_path = {root / r.path: n for n, r in enumerate(records)}
        self.row_of_caption = {c: n for n, r in enumerate(records) for c in r.captions}
        self.dim = len(records)

    def embed_images(self, paths):
        return np.eye(self.dim, dtype=np.float32)[[self.row_of_path[p] for p in paths]]

    def embed_texts(self, texts):
        return np.eye(self.dim, dtype=np.float32)[[self.row_of_caption[t] for t in texts]]


def test_evaluate_scores_a_scripted_model_exactly(half_held_out, tmp_path):
    records, root = half_held_out
    gm = ScriptedModel(records, root)
    result = evaluate(gm, records, root, dense=OracleEmbedder(records, root))
    test = gm.test
    n = [len(r.captions) for r in test]
    total = sum(n)
    m = result.metrics
    assert m["queries"] == total and m["images"] == len(records)
    assert m["grace_R@1"] == pytest.approx(n[0] / total)
    assert m["grace_R@5"] == m["grace_R@10"] == pytest.approx((n[0] + n[1]) / total)
    assert m["valid_id_rate"] == 1.0
    assert m["memorization_train"] == 1.0 and m["memorization_test"] == pytest.approx(2 / 3)
    assert m["memorization"] == pytest.approx(5 / 6)
    assert m["dense_R@1"] == 1.0
    assert result.queries == held_out_queries(records)[0] and result.gold[0] == test[0].key

    metrics_path, report_path = write_report(result, records, root, tmp_path / "report")
    assert json.loads(metrics_path.read_text()) == pytest.approx(m)
    page = report_path.read_text()
    for q in result.queries:
        assert html.escape(q) in page
    assert "<square>" not in page and html.escape("<square> & a 'blue'") in page
    # per query: the gold thumbnail, GRACE's top-5 and the baseline's top-5, all inlined
    thumbs = page.count('src="data:image/png;base64,')
    assert thumbs == sum(
        1 + len(g[:5]) + len(d[:5])
        for g, d in zip(result.grace_ranked, result.dense_ranked, strict=True)
    )
    assert "dense top-5" in page and "grace_R@1" in page
    assert page.count("outline:3px solid #2a2") == sum(
        gold in g[:5] for g, gold in zip(result.grace_ranked, result.gold, strict=True)
    ) + sum(gold in d[:5] for d, gold in zip(result.dense_ranked, result.gold, strict=True))
    with pytest.raises(GraceError, match="gallery"):
        evaluate(gm, records, root, gallery="everything")


@pytest.mark.slow
def test_evaluate_a_memorizing_model_on_its_own_captions(memorized, tmp_path):
    """Held-out queries that are in fact its training captions: it must score as it learned."""
    records = [replace(r, split="test") if n % 2 else r for n, r in enumerate(memorized.records)]
    result = evaluate(memorized.model, records, memorized.root, gallery="test", max_queries=10)
    m = result.metrics
    assert m["queries"] == 10 and m["images"] == len(records) // 2
    assert m["valid_id_rate"] == 1.0 and m["memorization_test"] == m["memorization"] >= 0.9
    assert m["grace_R@1"] >= 0.8 and m["grace_R@10"] == 1.0  # the gallery has 6 images
    test_keys = {r.key for r in records if r.split == "test"}
    assert all(set(row) <= test_keys for row in result.grace_ranked)
    assert "dense_R@1" not in m and result.dense_ranked is None
    _, report = write_report(result, records, memorized.root, tmp_path)
    assert "dense top-5" not in report.read_text()
