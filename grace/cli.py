"""The ``grace`` command. Each command is a thin shell over one library call in ``grace``.

Errors in user input print one line naming the file/row and the rule broken, and exit with 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from grace.cli_support import parse_params as _params
from grace.cli_support import reports_errors
from grace.errors import GraceError, InvalidInputError

app = typer.Typer(help="GRACE: generative cross-modal retrieval.", no_args_is_help=True)
data_app = typer.Typer(help="Image sets: generate, import, describe.", no_args_is_help=True)
ids_app = typer.Typer(help="Identifiers: assign, extend, remove, show.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(ids_app, name="ids")


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
    from grace.imageset import summarize
    from grace.synth import synthesize

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
    from grace.imageset import summarize
    from grace.importers import import_folder, import_karpathy

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
    from grace.imageset import scan_image_set, summarize, write_manifest

    records = scan_image_set(data)
    if out is not None:
        write_manifest(records, out)
        typer.echo(f"wrote manifest of {len(records)} images to {out}")
    _print_summary(summarize(records))


def _print_summary(summary: dict[str, Any]) -> None:
    for k, v in summary.items():
        typer.echo(f"  {k}: {v}")


RepoOpt = Annotated[Path, typer.Option(help="Git + DVC repository holding the image set.")]
RemoteOpt = Annotated[str | None, typer.Option(help="DVC remote name (default: the default).")]


@data_app.command("add")
@reports_errors
def data_add(
    path: Annotated[Path, typer.Argument(help="Image set folder (images/ + captions.jsonl).")],
    repo: RepoOpt = Path("."),
    message: Annotated[str | None, typer.Option(help="Commit message.")] = None,
) -> None:
    """Add new images and captions to the versioned set data/ (validated, dvc add, git commit)."""
    from grace.versioning import add_images

    typer.echo(f"committed {add_images(repo, path, message=message)}")


@data_app.command("push")
@reports_errors
def data_push(repo: RepoOpt = Path("."), remote: RemoteOpt = None) -> None:
    """Upload the versioned set's data to the DVC remote (credentials from the environment)."""
    from grace.versioning import push

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
    from grace.versioning import pull

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
    from grace.versioning import diff

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
    from grace.versioning import configure_remote

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
) -> None:
    """Check an image set with great-expectations; exit 2 listing every failing row."""
    from grace.atomic_io import write_json, write_text
    from grace.validation import validate_image_set

    result = validate_image_set(data, min_images=min_images)
    if report is not None:
        write_text(report, result.to_html())
    if json_out is not None:
        write_json(json_out, result.to_dict())
    _print_summary(result.summary())
    if not result.success:
        raise InvalidInputError(list(result.problems))


# ---------------------------------------------------------------------------------------------
# grace ids ...
# ---------------------------------------------------------------------------------------------
SchemeOpt = Annotated[str, typer.Option(help="numeric | string | semantic | structured | atomic")]
EmbedderOpt = Annotated[
    str,
    typer.Option(
        help="Image embedder for structured ids: dual-encoder (trained on the set's captions), "
        "dual-encoder:PATH (a saved one) or clip:PATH (a local CLIP)."
    ),
]


@ids_app.command("assign")
@reports_errors
def ids_assign(
    data: Annotated[Path, typer.Option(help="Image set folder or manifest.parquet.")],
    out: Annotated[Path, typer.Option(help="Identifier map to write (JSON).")],
    scheme: SchemeOpt = "numeric",
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

    m = IdentifierMap.load(ids)
    records, root = _load(data)
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

    m = IdentifierMap.load(ids)
    targets = list(keys or [])
    if missing_from is not None:
        present = {r.key for r in _load(missing_from)[0]}
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
    from grace.identifier_index import identifier_stats
    from grace.identifiers import IdentifierMap

    m = IdentifierMap.load(ids)
    records = _load(data)[0] if data is not None else None
    stats = identifier_stats(m, records)
    if as_json:
        typer.echo(json.dumps(stats, indent=2))
        return
    _print_summary(stats)
    for ident, key in m.identifiers()[:limit]:
        typer.echo(f"  {ident!r:40} -> {key[:16]}")


# ---------------------------------------------------------------------------------------------
# grace train | retrieve | describe | evaluate
# ---------------------------------------------------------------------------------------------
@app.command("train")
@reports_errors
def train_cmd(
    data: Annotated[Path, typer.Option(help="Image set folder or manifest.parquet.")],
    ids: Annotated[Path, typer.Option(help="Identifier map (JSON) from `grace ids assign`.")],
    out: Annotated[Path, typer.Option(help="Run folder (resumed when it holds a checkpoint).")],
    backbone: Annotated[
        str | None,
        typer.Option(
            help="'lite' (offline default), 'tiny', a local model folder or a hub id "
            "(default: the config's, else lite)."
        ),
    ] = None,
    epochs: Annotated[int | None, typer.Option(help="Passes over all examples.")] = None,
    max_minutes: Annotated[
        float | None, typer.Option(help="Stop (and save) after this many minutes.")
    ] = None,
    deepspeed: Annotated[
        Path | None, typer.Option(help="DeepSpeed JSON config (ZeRO-2/3), e.g. configs/...")
    ] = None,
    processes: Annotated[
        int | None,
        typer.Option(
            help="Data-parallel processes on this machine, one per GPU (needs --deepspeed)."
        ),
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="JSON file of TrainConfig fields (overridden by flags).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="TrainConfig field KEY=VALUE (repeatable).")
    ] = None,
) -> None:
    """Learn to memorize (image -> id) and to retrieve (query -> id), with pseudo-queries."""
    from grace.configuration_grace import TrainConfig
    from grace.identifiers import IdentifierMap
    from grace.training_grace import train

    fields = json.loads(config.read_text()) if config is not None else {}
    fields.update(_params(set_, "--set"))
    if backbone is not None:
        fields["backbone"] = backbone
    if epochs is not None:
        fields["epochs"] = epochs
    if max_minutes is not None:
        fields["max_seconds"] = 60 * max_minutes
    if deepspeed is not None:
        fields["deepspeed"] = str(deepspeed)
    if processes is not None:
        fields["processes"] = processes
    cfg = TrainConfig.from_dict(fields)
    records, root = _load(data)
    gm = train(records, root, IdentifierMap.load(ids), out, cfg)
    typer.echo(f"trained {gm.info['steps']} steps -> {out / 'model'}")


ModelOpt = Annotated[Path, typer.Option(help="Trained model folder (RUN/model).")]


@app.command("retrieve")
@reports_errors
def retrieve_cmd(
    queries: Annotated[list[str], typer.Argument(help="Text queries.")],
    model: ModelOpt,
    k: Annotated[int, typer.Option(help="Images per query.")] = 5,
    beams: Annotated[int, typer.Option(help="Beam width (>= k).")] = 10,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Text -> images by beam search constrained to the identifier trie."""
    from dataclasses import asdict

    from grace.modeling_grace import GraceModel

    gm = GraceModel.load(model)
    results = gm.retrieve(queries, k=k, num_beams=max(beams, k))
    if as_json:
        typer.echo(json.dumps([[asdict(h) for h in row] for row in results], indent=2))
        return
    for q, row in zip(queries, results, strict=True):
        typer.echo(f"{q}")
        for rank, h in enumerate(row, start=1):
            typer.echo(f"  {rank}. {h.path}  id={h.identifier!r}  score={h.score:.3f}")


@app.command("describe")
@reports_errors
def describe_cmd(
    identifiers: Annotated[list[str], typer.Argument(help="Identifiers of memorized images.")],
    model: ModelOpt,
) -> None:
    """Describe a memorized image given only its identifier."""
    from grace.modeling_grace import GraceModel

    gm = GraceModel.load(model)
    for ident, text in zip(identifiers, gm.describe(identifiers), strict=True):
        typer.echo(f"{ident}: {text}")


@app.command("evaluate")
@reports_errors
def evaluate_cmd(
    model: ModelOpt,
    data: Annotated[Path, typer.Option(help="Image set folder or manifest.parquet.")],
    out: Annotated[Path, typer.Option(help="Folder for metrics.json and report.html.")],
    gallery: Annotated[str, typer.Option(help="'all' memorized images or 'test' only.")] = "all",
    beams: int = 10,
    dense: Annotated[
        str | None,
        typer.Option(
            help="Dense baseline: dual-encoder (trained now), dual-encoder:PATH, clip:PATH."
        ),
    ] = "dual-encoder",
    dense_seconds: Annotated[float, typer.Option(help="Training budget of the baseline.")] = 60.0,
    max_queries: int | None = None,
) -> None:
    """Recall@1/5/10 on held-out queries, memorization accuracy, latency; dense baseline."""
    from grace.evaluation import check_gallery, evaluate, write_report
    from grace.modeling_grace import GraceModel

    check_gallery(gallery)
    gm = GraceModel.load(model)
    records, root = _load(data)
    baseline = _embedder(dense, records, root, dense_seconds) if dense else None
    result = evaluate(
        gm,
        records,
        root,
        gallery=gallery,
        num_beams=beams,
        dense=baseline,
        max_queries=max_queries,
    )
    metrics_path, report = write_report(result, records, root, out)
    _print_summary({k: round(v, 4) for k, v in result.metrics.items()})
    typer.echo(f"wrote {metrics_path} and {report}")


# ---------------------------------------------------------------------------------------------
# grace bench
# ---------------------------------------------------------------------------------------------
@app.command("bench")
@reports_errors
def bench_cmd(
    out: Annotated[Path, typer.Option(help="Folder for query_latency.png and .json.")] = Path(
        "work/bench"
    ),
    sizes: Annotated[str, typer.Option(help="Comma-separated id counts.")] = (
        "1000,10000,100000,1000000"
    ),
    threads: int = 1,
    backbone: Annotated[
        str, typer.Option(help="tiny, or lite (its MiniLM query encoding is timed too).")
    ] = "tiny",
    queries: int = 16,
    batch_size: int = 16,
    beams: int = 10,
    repeats: int = 7,
    reference: Annotated[bool, typer.Option(help="Also time transformers' generate.")] = True,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="Log params, metrics and the plot here."),
    ] = None,
) -> None:
    """Query latency against catalog size: trie beam search against dense retrieval."""
    from grace.atomic_io import write_text
    from grace.query_benchmark import (
        BACKBONES,
        QueryBenchConfig,
        log_to_mlflow,
        markdown_report,
        plot_latency,
        run_query_benchmark,
    )

    try:
        size_list = [int(s) for s in sizes.split(",")]
    except ValueError:
        raise GraceError(f"--sizes {sizes!r}: expected comma-separated integers") from None
    if backbone not in BACKBONES:
        raise GraceError(f"--backbone {backbone!r}: expected one of {', '.join(BACKBONES)}")
    cfg = QueryBenchConfig(
        backbone=backbone,
        sizes=size_list,
        num_beams=beams,
        batch_size=batch_size,
        queries=queries,
        repeats=repeats,
        threads=threads,
        reference=reference,
    )
    result = run_query_benchmark(cfg, log=lambda s: typer.echo(s, err=True))
    out.mkdir(parents=True, exist_ok=True)
    png = plot_latency(result, out / "query_latency.png")
    write_text(out / "query_latency.json", json.dumps(result, indent=1, default=str))
    typer.echo(markdown_report([result]))
    typer.echo(f"wrote {png} and {out / 'query_latency.json'}")
    if mlflow_uri:
        typer.echo(f"logged MLflow run {log_to_mlflow(result, png, mlflow_uri)}")


def _load(path: Path):
    from grace.imageset import load_records

    records = load_records(path)
    root = path if path.is_dir() else path.parent
    return records, root


def _embedder(spec: str, records, root: Path, seconds: float):
    from grace.embedding import make_embedder

    return make_embedder(spec, records, root, max_seconds=seconds)


# The workflow commands live in their own module; registered last, since they use the above.
from grace import cli_workflow  # noqa: E402

app.add_typer(cli_workflow.pipeline_app, name="pipeline")
app.command("search")(cli_workflow.search)
app.command("demo")(cli_workflow.demo)
app.command("watch")(cli_workflow.watch)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
