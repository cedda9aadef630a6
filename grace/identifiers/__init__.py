"""Image identifiers: the five kinds of the GRACE paper, and the map that persists them.

Importing the package registers the built-in schemes, in the paper's order (``schemes`` calls
:func:`~grace.identifiers.base.register_scheme`).
"""

from grace.identifiers import schemes as _schemes  # noqa: F401  (registers the schemes)
from grace.identifiers.base import SCHEMES, get_scheme, register_scheme
from grace.identifiers.id_map import IdentifierMap, assign_identifiers

SCHEME_NAMES = tuple(SCHEMES)

__all__ = [
    "SCHEMES",
    "SCHEME_NAMES",
    "IdentifierMap",
    "assign_identifiers",
    "get_scheme",
    "register_scheme",
]
