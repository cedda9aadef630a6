"""``grace pipeline run|compile|submit|schedule``, ``grace search`` and ``grace demo``.

The workflow half of the CLI: thin commands over ``pipelines.operations`` (the only code that
imports kfp), :mod:`grace.workflow.model_registry` and :mod:`grace.cli.demo`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from grace.cli._errors import parse_params as _params
from grace.cli._errors import reports_errors

pipeline_app = typer.Typer(
    help="KFP pipelines: run locally, compile, submit or schedule on a cluster.",
    no_args_is_help=True,
)

ParamOpt = Annotated[
    list[str] | None,
    typer.Option("--param", "-p", help="Pipeline parameter KEY=VALUE (JSON values; repeatable)."),
]
NameOpt = Annotated[str, typer.Option("--pipeline", help="Which pipeline.")]
TrackingOpt = Annotated[
    str | None,
    typer.Option(help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else WORK/mlflow)."),
]


def _arguments(
    params: list[str] | None, data_repo: str | None, rev: str | None, tracking_uri: str | None
) -> dict[str, Any]:
    args = _params(params)
    if data_repo is not None:
        args["data_repo"] = data_repo
    if rev is not None:
        args["data_rev"] = rev
    if tracking_uri:
        args["tracking_uri"] = tracking_uri
    return args


@pipeline_app.command("run")
@reports_errors
def pipeline_run(
    local: Annotated[bool, typer.Option("--local", help="Run here through kfp.local.")] = False,
    data_repo: Annotated[str, typer.Option(help="Git+DVC repo (path or URL).")] = ".",
    rev: Annotated[str, typer.Option(help="Data revision; '' reads data_repo as a folder.")] = (
        "HEAD"
    ),
    work: Annotated[Path, typer.Option(help="Pipeline root and default MLflow store.")] = Path(
        "work/pipeline"
    ),
    tracking_uri: TrackingOpt = None,
    param: ParamOpt = None,
    pipeline: NameOpt = "training",
) -> None:
    """Run a pipeline on this machine (every step in a subprocess, no Docker needed)."""
    from grace.workflow.tracking import local_store
    from grace_kfp.pipelines.operations import run_local

    if not local:
        raise typer.BadParameter("only --local runs here; use `grace pipeline submit` for KFP")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or local_store(work / "mlflow").uri
    out = run_local(_arguments(param, data_repo, rev, uri), work, pipeline)
    typer.echo(
        f"pipeline {pipeline} finished: output={out['output']} (root {out['pipeline_root']})"
    )


ImageOpt = Annotated[
    str | None,
    typer.Option(
        help="Image every component runs in (what `make image` pushed); default $GRACE_IMAGE."
    ),
]


@pipeline_app.command("compile")
@reports_errors
def pipeline_compile(
    out: Annotated[
        Path | None, typer.Option(help="YAML path (default pipelines/compiled/).")
    ] = None,
    pipeline: NameOpt = "training",
    image: ImageOpt = None,
) -> None:
    """Compile a pipeline to KFP IR YAML (what a cluster runs)."""
    from grace_kfp.pipelines.operations import compile_pipeline

    typer.echo(f"wrote {compile_pipeline(pipeline, out, image)}")


HostOpt = Annotated[str, typer.Option(help="KFP API endpoint, e.g. https://kfp.example.com.")]


@pipeline_app.command("submit")
@reports_errors
def pipeline_submit(
    host: HostOpt,
    data_repo: Annotated[str, typer.Option(help="Git URL of the data repository.")],
    rev: Annotated[str, typer.Option(help="Data revision.")] = "HEAD",
    experiment: str = "grace",
    run_name: str | None = None,
    namespace: str | None = None,
    tracking_uri: TrackingOpt = None,
    param: ParamOpt = None,
    pipeline: NameOpt = "training",
    image: ImageOpt = None,
) -> None:
    """Start one run on a Kubeflow Pipelines cluster (caching off)."""
    from grace_kfp.pipelines.operations import submit

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    run_id = submit(
        host,
        _arguments(param, data_repo, rev, uri),
        name=pipeline,
        experiment=experiment,
        run_name=run_name,
        namespace=namespace,
        image=image,
    )
    typer.echo(f"submitted run {run_id}")


@pipeline_app.command("schedule")
@reports_errors
def pipeline_schedule(
    host: HostOpt,
    cron: Annotated[str, typer.Option(help="Six-field cron, seconds first: '0 0 2 * * *'.")],
    data_repo: Annotated[str, typer.Option(help="Git URL of the data repository.")],
    rev: Annotated[str, typer.Option(help="Data revision (a branch follows new data).")] = "main",
    experiment: str = "grace",
    job_name: str | None = None,
    namespace: str | None = None,
    tracking_uri: TrackingOpt = None,
    param: ParamOpt = None,
    pipeline: NameOpt = "training",
    image: ImageOpt = None,
) -> None:
    """Create a recurring run on a Kubeflow Pipelines cluster."""
    from grace_kfp.pipelines.operations import schedule

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    job = schedule(
        host,
        cron,
        _arguments(param, data_repo, rev, uri),
        name=pipeline,
        experiment=experiment,
        job_name=job_name,
        namespace=namespace,
        image=image,
    )
    typer.echo(f"scheduled recurring run {job}")


@reports_errors
def search(
    queries: Annotated[list[str], typer.Argument(help="Text queries.")],
    model: Annotated[str, typer.Option(help="Registered model URI.")] = "models:/grace@champion",
    k: Annotated[int, typer.Option(help="Images per query.")] = 5,
    tracking_uri: TrackingOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Search with a registered model (by default the champion)."""
    import mlflow
    import pandas as pd

    from grace.workflow.model_registry import load_pyfunc

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        mlflow.set_tracking_uri(uri)
    frame = load_pyfunc(model).predict(pd.DataFrame({"query": queries}), params={"k": k})
    if as_json:
        typer.echo(json.dumps(frame.to_dict(orient="records"), indent=2))
        return
    for q in queries:
        typer.echo(q)
        for row in frame[frame["query"] == q].itertuples():
            typer.echo(f"  {row.rank}. {row.path}  id={row.identifier!r}  score={row.score:.3f}")


@reports_errors
def demo(
    data: Annotated[Path, typer.Option(help="Demo image set (generated if absent).")] = Path(
        "data"
    ),
    work: Annotated[Path, typer.Option(help="Pipeline root and MLflow store.")] = Path("work/demo"),
    seconds: Annotated[float, typer.Option(help="Training budget of each training step.")] = 120,
    ids_only: Annotated[
        bool, typer.Option("--ids-only", help="Only identifiers of every kind and their tries.")
    ] = False,
) -> None:
    """The product on one machine: data, pipeline, registry, searches, the MLflow UI."""
    from grace.cli.demo import run_ids_demo
    from grace_kfp.pipelines.demo import run_demo

    if ids_only:
        run_ids_demo(data=data, work=work, echo=typer.echo)
    else:
        run_demo(data=data, work=work, train_seconds=seconds, echo=typer.echo)


@reports_errors
def watch(
    data_repo: Annotated[str, typer.Option(help="Git+DVC repository to watch (path or URL).")],
    branch: Annotated[str, typer.Option(help="Branch whose new data revisions run.")] = "main",
    state: Annotated[Path, typer.Option(help="State file: revisions already handled.")] = Path(
        "work/watch/state.json"
    ),
    local: Annotated[bool, typer.Option("--local", help="Run the pipeline here.")] = False,
    host: Annotated[str | None, typer.Option(help="KFP endpoint to submit to instead.")] = None,
    once: Annotated[bool, typer.Option("--once", help="Poll once and exit.")] = False,
    interval: Annotated[float, typer.Option(help="Seconds between polls.")] = 300.0,
    work: Annotated[Path, typer.Option(help="Pipeline roots of local runs.")] = Path("work/watch"),
    tracking_uri: TrackingOpt = None,
    param: ParamOpt = None,
    pipeline: NameOpt = "incremental",
    experiment: str = "grace",
    namespace: str | None = None,
) -> None:
    """Run the incremental pipeline once per new data revision of a branch (restart-safe)."""
    from grace.workflow.tracking import local_store
    from grace.workflow.watcher import Watcher

    if local == (host is not None):
        raise typer.BadParameter("give exactly one of --local and --host")
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    if local and not uri:
        uri = local_store(work / "mlflow").uri
    if not local:  # refused now, not at every new revision
        from grace_kfp.pipelines.operations import require_tracking

        require_tracking(pipeline, {"tracking_uri": uri})

    def trigger(sha: str) -> Any:
        args = _arguments(param, data_repo, sha, uri)
        if local:
            from grace_kfp.pipelines.operations import run_local

            return run_local(args, work / sha[:12], pipeline)["output"]
        from grace_kfp.pipelines.operations import submit

        return submit(
            host,
            args,
            name=pipeline,
            experiment=experiment,
            namespace=namespace,
            run_name=f"{pipeline}-{sha[:12]}",
        )

    watcher = Watcher(data_repo, state, trigger, branch=branch)
    watcher.run(interval, echo=typer.echo, max_polls=1 if once else None)
