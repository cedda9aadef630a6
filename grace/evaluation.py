"""Evaluation: text->image Recall@K on held-out queries, memorization accuracy, latency, and
the dense baseline scored in the same harness, so every report shows GRACE beside it.

Queries are the captions of test-split images (never trained on). The gallery is every
memorized image, or only the test split as in the paper's Flickr30K/COCO protocol.
"""

from __future__ import annotations

import base64
import html
import io
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from grace.atomic_io import write_json, write_text
from grace.embedding import ImageEmbedder, dense_rank
from grace.errors import GraceError
from grace.modeling_grace import GraceModel
from grace.records import ImageRecord

KS = (1, 5, 10)
GALLERIES = ("all", "test")


def recall_at_k(
    ranked: Sequence[Sequence[str]], gold: Sequence[str], ks: Sequence[int] = KS
) -> dict[str, float]:
    """Share of queries whose gold image is among the first K of its ranking."""
    if len(ranked) != len(gold):
        raise ValueError(f"{len(ranked)} rankings for {len(gold)} queries")
    if not gold:
        return {f"R@{k}": 0.0 for k in ks}
    return {
        f"R@{k}": float(np.mean([g in list(r)[:k] for r, g in zip(ranked, gold, strict=True)]))
        for k in ks
    }


@dataclass
class EvalResult:
    metrics: dict[str, float]
    queries: list[str] = field(default_factory=list)
    gold: list[str] = field(default_factory=list)
    grace_ranked: list[list[str]] = field(default_factory=list)
    dense_ranked: list[list[str]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "queries": len(self.queries)}


def held_out_queries(records: Sequence[ImageRecord]) -> tuple[list[str], list[str]]:
    """(query, gold image key) for every caption of a test-split image."""
    pairs = [(c, r.key) for r in records if r.split == "test" for c in r.captions]
    return [q for q, _ in pairs], [k for _, k in pairs]


def check_gallery(gallery: str) -> None:
    """Refuse an unknown gallery before any expensive work (a baseline trains for a minute)."""
    if gallery not in GALLERIES:
        raise GraceError(f"gallery must be one of {GALLERIES}, got {gallery!r}")


def evaluate(
    gm: GraceModel,
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    *,
    gallery: str = "all",
    ks: Sequence[int] = KS,
    num_beams: int = 10,
    batch_size: int = 16,
    dense: ImageEmbedder | None = None,
    max_queries: int | None = None,
) -> EvalResult:
    """Score ``gm`` (and the ``dense`` baseline when given) on the set's held-out queries."""
    check_gallery(gallery)
    root = Path(root)
    live = [r for r in records if r.key in gm.id_map.ids]
    if gallery == "test":
        others = [r.key for r in live if r.split != "test"]
        gm = GraceModel(gm.model, gm.processor, gm.id_map.remove(others), live, gm.prompts)
        live = [r for r in live if r.split == "test"]
    queries, gold = held_out_queries(live)
    if max_queries is not None:
        queries, gold = queries[:max_queries], gold[:max_queries]
    k = max(ks)
    metrics: dict[str, float] = {"queries": float(len(queries)), "images": float(len(live))}

    t0 = time.perf_counter()
    hits = gm.retrieve(queries, k=k, num_beams=max(num_beams, k), batch_size=batch_size)
    metrics["latency_ms_per_query"] = 1000 * (time.perf_counter() - t0) / max(len(queries), 1)
    grace_ranked = [[h.key for h in row] for row in hits]
    metrics.update({f"grace_{m}": v for m, v in recall_at_k(grace_ranked, gold, ks).items()})
    metrics["valid_id_rate"] = float(
        np.mean([all(h.key in gm.id_map.ids for h in row) for row in hits]) if hits else 1.0
    )

    for split in sorted({r.split for r in live}):
        members = [r for r in live if r.split == split]
        found = gm.recall_identifiers([_load(root, r) for r in members], batch_size=batch_size)
        correct = [h is not None and h.key == r.key for h, r in zip(found, members, strict=True)]
        metrics[f"memorization_{split}"] = float(np.mean(correct))
    metrics["memorization"] = float(
        np.average(
            [metrics[f"memorization_{s}"] for s in sorted({r.split for r in live})],
            weights=[sum(r.split == s for r in live) for s in sorted({r.split for r in live})],
        )
    )

    dense_ranked = None
    if dense is not None and queries:
        img = dense.embed_images([root / r.path for r in live])
        txt = dense.embed_texts(queries)
        top = dense_rank(txt, img, k)
        dense_ranked = [[live[i].key for i in row] for row in top]
        metrics.update({f"dense_{m}": v for m, v in recall_at_k(dense_ranked, gold, ks).items()})
    return EvalResult(metrics, queries, gold, grace_ranked, dense_ranked)


def _load(root: Path, r: ImageRecord) -> Image.Image:
    with Image.open(root / r.path) as im:
        return im.convert("RGB")


def write_report(
    result: EvalResult,
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    out: str | os.PathLike,
    examples: int = 20,
) -> tuple[Path, Path]:
    """``metrics.json`` and ``report.html`` (query -> top-5 thumbnails, gold outlined)."""
    out, root = Path(out), Path(root)
    path_of = {r.key: r.path for r in records}
    thumbs: dict[str, str] = {}

    def thumb(key: str) -> str:
        if key not in thumbs:
            with Image.open(root / path_of[key]) as im:
                im = im.convert("RGB")
                im.thumbnail((96, 96))
                buf = io.BytesIO()
                im.save(buf, format="PNG")
            thumbs[key] = base64.b64encode(buf.getvalue()).decode()
        return thumbs[key]

    def strip(ranked: Sequence[str], gold: str) -> str:
        cells = []
        for key in list(ranked)[:5]:
            style = "outline:3px solid #2a2" if key == gold else "outline:1px solid #ccc"
            cells.append(
                f'<img src="data:image/png;base64,{thumb(key)}" style="{style};margin:2px" '
                f'title="{html.escape(path_of.get(key, key))}">'
            )
        return "".join(cells) or "<em>no valid id</em>"

    rows = []
    for n in range(min(examples, len(result.queries))):
        g = result.gold[n]
        dense = (
            f"<td>{strip(result.dense_ranked[n], g)}</td>"
            if result.dense_ranked is not None
            else ""
        )
        rows.append(
            f"<tr><td>{html.escape(result.queries[n])}</td>"
            f'<td><img src="data:image/png;base64,{thumb(g)}"></td>'
            f"<td>{strip(result.grace_ranked[n], g)}</td>{dense}</tr>"
        )
    metric_rows = "".join(
        f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" for k, v in result.metrics.items()
    )
    dense_head = "<th>dense top-5</th>" if result.dense_ranked is not None else ""
    page = (
        "<!doctype html><meta charset='utf-8'><title>GRACE evaluation</title>"
        "<style>body{font-family:sans-serif}td,th{padding:4px;vertical-align:middle}</style>"
        f"<h1>GRACE evaluation</h1><table>{metric_rows}</table>"
        f"<h2>Queries (gold outlined green)</h2><table><tr><th>query</th><th>gold</th>"
        f"<th>GRACE top-5</th>{dense_head}</tr>{''.join(rows)}</table>"
    )
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", result.metrics)
    write_text(out / "report.html", page)
    return out / "metrics.json", out / "report.html"


def example_grid(
    result: EvalResult,
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    rows: int = 3,
    top: int = 5,
    cell: int = 72,
) -> Image.Image:
    """A picture of the first ``rows`` queries: text, the gold image, GRACE's top-``top``
    (green frame: the gold image; red: another), for a glance in the MLflow UI."""
    from PIL import ImageDraw

    root = Path(root)
    path_of = {r.key: r.path for r in records}
    n = min(rows, len(result.queries))
    text_w, pad = 260, 6
    grid = Image.new("RGB", (text_w + (top + 1) * (cell + pad) + pad, max(n, 1) * (cell + pad)))
    grid.paste((255, 255, 255), (0, 0, *grid.size))
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        y = i * (cell + pad) + pad // 2
        words, line, lines = result.queries[i].split(), "", []
        for w in words:
            if len(line) + len(w) > 38:
                lines.append(line)
                line = ""
            line = f"{line} {w}".strip()
        lines.append(line)
        draw.multiline_text((4, y + 4), "\n".join(lines[:4]), fill=(0, 0, 0))
        keys = [result.gold[i], *result.grace_ranked[i][:top]]
        for j, key in enumerate(keys):
            x = text_w + j * (cell + pad)
            with Image.open(root / path_of[key]) as im:
                grid.paste(im.convert("RGB").resize((cell, cell)), (x, y))
            if j:
                colour = (0, 170, 0) if key == result.gold[i] else (200, 0, 0)
                draw.rectangle((x - 2, y - 2, x + cell + 1, y + cell + 1), outline=colour, width=2)
    return grid
