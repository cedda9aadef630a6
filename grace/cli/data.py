"""``grace data ...``: image sets (generate, import, version, validate)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grace.cli._errors import reports_errors
from grace.cli._shared import RemoteOpt, RepoOpt, _print_summary
from grace.errors import GraceError, InvalidInputError

data_app = typer.Typer(help="Image sets: generate, import, describe.", no_args_is_help=True)


# ---------------------------------------------------------------------------------------------
# grace data ...
# ---------------------------------------------------------------------------------------------
@data_app.command("synth")
@reports_errors
def data_synth(
    out: Annotated[Path, typer.Option(help="Folder to write the image set to.")] = Path("data"),
    n: Annotated[int, typer.Option(help="Number of images.")] = 1000,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    size: Annotated[int, typer.Option(help="Image side in pixels.")] = 64,
    test_fraction: Annotated[float, typer.Option(help="Share of images held out.")] = 0.2,
) -> None:
    """Generate the demo image set: coloured shapes with compositional captions."""
    from grace.data.imageset import summarize
    from grace.data.synth import synthesize

    records = synthesize(out, n=n, seed=seed, size=size, test_fraction=test_fraction)
    typer.echo(f"wrote {len(records)} images to {out}")
    _print_summary(summarize(records))


@data_app.command("import")
@reports_errors
def data_import(
    source: Annotated[
        Path, typer.Argument(help="Karpathy-split JSON file, or a folder of images.")
    ],
    out: Annotated[Path, typer.Option(help="Folder to write the image set to.")],
    images: Annotated[
        Path | None, typer.Option(help="Image root for a Karpathy JSON (Flickr30K/COCO).")
    ] = None,
) -> None:
    """Import Flickr30K/COCO (Karpathy JSON + image root) or a plain folder of images."""
    from grace.data.imageset import summarize
    from grace.data.importers import import_folder, import_karpathy

    if source.is_file():
        if images is None:
            raise GraceError(f"{source}: a Karpathy JSON needs --images IMAGE_ROOT")
        records = import_karpathy(source, images, out)
    elif source.is_dir():
        records = import_folder(source, out)
    else:
        raise FileNotFoundError(f"{source}: no such file or folder")
    typer.echo(f"imported {len(records)} images into {out}")
    _print_summary(summarize(records))


@data_app.command("manifest")
@reports_errors
def data_manifest(
    data: Annotated[Path, typer.Argument(help="Image set folder.")] = Path("data"),
    out: Annotated[Path | None, typer.Option(help="Write the manifest (Parquet) here.")] = None,
) -> None:
    """Validate an image set and derive its manifest (key, path, size, captions, split)."""
    from grace.data.imageset import scan_image_set, summarize, write_manifest

    records = scan_image_set(data)
    if out is not None:
        write_manifest(records, out)
        typer.echo(f"wrote manifest of {len(records)} images to {out}")
    _print_summary(summarize(records))


@data_app.command("add")
@reports_errors
def data_add(
    path: Annotated[Path, typer.Argument(help="Image set folder (images/ + captions.jsonl).")],
    repo: RepoOpt = Path("."),
    message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
) -> None:
    """Add new images and captions to the versioned set data/ (validated, dvc add, git commit)."""
    from grace.data.versioning import add_images

    typer.echo(f"committed {add_images(repo, path, message=message)}")


@data_app.command("push")
@reports_errors
def data_push(repo: RepoOpt = Path("."), remote: RemoteOpt = None) -> None:
    """Upload the versioned set's data to the DVC remote (credentials from the environment)."""
    from grace.data.versioning import push

    typer.echo(f"pushed {push(repo, remote=remote)} files")


@data_app.command("pull")
@reports_errors
def data_pull(
    repo: RepoOpt = Path("."),
    rev: Annotated[
        str | None,
        typer.Option(help="Only fetch this revision's data into the cache; work tree unchanged."),
    ] = None,
    remote: RemoteOpt = None,
) -> None:
    """Download the versioned set's data from the DVC remote."""
    from grace.data.versioning import pull

    typer.echo(f"fetched {pull(repo, rev=rev, remote=remote)} files")


@data_app.command("diff")
@reports_errors
def data_diff(
    a: Annotated[str, typer.Argument(help="Old git revision.")],
    b: Annotated[str, typer.Argument(help="New git revision.")],
    repo: RepoOpt = Path("."),
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Images added, removed and modified between two revisions, by content key (sha256)."""
    from grace.data.versioning import diff

    d = diff(repo, a, b)
    if as_json:
        typer.echo(json.dumps(d.to_dict(), indent=2))
        return
    typer.echo(f"added {len(d.added)}, removed {len(d.removed)}, modified {len(d.modified)}")
    for key in d.added:
        typer.echo(f"  + {key}")
    for key in d.removed:
        typer.echo(f"  - {key}")
    for m in d.modified:
        typer.echo(f"  ~ {m.path} ({', '.join(m.changes)})")


@data_app.command("remote")
@reports_errors
def data_remote(
    url: Annotated[str, typer.Argument(help="s3://bucket/prefix or a local folder.")],
    repo: RepoOpt = Path("."),
    endpoint_url: Annotated[
        str | None, typer.Option(help="S3-compatible endpoint (MinIO, ...).")
    ] = None,
    name: Annotated[str, typer.Option(help="Remote name.")] = "storage",
) -> None:
    """Set the default DVC remote and commit .dvc/config; credentials stay in the environment."""
    from grace.data.versioning import configure_remote

    rev = configure_remote(repo, url, name=name, endpoint_url=endpoint_url)
    typer.echo(f"remote {name} -> {url} (commit {rev})")


@data_app.command("validate")
@reports_errors
def data_validate(
    data: Annotated[Path, typer.Argument(help="Image set folder.")] = Path("data"),
    report: Annotated[Path | None, typer.Option(help="Write an HTML report here.")] = None,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Write the result (with GX's) as JSON here.")
    ] = None,
    min_images: Annotated[int, typer.Option(help="Fewest images the set may have.")] = 1,
    memorize_only: Annotated[
        bool, typer.Option(help="Accept a set without captions (nothing to retrieve with).")
    ] = False,
) -> None:
    """Check an image set with great-expectations; exit 2 listing every failing row."""
    from grace.atomic_io import write_json, write_text
    from grace.data.validation import validate_image_set

    result = validate_image_set(data, min_images=min_images, min_captions=0 if memorize_only else 1)
    if report is not None:
        write_text(report, result.to_html())
    if json_out is not None:
        write_json(json_out, result.to_dict())
    _print_summary(result.summary())
    if not result.success:
        raise InvalidInputError(list(result.problems))
