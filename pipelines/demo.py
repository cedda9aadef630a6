"""``make demo``: the product on one machine, from a fresh clone to a served champion.

Generate the demo set (byte for byte what ``data.dvc`` records), run the training pipeline
through kfp.local against a local MLflow store, register and promote, search with the champion,
and say how to open the MLflow UI.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TextIO

from grace.constants import DEFAULT_ID_SCHEME

DEMO_QUERIES = 3
DEMO_MIN_MEMORIZATION = 0.9


def demo_arguments(
    repo: Path, rev: str, data: Path, tracking_uri: str, train_seconds: float
) -> dict[str, Any]:
    """Pipeline parameters sized for 2 CPU cores and a 10-minute demo.

    The default ``lite`` backbone and identifier scheme (structured ids with node tokens:
    README, "Identifier schemes"). The budget goes to GRACE's two tasks (captioning and
    describing are off).
    """
    train = {"epochs": 60, "max_seconds": train_seconds, "caption_task": False}
    return {
        "data_repo": str(repo if rev else data.resolve()),
        "data_rev": rev,
        "data_dir": str(data.resolve().relative_to(repo)) if rev else "data",
        "id_scheme": DEFAULT_ID_SCHEME,
        "memorize_settings": train,
        "retrieve_settings": {**train, "describe_task": False},
        "min_memorization": DEMO_MIN_MEMORIZATION,
        "dense_seconds": 45.0,
        "max_queries": 200,
        "tracking_uri": tracking_uri,
        "experiment": "grace-demo",
    }


def run_demo(
    data: Path = Path("data"),
    work: Path = Path("work/demo"),
    train_seconds: float = 120,
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The whole product on a fresh machine: data, both pipelines' first one, the champion.

    Args:
        data: Image set folder; the demo set is generated there when missing.
        work: Where the local pipeline run, its MLflow store and its log go.
        train_seconds: Training budget of each training step.
        echo: Where progress lines go.

    Returns:
        The local pipeline run's outputs, its metrics and the example searches' results.
    """
    import mlflow
    import pandas as pd

    from grace.data.imageset import scan_image_set, summarize
    from grace.data.synth import synthesize
    from grace.data.versioning import cache_workspace
    from grace.workflow.model_registry import champion_of, load_pyfunc
    from grace.workflow.tracking import local_store
    from grace_kfp.pipelines.operations import run_local

    t0 = time.perf_counter()
    repo = Path.cwd().resolve()
    if (data / "images").is_dir():
        echo(f"== image set {data}: present, validating")
        records = scan_image_set(data)
    else:
        echo(f"== image set {data}: generating the demo set")
        records = synthesize(data)
    echo("   " + ", ".join(f"{k}={v}" for k, v in summarize(records).items()))
    rev = "HEAD" if cache_workspace(repo, str(data.resolve().relative_to(repo))) else ""
    echo(
        f"== data revision: {'HEAD (data.dvc matches)' if rev else 'work tree (data.dvc differs)'}"
    )

    tracking = local_store(work / "mlflow", experiment="grace-demo")
    args = demo_arguments(repo, rev, data, tracking.uri, train_seconds)
    log = work / "pipeline.log"
    echo(f"== training pipeline through kfp.local (root {work / 'pipeline_root'}, log {log})")
    t_pipe = time.perf_counter()
    try:
        with _output_to(log) as terminal, following(log, terminal):
            out = run_local(args, work)
    except Exception:
        echo("".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:]))
        raise
    echo(f"   finished in {time.perf_counter() - t_pipe:.0f} s; champion moved: {out['output']}")

    mlflow.set_tracking_uri(tracking.uri)
    parent = _latest_pipeline_run(tracking.uri, "grace-demo")
    echo("\n== step times (MLflow nested runs)")
    steps = _step_runs(tracking.uri, parent.info.run_id)
    for run in steps:
        seconds = ((run.info.end_time or run.info.start_time) - run.info.start_time) / 1000
        echo(f"   {run.info.run_name:20s} {seconds:7.1f} s")
    ids = next((r for r in steps if r.info.run_name == "assign_identifiers"), None)
    if ids is not None:
        stats = ", ".join(
            f"{k}={ids.data.metrics[k]:g}"
            for k in ("identifiers", "tokens_per_id_mean", "trie_nodes", "trie_bytes")
            if k in ids.data.metrics
        )
        echo(f"\n== identifiers ({args['id_scheme']}): {stats}")
    m = parent.data.metrics
    echo("\n== evaluation (held-out captions of test images; gallery = all images)")
    for name in ("grace_R_at_1", "grace_R_at_5", "grace_R_at_10", "dense_R_at_10", "memorization"):
        if name in m:
            echo(f"   {name:16s} {m[name]:.3f}")
    echo(f"   gate: {parent.data.tags.get('gate', '?')}")

    queries = [r.captions[0] for r in records if r.split == "test" and r.captions][:DEMO_QUERIES]
    gold = {r.captions[0]: r.path for r in records if r.captions}
    alias = "champion" if champion_of("grace") else "challenger"
    if alias != "champion":
        echo("\n(the gate refused this model and there is no earlier champion: its challenger)")
    echo(f"\n== searches with models:/grace@{alias}")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a blink, locally
    model = load_pyfunc(f"models:/grace@{alias}")
    frame = model.predict(pd.DataFrame({"query": queries}), params={"k": 5})
    for q in queries:
        echo(f"   {q!r}  (gold {gold[q]})")
        for row in frame[frame["query"] == q].itertuples():
            mark = "  <- gold" if row.path == gold[q] else ""
            echo(f"     {row.rank}. {row.path}  id={row.identifier}  {row.score:.3f}{mark}")
    echo("\n== review the run in the MLflow UI:")
    echo(
        "   MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false mlflow ui --workers 1 --port 5000"
        f" --backend-store-uri {tracking.uri}"
    )
    echo("   then open http://127.0.0.1:5000 (experiment grace-demo, model grace)")
    echo(f"\ndemo finished in {time.perf_counter() - t0:.0f} s")
    return {"pipeline": out, "metrics": dict(m), "results": frame}


@contextmanager
def _output_to(path: Path) -> Iterator[TextIO]:
    """Send this process's stdout/stderr, and so every task subprocess's, to ``path``.

    Yields the terminal (the stdout from before), for the lines that are meant for a person.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    with open(path, "ab") as f, os.fdopen(os.dup(saved[0]), "w", buffering=1) as terminal:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
        try:
            yield terminal
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)


_STARTED = re.compile(r"Executing task '([\w-]+)'")
_ENDED = re.compile(r"Task '([\w-]+)' finished with status (\w+)")
_PROGRESS = re.compile(r"grace train: (step .*)")


@contextmanager
def following(
    log: Path, terminal: TextIO, poll: float = 0.5, progress_every: float = 30.0
) -> Iterator[None]:
    """Echo the pipeline's own milestones from ``log`` to ``terminal`` while it runs.

    A line when each step starts and ends (with its time), and a training step's progress
    line at most every ``progress_every`` seconds; everything else stays in the log.

    Args:
        log: The log the pipeline's tasks write to (followed from its current end).
        terminal: Where the lines go.
        poll: Seconds between reads of the log.
        progress_every: Seconds between two echoed training progress lines.
    """
    stop = threading.Event()
    offset = log.stat().st_size if log.exists() else 0

    def follow() -> None:
        started: dict[str, float] = {}
        step, last_progress = "", 0.0
        with open(log, errors="replace") as f:
            f.seek(offset)
            while True:
                line = f.readline()
                if not line:
                    if stop.is_set():
                        return
                    stop.wait(poll)
                    continue
                if m := _STARTED.search(line):
                    step = m.group(1)
                    started[step] = time.perf_counter()
                    terminal.write(f"   {step} ...\n")
                elif m := _ENDED.search(line):
                    took = time.perf_counter() - started.get(m.group(1), time.perf_counter())
                    terminal.write(f"   {m.group(1)} {m.group(2).lower()} in {took:.0f} s\n")
                elif (m := _PROGRESS.search(line)) and time.perf_counter() - last_progress >= (
                    progress_every
                ):
                    last_progress = time.perf_counter()
                    terminal.write(f"     {step}: {m.group(1)}\n")

    thread = threading.Thread(target=follow, name="demo-log", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)


def _latest_pipeline_run(uri: str, experiment: str):
    from mlflow import MlflowClient

    from grace.workflow.tracking import PIPELINE_KEY_TAG

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="tags.`mlflow.parentRunId` IS NULL",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    return next(r for r in runs if PIPELINE_KEY_TAG in r.data.tags)


def _step_runs(uri: str, parent_id: str) -> list:
    """The parent's nested runs, in the order they started."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_run(parent_id).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return sorted(children, key=lambda c: c.info.start_time)
