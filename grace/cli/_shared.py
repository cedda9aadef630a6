"""What the ``grace`` sub-commands share: the app, common options, loading helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(help="GRACE: generative cross-modal retrieval.", no_args_is_help=True)

SchemeOpt = Annotated[str, typer.Option(help="numeric | string | semantic | structured | atomic")]


EmbedderOpt = Annotated[
    str,
    typer.Option(
        help="Image embedder for structured ids: dual-encoder (trained on the set's captions), "
        "dual-encoder:PATH (a saved one) or clip:PATH (a local CLIP)."
    ),
]


def _print_summary(summary: dict[str, Any]) -> None:
    for k, v in summary.items():
        typer.echo(f"  {k}: {v}")


RepoOpt = Annotated[Path, typer.Option(help="Git + DVC repository holding the image set.")]


RemoteOpt = Annotated[str | None, typer.Option(help="DVC remote name (default: the default).")]


def _load(path: Path):
    from grace.data.imageset import load_records

    records = load_records(path)
    root = path if path.is_dir() else path.parent
    return records, root


def _embedder(spec: str, records, root: Path, seconds: float):
    from grace.models.embedders import make_embedder

    return make_embedder(spec, records, root, max_seconds=seconds)
