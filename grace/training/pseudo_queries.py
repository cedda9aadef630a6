"""Pseudo-queries: text queries for images that have none, so learning to retrieve reaches them.

An image without train captions (a held-out image, an image that came without text) is only
ever memorized from its pixels; no query was ever trained to lead to its identifier, and
queries about it find it only as far as the model's query and image paths happen to agree.
Giving it queries of its own closes most of that gap (docs/experiments.md#pseudo-queries). Two
sources:

- ``caption``: the model's own captions of the image (the paper's way). Any backbone, but only
  as good as its captioning, which the caption task must have trained first.
- ``nearest``: the set's train captions that the model's own query-image alignment puts next
  to the image, ``per_image`` of them. For backbones that align queries with images (the
  ``lite`` backbone's ``align_queries``/``align_images``); it needs no captioning ability, so
  it works on a small model whose captions are still poor.

``auto`` is ``nearest`` where the backbone aligns, otherwise none.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.models.prompts import Prompts, retrieve_turn
from grace.training.config import PSEUDO_QUERY_SOURCES
from grace.training.examples import ImageInputs, TextInputs


def aligns(model: torch.nn.Module) -> bool:
    """Whether ``model`` embeds queries and images in one space (and trains it)."""
    return (
        hasattr(model, "align_queries")
        and hasattr(model, "align_images")
        and getattr(model.config, "alignment_weight", 0) > 0
    )


def resolve_source(source: str, model: torch.nn.Module) -> str:
    """The source a run uses: ``auto`` made concrete, ``nearest`` refused where it cannot work."""
    if source not in PSEUDO_QUERY_SOURCES:
        raise GraceError(f"pseudo_queries must be one of {PSEUDO_QUERY_SOURCES}, got {source!r}")
    if source == "auto":
        return "nearest" if aligns(model) else "off"
    if source == "nearest" and not aligns(model):
        raise GraceError(
            "pseudo_queries='nearest' needs a backbone that aligns queries with images (the "
            f"lite backbone); {type(model).__name__} does not: use 'caption' or 'off'"
        )
    return source


@torch.no_grad()
def nearest_captions(
    model: torch.nn.Module,
    processor,
    live: Sequence[ImageRecord],
    needy: Sequence[ImageRecord],
    images: ImageInputs,
    texts: TextInputs,
    prompts: Prompts,
    per_image: int,
    chunk: int = 256,
) -> dict[str, list[str]]:
    """For each image in ``needy``, the train captions the model aligns closest to it.

    These are the ``per_image`` train captions of ``live`` whose retrieve prompts lie nearest
    the image in the alignment space, best first.
    """
    captions = list(dict.fromkeys(c for r in live if r.split == "train" for c in r.captions))
    if not captions or not needy:
        return {}
    asked = [retrieve_turn(processor, prompts, c) for c in captions]
    texts.encode(asked)
    queries = model.align_queries(**texts.batch([texts[p] for p in asked]))
    position = {r.key: i for i, r in enumerate(images.records)}
    k = min(per_image, len(captions))
    out: dict[str, list[str]] = {}
    for start in range(0, len(needy), chunk):  # bounded memory: chunk x captions scores
        part = needy[start : start + chunk]
        pictures = model.align_images(**images.batch([position[r.key] for r in part]))
        top = (pictures @ queries.T).topk(k, dim=1).indices
        for r, row in zip(part, top.tolist(), strict=True):
            out[r.key] = [captions[j] for j in row]
    return out


def model_captions(
    gm, needy: Sequence[ImageRecord], images: ImageInputs, per_image: int
) -> dict[str, list[str]]:
    """For each image in ``needy``, ``per_image`` of the model's own captions of it."""
    pics = [images.load(r) for r in needy]
    out: dict[str, list[str]] = {}
    for _ in range(per_image):
        for r, text in zip(needy, gm.caption(pics), strict=True):
            if text:
                out.setdefault(r.key, []).append(text)
    return out
