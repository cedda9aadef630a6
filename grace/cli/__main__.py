"""``python -m grace.cli``: the ``grace`` command, for launchers that start a module."""

from grace.cli import app

app(prog_name="grace")
