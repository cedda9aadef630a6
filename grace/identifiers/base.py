"""What every identifier scheme is, and the registry that names them.

Schemes see the map through the small :class:`IdentifierState` protocol, so this module and the
schemes never import the map's class (``id_map`` imports the registry instead).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np

from grace.data.records import ImageRecord


class IdentifierState(Protocol):
    """The part of an identifier map a scheme reads and updates."""

    params: dict[str, Any]
    state: dict[str, Any]
    issued: set[str]


@runtime_checkable
class ImageEmbedder(Protocol):
    """Images and texts into one space: float32 ``(n, d)`` rows of unit L2 norm."""

    def embed_images(self, paths: list[Path]) -> np.ndarray: ...

    def embed_texts(self, texts: list[str]) -> np.ndarray: ...


Captioner = Callable[[Sequence[ImageRecord]], list[str]]
"""Describes images in words; the semantic scheme uses it for images whose captions are held out."""


class Scheme(Protocol):
    """An identifier scheme: issues identifiers for new images and says how they are tokenized.

    ``name`` is the name it is registered under; ``default_params`` the parameters a new map
    gets; ``token_text`` the text a tokenizer sees for an identifier; ``new_tokens`` the
    whole-identifier tokens the tokenizer must gain.
    """

    name: str

    def default_params(self) -> dict[str, Any]: ...

    def issue(
        self,
        id_map: IdentifierState,
        records: list[ImageRecord],
        *,
        embedder: ImageEmbedder | None,
        captioner: Captioner | None,
        root: str | os.PathLike | None,
    ) -> dict[str, list[str]]:
        """Identifiers for ``records`` (updating ``id_map.state``), none of them issued before."""
        ...

    def token_text(self, id_map: IdentifierState, identifier: str) -> str: ...

    def new_tokens(self, id_map: IdentifierState) -> list[str]: ...


SCHEMES: dict[str, Scheme] = {}
"""Every registered scheme by name, in registration order."""


def register_scheme(scheme: Scheme) -> Scheme:
    """Add ``scheme`` to :data:`SCHEMES` under its ``name``.

    Args:
        scheme: The scheme instance; its ``name`` must not be registered yet.

    Returns:
        The scheme, so a module can register and keep it in one line.
    """
    if scheme.name in SCHEMES:
        raise ValueError(f"identifier scheme {scheme.name!r} is registered twice")
    SCHEMES[scheme.name] = scheme
    return scheme


def get_scheme(name: str) -> Scheme:
    """The registered scheme called ``name``.

    Args:
        name: A scheme name, e.g. ``"structured"``.

    Raises:
        ValueError: No scheme of that name is registered.
    """
    try:
        return SCHEMES[name]
    except KeyError:
        raise ValueError(
            f"unknown identifier scheme {name!r}; choose one of {tuple(SCHEMES)}"
        ) from None
