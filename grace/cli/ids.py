"""``grace ids ...``: identifier maps (assign, extend, remove, show)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grace.atomic_io import locked
from grace.cli._errors import parse_params as _params
from grace.cli._errors import reports_errors
from grace.cli._shared import EmbedderOpt, SchemeOpt, _embedder, _load, _print_summary
from grace.constants import DEFAULT_ID_SCHEME

ids_app = typer.Typer(help="Identifiers: assign, extend, remove, show.", no_args_is_help=True)


@ids_app.command("assign")
@reports_errors
def ids_assign(
    data: Annotated[Path, typer.Option(help="Image set folder or manifest.parquet.")],
    out: Annotated[Path, typer.Option(help="Identifier map to write (JSON).")],
    scheme: SchemeOpt = DEFAULT_ID_SCHEME,
    param: Annotated[
        list[str] | None, typer.Option(help="Scheme parameter KEY=VALUE (e.g. c=30, tokens=level).")
    ] = None,
    embedder: EmbedderOpt = "dual-encoder",
    embedder_seconds: Annotated[
        float, typer.Option(help="Training budget of a dual-encoder embedder.")
    ] = 60.0,
) -> None:
    """Give every image of a set an identifier of one scheme."""
    from grace.identifiers import assign_identifiers

    records, root = _load(data)
    emb = _embedder(embedder, records, root, embedder_seconds) if scheme == "structured" else None
    m = assign_identifiers(records, scheme, params=_params(param), embedder=emb, root=root)
    m.save(out)
    typer.echo(f"assigned {len(m)} {scheme} identifiers -> {out}")


@ids_app.command("extend")
@reports_errors
def ids_extend(
    ids: Annotated[Path, typer.Option(help="Identifier map to extend (JSON).")],
    data: Annotated[Path, typer.Option(help="Image set; images not in the map are added.")],
    out: Annotated[Path | None, typer.Option(help="Where to write (default: in place).")] = None,
    embedder: EmbedderOpt = "dual-encoder",
    embedder_seconds: float = 60.0,
) -> None:
    """Give new images identifiers; existing identifiers never change."""
    from grace.identifiers import IdentifierMap

    records, root = _load(data)
    # Load, extend and save under one lock: two extends at once must not lose either's ids.
    with locked(ids, wait_message=f"waiting for another writer of {ids}"):
        m = IdentifierMap.load(ids)
        retired = set(m.retired)
        new = [r for r in records if r.key not in m.ids and r.key not in retired]
        emb = (
            _embedder(embedder, records, root, embedder_seconds)
            if m.scheme == "structured" and new
            else None
        )
        m2 = m.extend(new, embedder=emb, root=root)
        m2.save(out or ids)
    typer.echo(f"added {len(new)} identifiers ({len(m2)} live) -> {out or ids}")


@ids_app.command("remove")
@reports_errors
def ids_remove(
    ids: Annotated[Path, typer.Option(help="Identifier map (JSON).")],
    keys: Annotated[list[str] | None, typer.Argument(help="Image keys (sha256) to retire.")] = None,
    missing_from: Annotated[
        Path | None, typer.Option(help="Retire every image no longer in this image set.")
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Where to write (default: in place).")] = None,
) -> None:
    """Retire identifiers: never returned by retrieval again, never reissued."""
    from grace.identifiers import IdentifierMap

    present = {r.key for r in _load(missing_from)[0]} if missing_from is not None else None
    with locked(ids, wait_message=f"waiting for another writer of {ids}"):
        m = IdentifierMap.load(ids)
        targets = list(keys or [])
        if present is not None:
            targets += [k for k in m.ids if k not in present]
        m2 = m.remove(targets)
        m2.save(out or ids)
    typer.echo(f"retired {len(targets)} identifiers ({len(m2)} live) -> {out or ids}")


@ids_app.command("show")
@reports_errors
def ids_show(
    ids: Annotated[Path, typer.Argument(help="Identifier map (JSON).")],
    data: Annotated[
        Path | None, typer.Option(help="Image set, to tokenize ids and size the trie.")
    ] = None,
    limit: Annotated[int, typer.Option(help="Examples to print.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Statistics of an identifier map (and of its trie, given the image set)."""
    from grace.identifiers import IdentifierMap
    from grace.retrieval.index import identifier_stats

    m = IdentifierMap.load(ids)
    records = _load(data)[0] if data is not None else None
    stats = identifier_stats(m, records)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    _print_summary(stats)
    for ident, key in m.identifiers()[:limit]:
        typer.echo(f"  {ident!r:40} -> {key[:16]}")
