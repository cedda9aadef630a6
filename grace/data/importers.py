"""Bring outside datasets into the image-set format (``images/`` + ``captions.jsonl``).

Images are hard-linked when the file system allows (COCO is 20 GB) and copied otherwise. The
new set is built in a temporary folder, validated with the same rules as any set, and only then
moved into place, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import replace
from pathlib import Path, PurePosixPath
from typing import Any

from grace.atomic_io import atomic_dir
from grace.data.imageset import CAPTIONS_FILE, IMAGES_DIR, scan_image_set, write_caption_rows
from grace.data.records import ImageRecord
from grace.errors import InvalidInputError, Problem

KARPATHY_SPLITS = {"train": "train", "restval": "train", "val": "val", "test": "test"}


def import_karpathy(
    split_json: str | os.PathLike, image_root: str | os.PathLike, out: str | os.PathLike
) -> list[ImageRecord]:
    """Import Flickr30K/COCO from the Karpathy-split JSON and the folder its images live in.

    Reads ``images[].{filename, filepath?, split, sentences[].raw}``; ``restval`` counts as train.
    """
    split_json, image_root = Path(split_json), Path(image_root)
    f = str(split_json)
    try:
        doc = json.loads(split_json.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidInputError([Problem(f, "karpathy-json", f"not a JSON file: {e}")]) from e
    entries = doc.get("images") if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise InvalidInputError([Problem(f, "karpathy-json", 'no "images" list at the top')])

    problems: list[Problem] = []
    plan: list[tuple[Path, str, str, list[str]]] = []  # (source, relative dest, split, captions)
    for n, entry in enumerate(entries, start=1):
        parsed = _karpathy_entry(entry)
        if isinstance(parsed, str):
            problems.append(Problem(f, "karpathy-entry", f"images[{n - 1}]: {parsed}", n))
            continue
        rel, split, caps = parsed
        source = image_root / rel
        if not source.is_file():
            problems.append(Problem(f, "image-exists", f"images[{n - 1}]: {source} not found", n))
            continue
        plan.append((source, rel, split, caps))
    if problems:
        raise InvalidInputError(problems)

    with atomic_dir(out) as tmp:
        rows: list[dict[str, Any]] = []
        for source, rel, split, caps in plan:
            _link_or_copy(source, tmp / IMAGES_DIR / rel)
            rows += [{"image": rel, "caption": c, "split": split} for c in caps]
            if not caps:
                rows.append({"image": rel, "split": split})
        write_caption_rows(rows, tmp / CAPTIONS_FILE)
        records = _scan_naming_sources(tmp, image_root)
    return records


def _karpathy_entry(entry: Any) -> tuple[str, str, list[str]] | str:
    """(relative path, split, captions) of one entry, or what is wrong with it."""
    if not isinstance(entry, dict):
        return "not an object"
    filename, filepath = entry.get("filename"), entry.get("filepath", "")
    if not isinstance(filename, str) or not filename:
        return '"filename" missing'
    if not isinstance(filepath, str):
        return '"filepath" must be a string'
    rel = PurePosixPath(filepath) / filename
    if rel.is_absolute() or ".." in rel.parts:
        return f"{rel} points outside the image root"
    split = KARPATHY_SPLITS.get(entry.get("split", ""))
    if split is None:
        return f"split {entry.get('split')!r} is not one of {sorted(KARPATHY_SPLITS)}"
    sentences = entry.get("sentences", [])
    if not isinstance(sentences, list):
        return '"sentences" must be a list'
    caps = []
    for s in sentences:
        raw = s.get("raw") if isinstance(s, dict) else None
        if not isinstance(raw, str):
            return 'every sentence needs a "raw" string'
        if raw.strip():
            caps.append(" ".join(raw.split()))
    return rel.as_posix(), split, caps


def import_folder(source: str | os.PathLike, out: str | os.PathLike) -> list[ImageRecord]:
    """Import a plain folder of images (recursively), without captions.

    A ``name.txt`` beside ``name.jpg`` is read as its captions, one per line (a common layout of
    fine-tuning sets); every other file must be an image.
    """
    source = Path(source)
    if not source.is_dir():
        raise FileNotFoundError(f"{source}: not a folder")
    files = sorted(
        p
        for p in source.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(source).parts)
    )
    images = [p for p in files if p.suffix.lower() != ".txt"]
    if not images:
        raise InvalidInputError([Problem(str(source), "has-images", "no image files found")])
    with atomic_dir(out) as tmp:
        rows: list[dict[str, Any]] = []
        for p in images:
            rel = p.relative_to(source).as_posix()
            _link_or_copy(p, tmp / IMAGES_DIR / rel)
            sidecar = p.with_suffix(".txt")
            if sidecar.is_file():
                try:
                    lines = sidecar.read_text(encoding="utf-8").splitlines()
                except UnicodeDecodeError as e:
                    raise InvalidInputError(
                        [Problem(str(sidecar), "utf-8", f"not valid UTF-8 (byte {e.start})")]
                    ) from e
                rows += [{"image": rel, "caption": c} for c in lines if c.strip()]
        write_caption_rows(rows, tmp / CAPTIONS_FILE)
        records = _scan_naming_sources(tmp, source)
    return records


def _scan_naming_sources(tmp: Path, source_root: Path) -> list[ImageRecord]:
    """Validate the new set; a refused image is named by its source path, not the temp copy."""
    try:
        return scan_image_set(tmp)
    except InvalidInputError as e:
        prefix = str(tmp / IMAGES_DIR) + os.sep
        problems = [
            replace(p, file=str(source_root / p.file[len(prefix) :]))
            if p.file.startswith(prefix)
            else p
            for p in e.problems
        ]
        raise InvalidInputError(problems) from None


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
