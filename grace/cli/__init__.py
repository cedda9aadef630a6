"""The ``grace`` command. Each command is a thin shell over one library call in ``grace``.

Errors in user input print one line naming the file/row and the rule broken, and exit with 2.
This is the only package that may import the KFP code (``grace_kfp``), through ``workflow``.
"""

from __future__ import annotations

import sys

from grace.cli import model as _model  # noqa: F401  (registers train, retrieve, ...)
from grace.cli import workflow as cli_workflow
from grace.cli._shared import app
from grace.cli.data import data_app
from grace.cli.ids import ids_app

app.add_typer(data_app, name="data")
app.add_typer(ids_app, name="ids")
app.add_typer(cli_workflow.pipeline_app, name="pipeline")
app.command("search")(cli_workflow.search)
app.command("demo")(cli_workflow.demo)
app.command("watch")(cli_workflow.watch)

__all__ = ["app", "main"]


def main() -> None:  # pragma: no cover - console entry point
    """Run the ``grace`` command (the console script's entry point)."""
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
