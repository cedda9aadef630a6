"""IdentifierMap: which identifier(s) each image has, persisted with its scheme and parameters.

Invariants, checked on every change: an identifier belongs to exactly one image; an image keeps
its identifiers forever (``extend`` only adds); a retired identifier is never issued again.
"""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from grace.atomic_io import write_json
from grace.data.records import ImageRecord
from grace.errors import InvalidInputError, Problem

if TYPE_CHECKING:
    from grace.identifiers.base import Captioner, ImageEmbedder

FORMAT_VERSION = 1


@dataclass
class IdentifierMap:
    """Identifiers of one image set under one scheme.

    ``ids`` maps an image key to its identifiers (the first is canonical; the semantic scheme may
    give several, each a valid answer). ``retired`` keeps the identifiers of removed images so they
    are never reused. ``state`` is the scheme's own (counters, the k-means tree).
    """

    scheme: str
    params: dict[str, Any] = field(default_factory=dict)
    ids: dict[str, list[str]] = field(default_factory=dict)
    retired: dict[str, list[str]] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)

    # ---- lookups -------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self.ids

    def identifiers(self) -> list[tuple[str, str]]:
        """All live (identifier, key) pairs, canonical first for each image, in insertion order."""
        return [(i, k) for k, ids in self.ids.items() for i in ids]

    def key_of(self, identifier: str) -> str:
        for k, ids in self.ids.items():
            if identifier in ids:
                return k
        raise KeyError(f"unknown identifier {identifier!r}")

    def lookup(self) -> dict[str, str]:
        """Map every live identifier to its image key (build once, query many times)."""
        return {i: k for i, k in self.identifiers()}

    def token_text(self, identifier: str) -> str:
        """The text a tokenizer sees for ``identifier``.

        Numeric ids: one digit per token; structured ids: a token per level or per tree node.
        """
        from grace.identifiers.base import get_scheme

        return get_scheme(self.scheme).token_text(self, identifier)

    def new_tokens(self) -> list[str]:
        """Whole-identifier tokens the tokenizer must gain (structured levels, atomic ids)."""
        from grace.identifiers.base import get_scheme

        return get_scheme(self.scheme).new_tokens(self)

    def issued(self) -> set[str]:
        """Every identifier ever issued, live or retired."""
        out = {i for ids in self.ids.values() for i in ids}
        out.update(i for ids in self.retired.values() for i in ids)
        return out

    # ---- changes (each returns a new map; the original is left as it was) -----------------
    def extend(
        self,
        records: Sequence[ImageRecord],
        *,
        embedder: ImageEmbedder | None = None,
        captioner: Captioner | None = None,
        root: str | os.PathLike | None = None,
    ) -> IdentifierMap:
        """Give ``records`` identifiers without changing any existing one."""
        from grace.identifiers.base import get_scheme

        dupes = [r for r in records if r.key in self.ids]
        if dupes:
            raise InvalidInputError(
                [
                    Problem(r.path, "image-already-identified", f"image {r.key[:12]} has an id")
                    for r in dupes
                ]
            )
        seen: set[str] = set()
        for r in records:
            if r.key in seen:
                raise InvalidInputError(
                    [Problem(r.path, "unique-image", f"image {r.key[:12]} given twice")]
                )
            seen.add(r.key)
        new = copy.deepcopy(self)
        issued = get_scheme(self.scheme).issue(
            new, list(records), embedder=embedder, captioner=captioner, root=root
        )
        taken = self.issued()
        for key, ids in issued.items():
            clash = [i for i in ids if i in taken]
            if clash or not ids:
                raise AssertionError(f"scheme {self.scheme} issued a used id {clash} for {key}")
            taken.update(ids)
            new.ids[key] = list(ids)
        new.validate()
        return new

    def remove(self, keys: Iterable[str]) -> IdentifierMap:
        """Retire the identifiers of ``keys``: never returned again, never reissued."""
        keys = list(dict.fromkeys(keys))
        missing = [k for k in keys if k not in self.ids]
        if missing:
            raise KeyError(f"not in the identifier map: {', '.join(m[:12] for m in missing)}")
        new = copy.deepcopy(self)
        for k in keys:
            new.retired[k] = new.retired.get(k, []) + new.ids.pop(k)
        return new

    def validate(self) -> None:
        """Raise if an identifier is shared or a live one was retired (a corrupted map)."""
        owner: dict[str, str] = {}
        for k, ids in self.ids.items():
            if not ids:
                raise ValueError(f"image {k} has no identifier")
            for i in ids:
                if i in owner:
                    raise ValueError(f"identifier {i!r} shared by {owner[i]} and {k}")
                owner[i] = k
        retired = {i for ids in self.retired.values() for i in ids}
        reused = retired & owner.keys()
        if reused:
            raise ValueError(f"retired identifiers reissued: {sorted(reused)[:5]}")

    # ---- persistence ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "scheme": self.scheme,
            "params": self.params,
            "ids": self.ids,
            "retired": self.retired,
            "state": self.state,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IdentifierMap:
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"unsupported identifier map format {d.get('format_version')!r}")
        m = cls(d["scheme"], d["params"], d["ids"], d["retired"], d["state"])
        m.validate()
        return m

    def save(self, path: str | os.PathLike) -> None:
        write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike) -> IdentifierMap:
        try:
            with open(path, encoding="utf-8") as f:
                d = json.load(f)
        except json.JSONDecodeError as e:
            raise InvalidInputError([Problem(str(path), "identifier-map-json", str(e))]) from e
        try:
            return cls.from_dict(d)
        except (KeyError, ValueError) as e:
            raise InvalidInputError([Problem(str(path), "identifier-map", str(e))]) from e


def assign_identifiers(
    records: Sequence[ImageRecord],
    scheme: str,
    *,
    params: dict[str, Any] | None = None,
    embedder: ImageEmbedder | None = None,
    captioner: Captioner | None = None,
    root: str | os.PathLike | None = None,
) -> IdentifierMap:
    """Identifiers for a whole image set: an empty map of ``scheme`` extended by every record."""
    from grace.identifiers.base import get_scheme

    impl = get_scheme(scheme)
    defaults = impl.default_params()
    unknown = sorted(set(params or {}) - set(defaults))
    if unknown:
        raise ValueError(
            f"unknown parameter(s) {unknown} for scheme {scheme!r}; known: {sorted(defaults)}"
        )
    empty = IdentifierMap(scheme=scheme, params=defaults | (params or {}))
    return empty.extend(records, embedder=embedder, captioner=captioner, root=root)
