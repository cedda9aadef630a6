"""The steps of the incremental pipeline: diff the data, update and train, evaluate, register.

A run whose data did not change ends at :func:`no_change`; design in docs/incremental.md.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from grace.atomic_io import write_json, write_text
from grace.errors import GraceError
from grace.evaluation.reports import _old_new_figure, _old_new_html
from grace.workflow.steps.common import StepContext, _flat, _records, _resolve_rev
from grace.workflow.steps.training import register
from grace.workflow.tracking import MetricsLogger, step_run

# ---- incremental: diff_data -> validate_data -> incremental_train -> evaluate -> register -----
BASE_TAG = "grace.base_model_version"


def diff_data(
    data_repo: str,
    data_rev: str,
    base_model: str,
    out_diff: str | os.PathLike,
    *,
    data_dir: str = "data",
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """What changed in the data since the base model's revision (its ``data.revision`` tag).

    Cheap (DVC's file hashes, no image download), so a scheduled run can stop here when
    ``changes`` is 0. The base model is pinned to a version: later steps use that version even
    if the alias moves meanwhile. A base trained from a plain folder cannot be diffed by
    revision: ``changes`` is then -1 (unknown) and training works the change out by image key.
    """
    from grace.data.versioning import diff
    from grace.workflow.model_registry import resolve_model

    if not ctx.tracking.enabled:
        raise GraceError("diff_data needs an MLflow tracking URI (the base model is registered)")
    params = {"base_model": base_model, "data_rev": data_rev, "data_dir": data_dir}
    with step_run(ctx.tracking, ctx.pipeline_key, "diff_data", params) as run:
        name, version, tags, run_id = resolve_model(base_model)
        base_rev = tags.get("data.revision", "")
        revision = _resolve_rev(data_repo, data_rev) if data_rev else "folder"
        out: dict[str, Any] = {
            "base_model": f"models:/{name}/{version}",
            "base_version": version,
            "base_revision": base_rev,
            "revision": revision,
        }
        if base_rev in ("", "folder") or revision == "folder":
            out.update(changes=-1, diffable=False)
        else:
            d = diff(data_repo, base_rev, revision, data_dir=data_dir)
            out.update(d.to_dict(), diffable=True)
            out["changes"] = len(d.added) + len(d.removed) + len(d.modified)
        write_json(out_diff, out)
        run.set_tags(
            {BASE_TAG: f"{name}/{version}", "grace.base_model_run": run_id}, on_parent=True
        )
        run.set_tags({"grace.data_changes": out["changes"]}, on_parent=True)
        run.log_metrics(
            {k: len(out.get(k, ())) for k in ("added", "removed", "modified")}
            | {"changes": out["changes"]},
            on_parent=True,
        )
        run.log_artifact(out_diff, "incremental/diff.json")
    return out


def no_change(diff_json: str | os.PathLike, *, ctx: StepContext = StepContext()) -> bool:
    """The no-op end of a run whose data did not change: say so and close the parent run."""
    found = json.loads(Path(diff_json).read_text())
    with step_run(ctx.tracking, ctx.pipeline_key, "no_change", None, True) as run:
        run.set_tags({"grace.noop": "true"}, on_parent=True)
        run.log_metrics({"promoted": 0.0}, on_parent=True)
    print(f"data at {found['revision']} unchanged since {found['base_model']}: nothing to do")
    return False


def incremental_train(
    dataset_dir: str | os.PathLike,
    base_model: str,
    out_model: str | os.PathLike,
    out_plan: str | os.PathLike,
    *,
    settings: dict[str, Any] | None = None,
    replay: dict[str, Any] | None = None,
    embedder: str = "dual-encoder",
    embedder_seconds: float = 60.0,
    processes: int = 1,
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """Extend/retire the base model's identifiers and continue its training on the new images.

    Training runs on the new images plus a replay sample of old ones, and not at all when images
    were only removed.

    Args:
        dataset_dir: The validated image set.
        base_model: The base model's registry URI (``models:/NAME@ALIAS`` or a version).
        out_model: Where the updated model goes.
        out_plan: Where the update plan (what changed, what was replayed) goes as JSON.
        settings: TrainConfig fields for training every weight.
        replay: ReplayConfig fields; unset ones are chosen for the base's identifiers.
        embedder: The image embedder new structured ids are placed with.
        embedder_seconds: Training budget of that embedder, in seconds.
        processes: Data-parallel training processes in this task, one per GPU (DeepSpeed).
        ctx: The pipeline run this step belongs to.

    Returns:
        The update's summary.
    """
    from grace.retrieval.retriever import GraceRetriever
    from grace.training.config import TrainConfig
    from grace.training.incremental import (
        ReplayConfig,
        continue_training,
        plan_update,
        update_identifiers,
    )
    from grace.workflow.model_registry import download_grace_model, resolve_model

    records = _records(dataset_dir)
    cfg = TrainConfig.from_dict({**(settings or {}), "backbone": "tiny", "processes": processes})
    replay_cfg = ReplayConfig(**(replay or {}))  # resolved for the base's ids, logged below
    step_params = {**_flat(cfg.to_dict()), "base_model": base_model}
    step_params.pop("backbone")
    out_model = Path(out_model)
    with step_run(ctx.tracking, ctx.pipeline_key, "incremental_train", step_params) as run:
        name, version, _, _ = resolve_model(base_model)
        logger = MetricsLogger(run)
        out_model.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_model.parent, prefix=".base-") as tmp:
            base_dir = download_grace_model(name, version, tmp)
            base = GraceRetriever.load(base_dir)
            plan = plan_update(base, records)
            emb = None
            if plan.added and base.id_map.scheme == "structured":
                from grace.models.embedders import make_embedder

                emb = make_embedder(
                    embedder, records, dataset_dir, max_seconds=embedder_seconds, progress=False
                )
            id_map = update_identifiers(base.id_map, plan, records, embedder=emb, root=dataset_dir)
            del base
            gm = continue_training(
                base_dir, records, dataset_dir, id_map, plan, out_model, cfg, replay_cfg, logger
            )
        logger.flush()
        run.log_params(_flat({"replay": gm.info["replay"]}))
        write_json(out_plan, {"base_model": f"models:/{name}/{version}", **plan.to_dict()})
        run.log_artifact(out_plan, "incremental/plan.json")
        counts = plan.summary()
        summary = {**counts, "steps": gm.info["steps"], "complete": gm.info["complete"]}
        run.log_metrics({f"images_{k}": v for k, v in counts.items()}, on_parent=True)
        run.log_metrics({"steps": summary["steps"], "complete": float(summary["complete"])})
        if negatives := gm.info.get("cached_negatives"):
            run.log_metrics({f"cached_negative_{k}": v for k, v in negatives.items()})
        if logger.history:
            run.log_png(logger.loss_figure("incremental: loss per task"), "incremental_loss.png")
    return summary


def evaluate_incremental(
    dataset_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    plan_json: str | os.PathLike,
    out_metrics: str | os.PathLike,
    out_report: str | os.PathLike,
    *,
    num_beams: int = 10,
    max_queries: int | None = None,
    ctx: StepContext = StepContext(),
) -> dict[str, float]:
    """Old-image and new-image recall/memorization of the candidate, beside the base model's.

    The base is scored on the same old images and gallery (metrics, a chart and a table on the
    parent run); the candidate's old images also against the whole gallery
    (``old_whole_gallery_*``).
    """
    from grace.evaluation.incremental import evaluate_old_new
    from grace.retrieval.retriever import GraceRetriever
    from grace.training.incremental import UpdatePlan
    from grace.workflow.model_registry import download_grace_model, resolve_model

    records = _records(dataset_dir)
    stored = json.loads(Path(plan_json).read_text())
    plan = UpdatePlan.from_dict(stored)
    params = {
        "num_beams": num_beams,
        "max_queries": max_queries,
        "base_model": stored["base_model"],
    }
    with step_run(ctx.tracking, ctx.pipeline_key, "evaluate_incremental", params) as run:
        name, version, _, _ = resolve_model(stored["base_model"])
        with tempfile.TemporaryDirectory() as tmp:
            base = GraceRetriever.load(download_grace_model(name, version, tmp))
        metrics = evaluate_old_new(
            GraceRetriever.load(model_dir),
            records,
            dataset_dir,
            plan,
            base=base,
            num_beams=num_beams,
            max_queries=max_queries,
        )
        write_json(out_metrics, metrics)
        write_text(out_report, _old_new_html(metrics, plan))
        run.log_metrics(metrics, on_parent=True)
        run.log_artifact(out_metrics, "evaluation/metrics.json")
        run.log_artifact(out_report, "evaluation/old_vs_new.html")
        run.log_png(_old_new_figure(metrics), "old_vs_new_recall.png", True)
    return metrics


def register_incremental(
    model_dir: str | os.PathLike,
    metrics_json: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    plan_json: str | os.PathLike,
    out_decision: str | os.PathLike,
    *,
    model_name: str = "grace",
    gate: Any = None,
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """``register`` with the incremental gate, the version linked to the base it started from."""
    from dataclasses import replace

    from grace.workflow.model_registry import IncrementalGate, resolve_model

    base = json.loads(Path(plan_json).read_text())["base_model"]
    _, version, _, run_id = resolve_model(base)
    gate = replace(gate or IncrementalGate(), base_version=version)
    tags = {"base_model": base, "base_model_run": run_id, "incremental": "true"}
    return register(
        model_dir,
        metrics_json,
        dataset_dir,
        out_decision,
        model_name=model_name,
        gate=gate,
        extra_tags=tags,
        ctx=ctx,
    )
