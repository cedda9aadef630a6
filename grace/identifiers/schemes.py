"""The identifier kinds of the GRACE paper: numeric, string, semantic, structured and atomic.

A scheme issues identifiers for new images given the map so far; assigning a whole set is
extending an empty map, so the same code guarantees that existing identifiers never change.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np

from grace.identifiers.base import register_scheme
from grace.identifiers.structured import StructuredScheme


class NumberScheme:
    """Numbers 0, 1, 2, ... in a seeded random order.

    ``numeric`` writes one digit per token, ``string`` leaves the number to the tokenizer.
    """

    def __init__(self, name: str, digit_tokens: bool):
        self.name = name
        self.digit_tokens = digit_tokens

    def default_params(self) -> dict[str, Any]:
        return {"shuffle": True, "seed": 0}

    def issue(self, id_map, records, *, embedder=None, captioner=None, root=None):
        start = int(id_map.state.get("next", 0))
        numbers = np.arange(start, start + len(records))
        if id_map.params.get("shuffle", True):
            rng = np.random.default_rng([int(id_map.params.get("seed", 0)), start])
            numbers = rng.permutation(numbers)
        id_map.state["next"] = start + len(records)
        return {r.key: [str(int(n))] for r, n in zip(records, numbers, strict=True)}

    def token_text(self, id_map, identifier: str) -> str:
        return " ".join(identifier) if self.digit_tokens else identifier

    def new_tokens(self, id_map) -> list[str]:
        return []


class AtomicScheme:
    """One new vocabulary token per image: ``<img_N>``. Retired tokens stay in the vocabulary."""

    name = "atomic"

    def default_params(self) -> dict[str, Any]:
        return {}

    def issue(self, id_map, records, *, embedder=None, captioner=None, root=None):
        start = int(id_map.state.get("next", 0))
        id_map.state["next"] = start + len(records)
        return {r.key: [f"<img_{start + i}>"] for i, r in enumerate(records)}

    def token_text(self, id_map, identifier: str) -> str:
        return identifier

    def new_tokens(self, id_map) -> list[str]:
        return [f"<img_{i}>" for i in range(int(id_map.state.get("next", 0)))]


def normalize_caption(text: str) -> str:
    """``text`` with its whitespace runs collapsed to single spaces and its ends trimmed."""
    return " ".join(text.split())


class SemanticScheme:
    """Captions as identifiers; an image may have several, each a valid answer.

    Only captions of images in ``id_splits`` are used (held-out captions are test queries, and
    an identifier equal to the query would leak the answer). A caption shared by two images
    identifies neither. Images left without one get a caption from ``captioner`` when given,
    made unique with a number if needed, or ``image N``.
    """

    name = "semantic"

    def default_params(self) -> dict[str, Any]:
        return {"max_ids_per_image": 5, "id_splits": ["train"]}

    def issue(self, id_map, records, *, embedder=None, captioner=None, root=None):
        taken = id_map.issued()
        allowed = set(id_map.params.get("id_splits", ["train"]))
        limit = int(id_map.params.get("max_ids_per_image", 5))
        per_image = {
            r.key: list(dict.fromkeys(normalize_caption(c) for c in r.captions if c.strip()))
            if r.split in allowed
            else []
            for r in records
        }
        counts = Counter(c for caps in per_image.values() for c in caps)
        out: dict[str, list[str]] = {}
        for r in records:
            ids = [c for c in per_image[r.key] if counts[c] == 1 and c not in taken][:limit]
            out[r.key] = ids
        lacking = [r for r in records if not out[r.key]]
        generated = captioner(lacking) if (captioner and lacking) else [""] * len(lacking)
        counter = int(id_map.state.get("next_fallback", 0))
        used = taken | {i for ids in out.values() for i in ids}
        for r, text in zip(lacking, generated, strict=True):
            base = normalize_caption(text) or "image"
            candidate = base if base != "image" else f"image {counter}"
            while candidate in used:
                counter += 1
                candidate = f"{base} {counter}"
            counter += 1
            used.add(candidate)
            out[r.key] = [candidate]
        id_map.state["next_fallback"] = counter
        return out

    def token_text(self, id_map, identifier: str) -> str:
        return identifier

    def new_tokens(self, id_map) -> list[str]:
        return []


register_scheme(NumberScheme("numeric", digit_tokens=True))
register_scheme(NumberScheme("string", digit_tokens=False))
register_scheme(SemanticScheme())
register_scheme(StructuredScheme())
register_scheme(AtomicScheme())
