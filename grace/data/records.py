"""The unit of an image set: one image, keyed by the sha256 of its bytes (stable across renames)."""

from __future__ import annotations

from dataclasses import dataclass, field

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class ImageRecord:
    """One image of a set; ``path`` is relative to the set root, POSIX form (``images/x.png``)."""

    key: str
    path: str
    width: int
    height: int
    captions: tuple[str, ...] = field(default_factory=tuple)
    split: str = "train"
