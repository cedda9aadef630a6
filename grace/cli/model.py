"""``grace train | retrieve | describe | evaluate | bench``: models, one library call each."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from grace.cli._errors import parse_params as _params
from grace.cli._errors import reports_errors
from grace.cli._shared import _embedder, _load, _print_summary, app
from grace.errors import GraceError


# ---------------------------------------------------------------------------------------------
# grace ids ...
# ---------------------------------------------------------------------------------------------
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
    from grace.identifiers import IdentifierMap
    from grace.training import train
    from grace.training.config import TrainConfig

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

    from grace.retrieval.retriever import GraceRetriever

    gm = GraceRetriever.load(model)
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
    from grace.retrieval.retriever import GraceRetriever

    gm = GraceRetriever.load(model)
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
    from grace.evaluation.metrics import check_gallery, evaluate
    from grace.evaluation.reports import write_report
    from grace.retrieval.retriever import GraceRetriever

    check_gallery(gallery)
    gm = GraceRetriever.load(model)
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
    out: Annotated[Path, typer.Option(help="Folder for the JSON (and plot) it writes.")] = Path(
        "work/bench"
    ),
    kind: Annotated[
        str,
        typer.Option(
            help="schemes: query and training-step cost of each identifier scheme (the "
            "default's first); search: the trie beam search against transformers' generate "
            "and dense retrieval, numeric ids."
        ),
    ] = "schemes",
    schemes: Annotated[str, typer.Option(help="--kind schemes: comma-separated schemes.")] = (
        "structured,atomic,numeric"
    ),
    sizes: Annotated[str, typer.Option(help="Comma-separated id counts.")] = (
        "1000,10000,100000,1000000"
    ),
    threads: int = 1,
    backbone: Annotated[
        str,
        typer.Option(help="--kind search: tiny, or lite (its MiniLM query encoding is timed)."),
    ] = "tiny",
    queries: int = 16,
    batch_size: int = 16,
    beams: int = 10,
    repeats: int = 7,
    reference: Annotated[
        bool, typer.Option(help="--kind search: also time transformers' generate.")
    ] = True,
    mlflow_uri: Annotated[
        str | None,
        typer.Option(envvar="MLFLOW_TRACKING_URI", help="Log params, metrics and the plot here."),
    ] = None,
) -> None:
    """What a query and a training step cost against the catalog's size.

    By default per identifier scheme (structured, the default, then atomic and numeric), with
    dense brute force and FAISS in the same run; ``--kind search`` compares search engines.
    """
    from grace.atomic_io import write_text

    try:
        size_list = [int(s) for s in sizes.split(",")]
    except ValueError:
        raise GraceError(f"--sizes {sizes!r}: expected comma-separated integers") from None
    if kind == "schemes":
        from grace.evaluation import scheme_cost

        names = [s.strip() for s in schemes.split(",") if s.strip()]
        unknown = sorted(set(names) - set(scheme_cost.SCHEMES))
        if unknown or not names:
            raise GraceError(
                f"--schemes {schemes!r}: expected some of {', '.join(scheme_cost.SCHEMES)}"
            )
        cfg = scheme_cost.SchemeCostConfig(
            sizes=size_list,
            schemes=names,
            num_beams=beams,
            batch_size=batch_size,
            queries=queries,
            repeats=repeats,
            threads=threads,
        )
        result = scheme_cost.run_scheme_cost(cfg, log=lambda s: typer.echo(s, err=True))
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "scheme_cost.json", json.dumps(result, indent=1, default=str))
        typer.echo(scheme_cost.markdown_report(result, scheme=names[0]))
        typer.echo(f"wrote {out / 'scheme_cost.json'}")
        if mlflow_uri:
            typer.echo(f"logged MLflow run {scheme_cost.log_to_mlflow(result, mlflow_uri)}")
        return
    if kind != "search":
        raise GraceError(f"--kind {kind!r}: expected schemes or search")
    from grace.evaluation.latency_report import log_to_mlflow, markdown_report, plot_latency
    from grace.evaluation.query_latency import BACKBONES, QueryBenchConfig, run_query_benchmark

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
