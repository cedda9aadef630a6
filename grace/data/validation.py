"""Data-quality gate for an image set: per-file checks, then a great-expectations suite.

``scan_image_set`` refuses a bad set; this reports on it, every failing row at once, as GX
expectation results a pipeline can store and an HTML page a reviewer can open. Files are first
checked one by one with imageset's own rules (they decode, no decompression bomb); the table
rules (unique keys and paths, caption text, sizes, splits, set size) then run as a GX Core suite
over the manifest and its captions exploded to one row per caption.
"""

from __future__ import annotations

import dataclasses
import functools
import html
import json
import logging
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from grace.data.imageset import (
    CAPTIONS_FILE,
    IMAGES_DIR,
    Limits,
    caption_lines,
    check_image,
    image_files,
)
from grace.data.records import SPLITS
from grace.errors import InvalidInputError, Problem

# GX logs ~200 INFO lines per import ("Skipping registering function ...", and one module sets
# its own logger to INFO): a pipeline step's log must show the suite's outcome, not GX's registry.
_GX_CHATTY = ("great_expectations", "great_expectations.data_context.types.base")


def _gx():
    """great_expectations, imported with its INFO chatter off (during the import, and after)."""
    for name in _GX_CHATTY:
        logging.getLogger(name).setLevel(logging.WARNING)
    import great_expectations

    for name in _GX_CHATTY:  # the import set one of them back to INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    return great_expectations


CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f]"
NO_IMAGES = "<no images>"  # GX needs a non-empty value set


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of ``validate_image_set``: problems by file/row/rule and the raw GX results."""

    root: str
    success: bool
    problems: tuple[Problem, ...]
    results: dict[str, Any]  # table name -> GX suite validation result, as JSON
    images: int
    caption_rows: int

    def relocated(self, shown_as: str) -> ValidationReport:
        """This report with its paths named under ``shown_as`` instead of ``root``.

        Args:
            shown_as: What the user knows the set as, e.g. ``repo@v3:data`` for a revision.
        """
        problems = tuple(p.renamed(self.root, shown_as) for p in self.problems)
        return dataclasses.replace(self, root=shown_as, problems=problems)

    def summary(self) -> dict[str, Any]:
        evaluated = [r for res in self.results.values() for r in res.get("results", [])]
        return {
            "success": self.success,
            "images": self.images,
            "caption_rows": self.caption_rows,
            "expectations": len(evaluated),
            "failed_expectations": sum(1 for r in evaluated if not r["success"]),
            "problems": len(self.problems),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "root": self.root,
            "summary": self.summary(),
            "problems": [asdict(p) for p in self.problems],
            "great_expectations": self.results,
        }

    def to_html(self) -> str:
        """A small self-contained page: every expectation, pass/fail, and the failing rows."""
        esc = html.escape
        lines = [
            "<!doctype html><html><head><meta charset='utf-8'>",
            f"<title>Image set validation: {esc(self.root)}</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}"
            ".pass{color:#060}.fail{color:#b00;font-weight:bold}</style></head><body>",
            f"<h1>Image set validation: {esc(self.root)}</h1>",
            f"<p class='{'pass' if self.success else 'fail'}'>"
            f"{'PASSED' if self.success else 'FAILED'}: {self.images} images, "
            f"{self.caption_rows} caption rows, {len(self.problems)} problems</p>",
            "<h2>Expectations</h2><table><tr><th>table</th><th>expectation</th><th>arguments</th>"
            "<th>result</th><th>unexpected</th></tr>",
        ]
        for table, res in self.results.items():
            for r in res.get("results", []):
                config = r["expectation_config"]
                kwargs = {k: v for k, v in config["kwargs"].items() if k != "batch_id"}
                args = json.dumps(kwargs, default=str)
                if len(args) > 200:
                    args = args[:200] + "..."
                ok = r["success"]
                count = r.get("result", {}).get("unexpected_count", "")
                lines.append(
                    f"<tr><td>{esc(table)}</td><td>{esc(config['type'])}</td>"
                    f"<td><code>{esc(args)}</code></td>"
                    f"<td class='{'pass' if ok else 'fail'}'>{'pass' if ok else 'FAIL'}</td>"
                    f"<td>{esc(str(count))}</td></tr>"
                )
        lines.append("</table><h2>Problems</h2>")
        if not self.problems:
            lines.append("<p>None.</p>")
        else:
            lines.append("<table><tr><th>file</th><th>row</th><th>rule</th><th>detail</th></tr>")
            for p in self.problems:
                row = "" if p.row is None else str(p.row)
                lines.append(
                    f"<tr><td>{esc(p.file)}</td><td>{row}</td><td>{esc(p.rule)}</td>"
                    f"<td>{esc(p.detail)}</td></tr>"
                )
            lines.append("</table>")
        lines.append("</body></html>")
        return "\n".join(lines) + "\n"


@dataclass
class _Tables:
    """The set as two tables (one row per image, one per caption row) + pre-pass problems."""

    images: pd.DataFrame
    captions: pd.DataFrame
    present: set[str]  # every file under images/, readable or not ("images/x.png")
    problems: list[Problem] = field(default_factory=list)


def validate_image_set(
    root: str | os.PathLike,
    limits: Limits | None = None,
    min_images: int = 1,
    min_captions: int = 1,
) -> ValidationReport:
    """Check the image set at ``root`` and report every problem; never raises for bad rows.

    Args:
        root: The image set's folder (``images/`` and ``captions.jsonl``).
        limits: What files and captions may be; default ``Limits()``.
        min_images: The fewest readable images the set may have.
        min_captions: The fewest caption rows: retrieval trains on captions, so a set without
            any (a missing or empty ``captions.jsonl``) is refused; 0: a set to memorize only.
    """
    root, limits = Path(root), limits or Limits()
    if not (root / IMAGES_DIR).is_dir():
        raise InvalidInputError(
            [Problem(str(root), "has-images-folder", f"no {IMAGES_DIR}/ folder in {root}")]
        )
    tables = _read_tables(root, limits)
    results: dict[str, Any] = {}
    problems = list(tables.problems)
    if any(p.rule == "max-captions-bytes" for p in problems):
        min_captions = 0  # its rows were never read: one problem for one cause
    for name, frame, suite in _suites(tables, limits, min_images, min_captions):
        result = _run_suite(name, frame, suite)
        results[name] = result
        problems += _problems_of(result, name, frame, root)
    problems.sort(key=lambda p: (p.file, p.row or 0, p.rule))
    return ValidationReport(
        root=str(root),
        success=not problems,
        problems=tuple(problems),
        results=results,
        images=len(tables.images),
        caption_rows=len(tables.captions),
    )


# ---- pre-pass: files and rows ------------------------------------------------------------
def _read_tables(root: Path, limits: Limits) -> _Tables:
    images_dir = root / IMAGES_DIR
    problems: list[Problem] = []
    present: set[str] = set()
    image_rows = []
    for path in image_files(images_dir):
        rel = f"{IMAGES_DIR}/{path.relative_to(images_dir).as_posix()}"
        present.add(rel)
        checked = check_image(path, limits)
        if isinstance(checked, Problem):
            problems.append(checked)
            continue
        key, w, h = checked
        image_rows.append({"key": key, "path": rel, "width": w, "height": h, "pixels": w * h})
    caption_rows = _caption_rows(root / CAPTIONS_FILE, images_dir, problems, limits)
    captions = pd.DataFrame(caption_rows, columns=["row", "image", "caption", "split"])
    per_image: dict[str, set[str]] = defaultdict(set)
    for r in caption_rows:
        if isinstance(r["caption"], str):
            per_image[r["image"]].add(" ".join(r["caption"].split()))
    for r in image_rows:
        r["n_captions"] = len(per_image.get(r["path"], ()))
    images = pd.DataFrame(
        image_rows, columns=["key", "path", "width", "height", "pixels", "n_captions"]
    )
    return _Tables(images, captions, present, problems)


def _caption_rows(
    cap_path: Path, images_dir: Path, problems: list[Problem], limits: Limits
) -> list[dict]:
    """Rows of captions.jsonl that parse; caption text and split are left to the GX suite."""
    if not cap_path.is_file():
        return []
    f = str(cap_path)
    rows = []
    split_of: dict[str, str] = {}
    for row, obj, pure in caption_lines(cap_path, images_dir, problems, limits.max_captions_bytes):
        caption, split = obj.get("caption"), obj.get("split")
        if caption is not None and not isinstance(caption, str):
            problems.append(Problem(f, "caption-text", '"caption" must be a string', row))
            continue
        if split is not None and not isinstance(split, str):
            problems.append(Problem(f, "known-split", '"split" must be a string', row))
            continue
        path = f"{IMAGES_DIR}/{pure.as_posix()}"
        if split in SPLITS and split_of.setdefault(path, split) != split:
            detail = f"{pure.as_posix()} is in split {split_of[path]!r} and {split!r}"
            problems.append(Problem(f, "one-split-per-image", detail, row))
        rows.append({"row": row, "image": path, "caption": caption, "split": split})
    return rows


# ---- the GX suite ------------------------------------------------------------------------
@dataclass(frozen=True)
class _Rule:
    """How a failing expectation reads as a problem: the rule and what it demands."""

    rule: str
    explain: str


def _suites(
    tables: _Tables, limits: Limits, min_images: int, min_captions: int
) -> list[tuple[str, Any, list]]:
    """(table name, DataFrame, expectations); each expectation's meta names its rule."""
    gx = _gx()

    E = gx.expectations

    def meta(rule: str, explain: str) -> dict[str, Any]:
        return {"meta": {"rule": rule, "explain": explain}}

    side = limits.max_side
    images = [
        E.ExpectTableRowCountToBeBetween(
            min_value=min_images, **meta("min-images", f"at least {min_images} readable images")
        ),
        E.ExpectColumnValuesToBeUnique(
            column="key", **meta("unique-images", "same bytes (sha256) as another image")
        ),
        E.ExpectColumnValuesToBeUnique(column="path", **meta("unique-paths", "path used twice")),
        E.ExpectColumnValuesToBeBetween(
            column="width", min_value=1, max_value=side, **meta("image-size", f"width 1..{side}")
        ),
        E.ExpectColumnValuesToBeBetween(
            column="height", min_value=1, max_value=side, **meta("image-size", f"height 1..{side}")
        ),
        E.ExpectColumnValuesToBeBetween(
            column="pixels",
            max_value=limits.max_pixels,
            **meta("max-pixels", f"at most {limits.max_pixels} pixels"),
        ),
        E.ExpectColumnValuesToBeBetween(
            column="n_captions",
            max_value=limits.max_captions_per_image,
            **meta("max-captions-per-image", f"at most {limits.max_captions_per_image} captions"),
        ),
    ]
    captions = [
        E.ExpectTableRowCountToBeBetween(
            min_value=min_captions,
            **meta(
                "has-captions",
                f"at least {min_captions} caption rows: retrieval trains on captions"
                " (a set to memorize only: --memorize-only)",
            ),
        ),
        E.ExpectColumnValuesToBeInSet(
            column="image",
            value_set=sorted(tables.present) or [NO_IMAGES],
            **meta("image-exists", "no such file under images/"),
        ),
        E.ExpectColumnValueLengthsToBeBetween(
            column="caption", min_value=1, **meta("non-empty-caption", "empty caption")
        ),
        E.ExpectColumnValuesToNotMatchRegex(
            column="caption", regex=r"^\s+$", **meta("non-empty-caption", "blank caption")
        ),
        E.ExpectColumnValueLengthsToBeBetween(
            column="caption",
            max_value=limits.max_caption_chars,
            **meta("max-caption-chars", f"caption over {limits.max_caption_chars} characters"),
        ),
        E.ExpectColumnValuesToNotMatchRegex(
            column="caption",
            regex=CONTROL_CHARS,
            **meta("caption-text", "caption contains control characters"),
        ),
        E.ExpectColumnValuesToBeInSet(
            column="split", value_set=list(SPLITS), **meta("known-split", f"not in {SPLITS}")
        ),
    ]
    return [("images", tables.images, images), ("captions", tables.captions, captions)]


@functools.cache
def _gx_batches() -> tuple[Any, dict[str, Any]]:
    """One ephemeral GX context per process (building one is the slow part), batch per table."""
    gx = _gx()
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    source = context.data_sources.add_or_update_pandas("grace-image-set")
    batches = {
        name: source.add_dataframe_asset(name).add_batch_definition_whole_dataframe(name)
        for name in ("images", "captions")
    }
    return context, batches


def _run_suite(name: str, frame: pd.DataFrame, expectations: list) -> dict[str, Any]:
    gx = _gx()

    context, batches = _gx_batches()
    suite = context.suites.add_or_update(
        gx.ExpectationSuite(name=f"grace-{name}", expectations=expectations)
    )
    run = context.validation_definitions.add_or_update(
        gx.ValidationDefinition(data=batches[name], suite=suite, name=f"grace-{name}")
    )
    result = run.run(batch_parameters={"dataframe": frame}, result_format="COMPLETE")
    return json.loads(json.dumps(result.to_json_dict(), default=str))


def _problems_of(
    result: dict[str, Any], table: str, frame: pd.DataFrame, root: Path
) -> list[Problem]:
    """Every failing expectation, as one problem per failing row (file and row of the input)."""
    out = []
    for r in result.get("results", []):
        if r["success"]:
            continue
        config = r["expectation_config"]
        rule, explain = config["meta"].get("rule", config["type"]), config["meta"].get("explain")
        info = r.get("exception_info") or {}
        if info.get("raised_exception"):
            out.append(Problem(str(root), rule, f"{config['type']}: {info['exception_message']}"))
            continue
        res = r.get("result", {})
        indexes = res.get("unexpected_index_list")
        if not indexes:  # a table-level expectation (row count)
            where = root if table == "images" else root / CAPTIONS_FILE
            out.append(
                Problem(str(where), rule, f"{explain}; observed {res.get('observed_value')}")
            )
            continue
        values = res.get("unexpected_list") or [None] * len(indexes)
        unique_column = config["kwargs"]["column"] if "unique" in config["type"] else None
        for index, value in zip(indexes, values, strict=False):
            shown = repr(value) if len(repr(value)) <= 80 else repr(value)[:77] + "..."
            row = frame.loc[index]
            if unique_column and table == "images":  # name the other copies, not the value
                same = frame[(frame[unique_column] == value) & (frame.index != index)]
                shown = ", ".join(same["path"])
            if table == "images":
                out.append(Problem(str(root / row["path"]), rule, f"{explain}: {shown}"))
            else:
                out.append(
                    Problem(str(root / CAPTIONS_FILE), rule, f"{explain}: {shown}", int(row["row"]))
                )
    return out
