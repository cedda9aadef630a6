"""Image identifiers: the five kinds of the GRACE paper, and the map that persists them."""

from grace.identifiers.identifier_map import IdentifierMap, assign_identifiers
from grace.identifiers.schemes import SCHEME_NAMES, get_scheme

__all__ = ["SCHEME_NAMES", "IdentifierMap", "assign_identifiers", "get_scheme"]
