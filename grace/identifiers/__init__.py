"""Image identifiers: the five kinds of the GRACE paper, and the map that persists them.

Importing the package registers the schemes (``schemes`` and ``structured`` call
:func:`~grace.identifiers.base.register_scheme`).
"""

from grace.identifiers import schemes as _schemes  # noqa: F401  (registers the schemes)
from grace.identifiers import structured as _structured  # noqa: F401
from grace.identifiers.base import SCHEMES, get_scheme, register_scheme
from grace.identifiers.id_map import IdentifierMap, assign_identifiers

SCHEME_NAMES = ("numeric", "string", "semantic", "structured", "atomic")
assert set(SCHEME_NAMES) == set(SCHEMES), "every built-in scheme is listed, in the CLI's order"

__all__ = [
    "SCHEMES",
    "SCHEME_NAMES",
    "IdentifierMap",
    "assign_identifiers",
    "get_scheme",
    "register_scheme",
]
