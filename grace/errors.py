"""Errors that name the file, the row and the rule broken, so a user can fix bad input."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One broken rule at one place: ``file`` (and ``row``, 1-based, for line-oriented files)."""

    file: str
    rule: str
    detail: str
    row: int | None = None

    def __str__(self) -> str:
        where = f"{self.file}:{self.row}" if self.row is not None else self.file
        return f"{where}: {self.detail} [rule: {self.rule}]"

    def renamed(self, copy: str, shown_as: str) -> Problem:
        """This problem with a file inside folder ``copy`` named under ``shown_as`` instead.

        Args:
            copy: A working copy's folder (e.g. an image set fetched from a DVC revision).
            shown_as: What the user knows that folder as, e.g. ``repo@v3:data``.
        """
        copy = copy.rstrip("/")
        if self.file == copy or self.file.startswith(copy + "/"):
            return dataclasses.replace(self, file=shown_as + self.file[len(copy) :])
        return self


class GraceError(Exception):
    """Base class for errors the CLI reports as one clear line with a non-zero exit code."""


class InvalidInputError(GraceError):
    """Input refused: carries every problem found, so a user can fix them all in one go."""

    def __init__(self, problems: list[Problem]):
        if not problems:
            raise ValueError("InvalidInputError needs at least one problem")
        self.problems = list(problems)
        more = len(self.problems) - 1
        suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
        super().__init__(f"{self.problems[0]}{suffix}")
