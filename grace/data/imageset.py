"""Image sets on disk: a folder ``images/`` plus ``captions.jsonl``, validated row by row.

Every rule a bad input can break is checked here, once, for every entry point (CLI, importers,
pipeline components): corrupt, truncated, empty, gigantic or non-image files, duplicates, bad
captions, rows pointing outside ``images/`` or at missing files, unknown splits. All problems are
collected and raised together so a user can fix a set in one pass.

``captions.jsonl`` rows: ``{"image": "a/b.png", "caption": "...", "split": "train"}`` with
``image`` relative to ``images/``. ``caption`` may be left out (a row that only sets the split);
images with no row are memorized without queries, in split ``train``.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image, UnidentifiedImageError

from grace.atomic_io import write_with
from grace.data.records import SPLITS, ImageRecord
from grace.errors import InvalidInputError, Problem

IMAGES_DIR = "images"
CAPTIONS_FILE = "captions.jsonl"
IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"})
MANIFEST_COLUMNS = ["key", "path", "width", "height", "captions", "split"]


@dataclass(frozen=True)
class Limits:
    """What an image set may contain. Defaults fit photos; lower them for stricter sets."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_pixels: int = 40_000_000  # a decompression bomb declares far more than it stores
    max_side: int = 20_000
    max_caption_chars: int = 1_000
    max_captions_per_image: int = 100
    max_captions_bytes: int = 1 << 30  # captions.jsonl is read a line at a time, but kept


def scan_image_set(root: str | os.PathLike, limits: Limits = Limits()) -> list[ImageRecord]:
    """Validate the image set at ``root`` and return its records, sorted by path."""
    root = Path(root)
    images_dir = root / IMAGES_DIR
    if not images_dir.is_dir():
        raise InvalidInputError(
            [Problem(str(root), "has-images-folder", f"no {IMAGES_DIR}/ folder in {root}")]
        )
    problems: list[Problem] = []
    found: dict[str, tuple[str, int, int]] = {}  # relative path -> (key, width, height)
    owner_of_key: dict[str, str] = {}
    for path in image_files(images_dir):
        rel = path.relative_to(images_dir).as_posix()
        checked = check_image(path, limits)
        if isinstance(checked, Problem):
            problems.append(checked)
            continue
        key, w, h = checked
        if key in owner_of_key:
            problems.append(
                Problem(
                    str(path),
                    "unique-images",
                    f"same bytes (sha256 {key[:12]}) as {IMAGES_DIR}/{owner_of_key[key]}",
                )
            )
            continue
        owner_of_key[key] = rel
        found[rel] = (key, w, h)

    captions: dict[str, list[str]] = {rel: [] for rel in found}
    splits: dict[str, str] = {}
    cap_path = root / CAPTIONS_FILE
    if cap_path.exists():
        for row, rel, caption, split in _caption_rows(cap_path, images_dir, limits, problems):
            if rel not in found:
                if (images_dir / rel).is_file():
                    continue  # the image itself was refused above; one problem per cause
                problems.append(
                    Problem(str(cap_path), "image-exists", f"{IMAGES_DIR}/{rel} not found", row)
                )
                continue
            if split is not None:
                if splits.setdefault(rel, split) != split:
                    problems.append(
                        Problem(
                            str(cap_path),
                            "one-split-per-image",
                            f"{rel} is in split {splits[rel]!r} and {split!r}",
                            row,
                        )
                    )
            if caption is not None and caption not in captions[rel]:
                captions[rel].append(caption)
                if len(captions[rel]) > limits.max_captions_per_image:
                    problems.append(
                        Problem(
                            str(cap_path),
                            "max-captions-per-image",
                            f"{rel} has more than {limits.max_captions_per_image} captions",
                            row,
                        )
                    )
    if problems:
        raise InvalidInputError(problems)
    return [
        ImageRecord(
            key=key,
            path=f"{IMAGES_DIR}/{rel}",
            width=w,
            height=h,
            captions=tuple(captions[rel]),
            split=splits.get(rel, "train"),
        )
        for rel, (key, w, h) in sorted(found.items())
    ]


def image_files(images_dir: Path) -> list[Path]:
    """Every file under ``images/`` except hidden ones (``.DS_Store``, editor swap files)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(images_dir):  # never follows a linked folder
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        # a linked folder is listed, not walked, so check_image refuses it by name
        out += [Path(dirpath) / d for d in dirnames if (Path(dirpath) / d).is_symlink()]
        out += [Path(dirpath) / f for f in sorted(filenames) if not f.startswith(".")]
    return out


def check_image(path: Path, limits: Limits) -> tuple[str, int, int] | Problem:
    """(sha256, width, height) of a readable image, or the rule it breaks.

    Public so every validator (``grace.data.validation``) applies the same per-file rules.
    """
    if path.is_symlink():
        return Problem(
            str(path),
            "no-symlinks",
            f"a symlink (to {os.readlink(path)}); an image set holds its own files",
        )
    st = path.lstat()
    if not stat.S_ISREG(st.st_mode):
        return Problem(str(path), "regular-files", "not a regular file (a device, pipe or socket)")
    size = st.st_size
    if size == 0:
        return Problem(str(path), "non-empty-image", "empty file (0 bytes)")
    if size > limits.max_file_bytes:
        return Problem(str(path), "max-file-bytes", f"{size} bytes, over {limits.max_file_bytes}")
    data = path.read_bytes()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                fmt, (w, h) = im.format, im.size
                if fmt not in IMAGE_FORMATS:
                    return Problem(
                        str(path),
                        "image-format",
                        f"format {fmt} is not one of " + ", ".join(sorted(IMAGE_FORMATS)),
                    )
                if w < 1 or h < 1:
                    return Problem(str(path), "non-empty-image", f"zero-size image {w}x{h}")
                if w * h > limits.max_pixels or max(w, h) > limits.max_side:
                    return Problem(
                        str(path),
                        "max-pixels",
                        f"{w}x{h} exceeds {limits.max_pixels} pixels or side {limits.max_side} "
                        "(decompression bomb?)",
                    )
                im.load()  # decodes every byte: truncated or corrupt data fails here
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return Problem(str(path), "max-pixels", f"decompression bomb: {e}")
    except UnidentifiedImageError:
        return Problem(str(path), "is-image", "not an image file (unrecognized format)")
    except (OSError, SyntaxError, ValueError) as e:
        return Problem(str(path), "readable-image", f"corrupt or truncated image: {e}")
    return hashlib.sha256(data).hexdigest(), w, h


def _plain_relative(path: str) -> PurePosixPath | None:
    """``path`` as a relative POSIX path, or None if it is absolute or climbs with ``..``."""
    pure = PurePosixPath(path.replace("\\", "/"))
    return None if pure.is_absolute() or ".." in pure.parts else pure


def caption_lines(
    cap_path: Path, images_dir: Path, problems: list[Problem], max_bytes: int
) -> Iterator[tuple[int, dict[str, Any], PurePosixPath]]:
    """Yield ``(row, object, image path inside images/)`` of every well-formed captions.jsonl row.

    Well-formed: UTF-8, a JSON object of known fields, an image path inside ``images/``. Every
    other row becomes a problem naming it. What the fields may hold is the caller's rule. The
    file is streamed, and one over ``max_bytes`` (``Limits.max_captions_bytes``) is refused
    before a row is read.
    """
    f = str(cap_path)
    size = cap_path.stat().st_size
    if size > max_bytes:
        problems.append(
            Problem(f, "max-captions-bytes", f"{size} bytes; at most {max_bytes} (Limits)")
        )
        return
    root_resolved = images_dir.resolve()
    with cap_path.open("rb") as lines:
        for row, raw in enumerate(lines, start=1):
            raw = raw.rstrip(b"\r\n")
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                problems.append(Problem(f, "utf-8", f"not valid UTF-8 (byte {e.start})", row))
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                problems.append(Problem(f, "json-row", f"not a JSON object: {e.msg}", row))
                continue
            if not isinstance(obj, dict):
                problems.append(Problem(f, "json-row", "not a JSON object", row))
                continue
            unknown = set(obj) - {"image", "caption", "split"}
            if unknown:
                detail = f"unknown fields {sorted(unknown)}"
                problems.append(Problem(f, "known-fields", detail, row))
                continue
            image = obj.get("image")
            if not isinstance(image, str) or not image:
                problems.append(Problem(f, "has-image", '"image" must be a non-empty string', row))
                continue
            pure = _plain_relative(image)
            if pure is None or not (images_dir / pure).resolve().is_relative_to(root_resolved):
                problems.append(
                    Problem(f, "inside-images", f"{image!r} points outside {IMAGES_DIR}/", row)
                )
                continue
            yield row, obj, pure


def _caption_rows(
    cap_path: Path, images_dir: Path, limits: Limits, problems: list[Problem]
) -> Iterable[tuple[int, str, str | None, str | None]]:
    """Yield (row, image path relative to images/, caption, split) of every valid row."""
    f = str(cap_path)
    for row, obj, pure in caption_lines(cap_path, images_dir, problems, limits.max_captions_bytes):
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            problems.append(
                Problem(f, "known-split", f"split {split!r} is not one of {list(SPLITS)}", row)
            )
            continue
        caption = obj.get("caption")
        if caption is not None:
            bad = _caption_problem(caption, limits)
            if bad:
                problems.append(Problem(f, bad[0], bad[1], row))
                continue
            caption = " ".join(caption.split())
        yield row, pure.as_posix(), caption, split


def _caption_problem(caption: Any, limits: Limits) -> tuple[str, str] | None:
    if not isinstance(caption, str):
        return "caption-text", '"caption" must be a string'
    if not caption.strip():
        return "non-empty-caption", "empty caption"
    if len(caption) > limits.max_caption_chars:
        return (
            "max-caption-chars",
            f"caption of {len(caption)} characters, over {limits.max_caption_chars}",
        )
    if any(ord(c) < 32 and c not in "\t\n\r" for c in caption):
        return "caption-text", "caption contains control characters"
    return None


# ---- manifest ----------------------------------------------------------------------------
def manifest_frame(records: Sequence[ImageRecord]) -> pd.DataFrame:
    """The records as a manifest table: one row per image, the columns of ``MANIFEST_COLUMNS``."""
    return pd.DataFrame(
        {
            "key": [r.key for r in records],
            "path": [r.path for r in records],
            "width": np.array([r.width for r in records], dtype=np.int32),
            "height": np.array([r.height for r in records], dtype=np.int32),
            "captions": [list(r.captions) for r in records],
            "split": [r.split for r in records],
        },
        columns=MANIFEST_COLUMNS,
    )


def write_manifest(records: Sequence[ImageRecord], path: str | os.PathLike) -> Path:
    """Write the manifest as Parquet, atomically."""
    frame = manifest_frame(records)
    write_with(path, lambda tmp: frame.to_parquet(tmp, index=False), suffix=".parquet")
    return Path(path)


def read_manifest(path: str | os.PathLike) -> list[ImageRecord]:
    """Records from a manifest written by ``write_manifest``; paths stay relative to its folder."""
    path = Path(path)
    try:
        frame = pd.read_parquet(path)
    except Exception as e:  # pyarrow raises several unrelated types for a bad file
        raise InvalidInputError([Problem(str(path), "parquet", f"unreadable manifest: {e}")]) from e
    missing = [c for c in MANIFEST_COLUMNS if c not in frame.columns]
    if missing:
        raise InvalidInputError(
            [Problem(str(path), "manifest-columns", f"missing columns {missing}")]
        )
    problems = []
    records = []
    for n, row in enumerate(frame.itertuples(index=False), start=1):
        where = _plain_relative(str(row.path))
        if where is None or where.parts[:1] != (IMAGES_DIR,):
            problems.append(
                Problem(
                    str(path), "inside-images", f"{row.path!r} is not a path in {IMAGES_DIR}/", n
                )
            )
            continue
        if row.split not in SPLITS:
            problems.append(Problem(str(path), "known-split", f"split {row.split!r}", n))
            continue
        records.append(
            ImageRecord(
                key=str(row.key),
                path=str(row.path),
                width=int(row.width),
                height=int(row.height),
                captions=tuple(str(c) for c in row.captions),
                split=str(row.split),
            )
        )
    if problems:
        raise InvalidInputError(problems)
    return records


def load_records(path: str | os.PathLike) -> list[ImageRecord]:
    """Records of an image set folder (validated) or of a manifest ``.parquet``."""
    path = Path(path)
    if path.is_dir():
        return scan_image_set(path)
    if path.suffix == ".parquet" and path.is_file():
        return read_manifest(path)
    raise FileNotFoundError(f"{path}: neither an image set folder nor a manifest .parquet")


def summarize(records: Sequence[ImageRecord]) -> dict[str, Any]:
    """A few numbers a user checks at a glance before training on a set."""
    splits = Counter(r.split for r in records)
    n_caps = [len(r.captions) for r in records]
    words = [len(c.split()) for r in records for c in r.captions]
    sizes = Counter(f"{r.width}x{r.height}" for r in records)
    return {
        "images": len(records),
        "splits": {s: splits[s] for s in SPLITS if splits[s]},
        "captions": sum(n_caps),
        "images_without_captions": sum(1 for n in n_caps if n == 0),
        "caption_words_mean": round(float(np.mean(words)), 1) if words else 0.0,
        "image_sizes": dict(sizes.most_common(3)),
    }


# ---- writing a set -----------------------------------------------------------------------
def write_caption_rows(rows: Iterable[dict[str, Any]], path: Path) -> None:
    """Write captions.jsonl rows (UTF-8, one compact JSON object per line, stable bytes)."""
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, separators=(", ", ": ")) + "\n")
