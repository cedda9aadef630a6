"""Evaluation reports: ``metrics.json`` and ``report.html``, and a picture of example queries.

An incremental update's report also gets the old-vs-new table and figure.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from grace.atomic_io import write_json, write_text
from grace.data.records import ImageRecord
from grace.evaluation.metrics import EvalResult


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
    """A picture of the first ``rows`` queries, for a glance in the MLflow UI.

    Each row shows the query's text, the gold image and GRACE's top-``top`` (green frame: the
    gold image; red: another).
    """
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


def _old_new_rows(m: dict[str, float]) -> list[tuple[str, list[float | None]]]:
    keys = ["grace_R@1", "grace_R@5", "grace_R@10", "memorization"]
    return [
        (label, [m.get(prefix + k) for k in keys])
        for label, prefix in (
            ("base, old images (old gallery)", "base_old_"),
            ("candidate, old images (old gallery)", "old_"),
            ("candidate, old images (whole gallery)", "old_whole_gallery_"),
            ("candidate, new images (whole gallery)", "new_"),
        )
    ]


def _old_new_html(m: dict[str, float], plan) -> str:
    cells = "".join(
        f"<tr><td>{label}</td>"
        + "".join(f"<td>{'' if v is None else f'{v:.3f}'}</td>" for v in values)
        + "</tr>"
        for label, values in _old_new_rows(m)
    )
    counts = ", ".join(f"{k}: {v}" for k, v in plan.summary().items())
    return (
        "<!doctype html><meta charset='utf-8'><title>old vs new images</title>"
        f"<h1>Incremental update: old vs new images</h1><p>{counts}</p>"
        "<table border=1 cellpadding=4><tr><th></th><th>R@1</th><th>R@5</th><th>R@10</th>"
        f"<th>memorization</th></tr>{cells}</table>"
        "<p>Old gallery: the old images only, the base's and the candidate's the same, so the "
        "difference is forgetting (what the gate compares). Whole gallery: every live image, as "
        "a user searches; new images that fit an old caption also crowd its top K there.</p>"
    )


def _old_new_figure(m: dict[str, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["R@1", "R@5", "R@10", "memorization"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = _old_new_rows(m)
    width = 0.8 / len(rows)
    for n, (label, values) in enumerate(rows):
        xs = [i + n * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(labels))], labels)
    ax.set(ylim=(0, 1.05), title="old vs new images")
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    return fig
