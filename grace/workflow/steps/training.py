"""The six steps of the training pipeline, from validating the data to registering the model."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from grace.atomic_io import write_json, write_text
from grace.errors import GraceError, InvalidInputError
from grace.workflow.steps.common import (
    MANIFEST,
    REVISION_FILE,
    StepContext,
    _flat,
    _log_dataset,
    _materialize,
    _records,
)
from grace.workflow.tracking import MetricsLogger, step_run


# ---- 1. validate_data ------------------------------------------------------------------------
def validate_data(
    source: str,
    rev: str,
    out_dir: str | os.PathLike,
    report_html: str | os.PathLike,
    report_json: str | os.PathLike,
    *,
    data_dir: str = "data",
    min_images: int = 1,
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """Materialize the image set of ``source`` at ``rev`` into ``out_dir`` and gate it.

    ``source`` is a git+DVC repository (path or URL) read at ``rev`` through DVC, or, with
    ``rev`` empty, a plain image-set folder. The great-expectations report is written (and
    logged) whether or not the set passes; a failing set raises with every failing row, so
    nothing downstream runs.
    """
    from grace.data.imageset import manifest_frame, summarize, write_manifest
    from grace.data.validation import validate_image_set
    from grace.data.versioning import revision_name

    params = {"source": source, "rev": rev or "(folder)", "data_dir": data_dir}
    with step_run(ctx.tracking, ctx.pipeline_key, "validate_data", params) as run:
        revision = _materialize(source, rev, data_dir, Path(out_dir))
        report = validate_image_set(out_dir, min_images=min_images)
        if rev:  # name the revision's files, not the copy
            report = report.relocated(revision_name(source, rev, data_dir))
        write_text(report_html, report.to_html())
        write_json(report_json, report.to_dict())
        run.log_artifact(report_html, "validation/report.html")
        run.log_artifact(report_json, "validation/result.json")
        run.log_metrics({k: v for k, v in report.summary().items() if k != "success"})
        run.set_tags({"data.revision": revision["revision"]}, on_parent=True)
        run.log_params({"data_revision": revision["revision"]}, on_parent=True)
        if not report.success:
            shutil.rmtree(out_dir, ignore_errors=True)  # a refused set is no artifact
            raise InvalidInputError(list(report.problems))
        from grace.data.imageset import scan_image_set

        records = scan_image_set(out_dir)
        write_manifest(records, Path(out_dir) / MANIFEST)
        write_json(Path(out_dir) / REVISION_FILE, revision)
        _log_dataset(run, manifest_frame(records), revision)
        summary = {**summarize(records), **revision}
        run.log_metrics({"images": len(records)}, on_parent=True)
    return summary


# ---- 2. assign_identifiers -------------------------------------------------------------------
def assign_identifiers(
    dataset_dir: str | os.PathLike,
    out_ids: str | os.PathLike,
    *,
    scheme: str,
    params: dict[str, Any] | None = None,
    embedder: str = "dual-encoder",
    embedder_seconds: float = 60.0,
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """Give every image an identifier of ``scheme``; write the map; log its statistics."""
    from grace.identifiers import assign_identifiers as assign
    from grace.models.embedders import make_embedder
    from grace.retrieval.index import identifier_stats

    records = _records(dataset_dir)
    step_params = {"id_scheme": scheme, **(params or {})}
    with step_run(ctx.tracking, ctx.pipeline_key, "assign_identifiers", step_params) as run:
        run.log_params({"id_scheme": scheme}, on_parent=True)
        emb = None
        if scheme == "structured":
            emb = make_embedder(embedder, records, dataset_dir, max_seconds=embedder_seconds)
        id_map = assign(records, scheme, params=params, embedder=emb, root=dataset_dir)
        id_map.save(out_ids)
        stats = identifier_stats(id_map, records)
        run.log_metrics({k: v for k, v in stats.items() if isinstance(v, int | float)})
        run.log_artifact(out_ids, "identifiers/identifiers.json")
    return stats


# ---- 3./4. memorize and retrieve -------------------------------------------------------------
def memorize(
    dataset_dir: str | os.PathLike,
    ids: str | os.PathLike,
    out_model: str | os.PathLike,
    *,
    backbone: str = "lite",
    settings: dict[str, Any] | None = None,
    processes: int = 1,
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """Learning to memorize: image -> identifier (and image -> caption, for pseudo-queries).

    Args:
        dataset_dir: The validated image set.
        ids: The identifier map (``identifiers.json``).
        out_model: Where the memorized model goes.
        backbone: ``TrainConfig.backbone``.
        settings: Further TrainConfig fields.
        processes: Data-parallel training processes in this task, one per GPU (DeepSpeed).
        ctx: The pipeline run this step belongs to.

    Returns:
        The training run's summary.
    """
    fixed = {
        "backbone": backbone,
        "retrieve_task": False,
        "describe_task": False,
        "processes": processes,
    }
    return _train_step("memorize", dataset_dir, ids, out_model, {**(settings or {}), **fixed}, ctx)


def retrieve(
    dataset_dir: str | os.PathLike,
    ids: str | os.PathLike,
    memorized_model: str | os.PathLike,
    out_model: str | os.PathLike,
    *,
    settings: dict[str, Any] | None = None,
    processes: int = 1,
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """Learning to retrieve: query -> identifier, from the memorized model.

    Memorize batches are mixed in (as in the paper) so the images stay memorized.

    Args:
        dataset_dir: The validated image set.
        ids: The identifier map (``identifiers.json``).
        memorized_model: The model :func:`memorize` wrote; training continues from it.
        out_model: Where the trained model goes.
        settings: Further TrainConfig fields.
        processes: Data-parallel training processes in this task, one per GPU (DeepSpeed).
        ctx: The pipeline run this step belongs to.

    Returns:
        The training run's summary.
    """
    fixed = {"backbone": os.fspath(memorized_model), "retrieve_task": True, "processes": processes}
    return _train_step("retrieve", dataset_dir, ids, out_model, {**(settings or {}), **fixed}, ctx)


def _train_step(
    name: str,
    dataset_dir: str | os.PathLike,
    ids: str | os.PathLike,
    out_model: str | os.PathLike,
    settings: dict[str, Any],
    ctx: StepContext,
) -> dict[str, Any]:
    from grace.identifiers import IdentifierMap
    from grace.training import train
    from grace.training.config import TrainConfig

    cfg = TrainConfig.from_dict(settings)
    records = _records(dataset_dir)
    out_model = Path(out_model)
    with step_run(ctx.tracking, ctx.pipeline_key, name, _flat(cfg.to_dict())) as run:
        logger = MetricsLogger(run)
        out_model.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out_model.parent, prefix=f".{name}-") as scratch:
            gm = train(records, dataset_dir, IdentifierMap.load(ids), scratch, cfg, logger)
            if out_model.exists():
                shutil.rmtree(out_model)
            os.replace(Path(scratch) / "model", out_model)
        logger.flush()
        last = logger.history[-1][1] if logger.history else {}
        summary = {
            "steps": gm.info["steps"],
            "complete": gm.info["complete"],
            "final_loss": last.get("loss", float("nan")),
            "samples_per_second": last.get("samples_per_second", 0.0),
        }
        run.log_metrics({k: float(v) for k, v in summary.items()})
        if logger.history:
            run.log_png(logger.loss_figure(f"{name}: loss per task"), f"{name}_loss.png")
    return summary


# ---- 5. evaluate -----------------------------------------------------------------------------
def evaluate(
    dataset_dir: str | os.PathLike,
    model_dir: str | os.PathLike,
    out_metrics: str | os.PathLike,
    out_report: str | os.PathLike,
    *,
    gallery: str = "all",
    num_beams: int = 10,
    dense_seconds: float = 60.0,
    max_queries: int | None = None,
    ctx: StepContext = StepContext(),
) -> dict[str, float]:
    """Recall@K, memorization and latency, beside the dense baseline; metrics, report, grid."""
    from grace.evaluation.metrics import evaluate as run_evaluation
    from grace.evaluation.reports import example_grid, write_report
    from grace.models.embedders import make_embedder
    from grace.retrieval.retriever import GraceRetriever

    records = _records(dataset_dir)
    params = {"gallery": gallery, "num_beams": num_beams, "dense_seconds": dense_seconds}
    with step_run(ctx.tracking, ctx.pipeline_key, "evaluate", params) as run:
        gm = GraceRetriever.load(model_dir)
        dense = None
        if dense_seconds > 0:
            dense = make_embedder(
                "dual-encoder", records, dataset_dir, max_seconds=dense_seconds, progress=False
            )
        result = run_evaluation(
            gm,
            records,
            dataset_dir,
            gallery=gallery,
            num_beams=num_beams,
            dense=dense,
            max_queries=max_queries,
        )
        with tempfile.TemporaryDirectory() as tmp:
            metrics_path, report_path = write_report(result, records, dataset_dir, tmp)
            write_json(out_metrics, result.metrics)
            write_text(out_report, report_path.read_text())
        run.log_metrics(result.metrics, on_parent=True)
        run.log_artifact(out_report, "evaluation/report.html")
        run.log_artifact(out_metrics, "evaluation/metrics.json")
        run.log_png(example_grid(result, records, dataset_dir), "retrieval_examples.png", True)
    return result.metrics


# ---- 6. register -----------------------------------------------------------------------------
def register(
    model_dir: str | os.PathLike,
    metrics_json: str | os.PathLike,
    dataset_dir: str | os.PathLike,
    out_decision: str | os.PathLike,
    *,
    model_name: str = "grace",
    gate: Any = None,
    extra_tags: dict[str, str] | None = None,
    ctx: StepContext = StepContext(),
) -> dict[str, Any]:
    """Register the model, alias it ``challenger``, and ``champion`` if the gate passes.

    ``gate`` is a ``Gate`` (or an ``IncrementalGate``); ``extra_tags`` go on the version too.
    """
    from grace.identifiers import IdentifierMap
    from grace.retrieval.retriever import IDS_FILE
    from grace.workflow.model_registry import Gate
    from grace.workflow.model_registry import register as register_model

    if not ctx.tracking.enabled:
        raise GraceError("register needs an MLflow tracking URI (the registry lives there)")
    gate = gate or Gate()
    metrics = json.loads(Path(metrics_json).read_text())
    revision = json.loads((Path(dataset_dir) / REVISION_FILE).read_text())
    scheme = IdentifierMap.load(Path(model_dir) / IDS_FILE).scheme
    tags = {
        "data.revision": revision["revision"],
        "data.source": revision["source"],
        "id_scheme": scheme,
        "pipeline_run": ctx.pipeline_key,
        **(extra_tags or {}),
    }
    with step_run(
        ctx.tracking, ctx.pipeline_key, "register", _flat({"gate": vars(gate)}), True
    ) as run:
        reg = register_model(model_dir, metrics, name=model_name, gate=gate, tags=tags)
        decision = reg.to_dict()
        write_json(out_decision, decision)
        run.log_artifact(out_decision, "registry/decision.json")
        run.set_tags(
            {"model.version": reg.version, "gate": reg.decision.summary()[:5000]}, on_parent=True
        )
        run.log_metrics({"promoted": float(reg.decision.promote)}, on_parent=True)
    return decision
