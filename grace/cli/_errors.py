"""What every ``grace`` command shares: bad input becomes clear lines and exit code 2."""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any

import typer

from grace.errors import GraceError, InvalidInputError

MAX_LISTED_PROBLEMS = 20


def reports_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn library errors about bad input into clear lines on stderr and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except InvalidInputError as e:
            for p in e.problems[:MAX_LISTED_PROBLEMS]:
                typer.echo(f"error: {p}", err=True)
            if len(e.problems) > MAX_LISTED_PROBLEMS:
                typer.echo(f"error: ... and {len(e.problems) - MAX_LISTED_PROBLEMS} more", err=True)
            raise typer.Exit(2) from None
        except (GraceError, FileNotFoundError, KeyError, ValueError) as e:
            msg = e.args[0] if isinstance(e, KeyError) and e.args else e
            typer.echo(f"error: {msg}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def parse_params(items: list[str] | None, flag: str = "--param") -> dict[str, Any]:
    """``KEY=VALUE`` options as a dict; values are JSON where they parse (numbers, lists...)."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise GraceError(f"{flag} {item!r}: expected KEY=VALUE")
        k, v = item.split("=", 1)
        try:
            out[k] = json.loads(v)
        except json.JSONDecodeError:
            out[k] = v
    return out
