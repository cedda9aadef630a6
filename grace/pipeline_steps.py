"""The six steps of the training workflow, as plain functions over folders and files.

Each KFP component (``components/``) moves its artifacts in and out of exactly one of these, and
the CLI can call them too, so the same code runs from a shell, from ``kfp.local`` and on a cluster.
Every step is one nested MLflow run under the pipeline's parent run (see ``grace.tracking``) and
writes its outputs atomically: a failed step leaves no half-written artifact behind.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grace.atomic_io import atomic_dir, write_json, write_text
from grace.errors import GraceError, InvalidInputError
from grace.tracking import MetricsLogger, StepRun, Tracking, for_uri, step_run

REVISION_FILE = "revision.json"
MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class StepContext:
    """What every step shares: where to track, and the key of the pipeline run it belongs to."""

    tracking: Tracking = field(default_factory=Tracking)
    pipeline_key: str = "local"


def context(tracking_uri: str, experiment: str, pipeline_key: str) -> StepContext:
    """The context a KFP component builds from its plain parameters."""
    return StepContext(for_uri(tracking_uri, experiment), pipeline_key)


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
    from grace.imageset import manifest_frame, summarize, write_manifest
    from grace.validation import validate_image_set

    params = {"source": source, "rev": rev or "(folder)", "data_dir": data_dir}
    with step_run(ctx.tracking, ctx.pipeline_key, "validate_data", params) as run:
        revision = _materialize(source, rev, data_dir, Path(out_dir))
        report = validate_image_set(out_dir, min_images=min_images)
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
        from grace.imageset import scan_image_set

        records = scan_image_set(out_dir)
        write_manifest(records, Path(out_dir) / MANIFEST)
        write_json(Path(out_dir) / REVISION_FILE, revision)
        _log_dataset(run, manifest_frame(records), revision)
        summary = {**summarize(records), **revision}
        run.log_metrics({"images": len(records)}, on_parent=True)
    return summary


def _materialize(source: str, rev: str, data_dir: str, out: Path) -> dict[str, str]:
    """Copy the set to ``out``; return where it came from, the revision resolved to a sha."""
    if rev:
        from grace.versioning import open_image_set

        open_image_set(source, rev, out, data_dir=data_dir)
        return {"source": source, "revision": _resolve_rev(source, rev), "requested": rev}
    folder = Path(source)
    if not folder.is_dir():
        raise GraceError(f"{source}: no such image-set folder (give rev to read a DVC repo)")
    with atomic_dir(out) as tmp:
        shutil.copytree(folder, tmp, dirs_exist_ok=True)
    return {"source": str(folder.resolve()), "revision": "folder", "requested": ""}


def _resolve_rev(source: str, rev: str) -> str:
    """A git revision as a commit sha, so lineage and caching key on content, not on names."""
    if Path(source).is_dir():
        done = subprocess.run(
            ["git", "rev-parse", "--verify", f"{rev}^{{commit}}"],
            cwd=source,
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode == 0:
            return done.stdout.strip()
    return rev


def _log_dataset(run: StepRun, frame, revision: dict[str, str]) -> None:
    """Dataset lineage: the manifest and its revision as an MLflow dataset input."""
    if not run.active:
        return
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import DatasetInput, InputTag

    table = frame.drop(columns=["captions"]).assign(captions=frame["captions"].map(len))
    ds = mlflow.data.from_pandas(
        table, source=f"{revision['source']}@{revision['revision']}", name="image-set"
    )
    mlflow.log_input(ds, context="training")
    entity = DatasetInput(ds._to_mlflow_entity(), [InputTag("mlflow.data.context", "training")])
    MlflowClient().log_inputs(run.parent_id, datasets=[entity])


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
    from grace.embedding import make_embedder
    from grace.identifier_index import identifier_stats
    from grace.identifiers import assign_identifiers as assign

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

    ``processes``: data-parallel training processes in this task, one per GPU (DeepSpeed)."""
    fixed = {"backbone": backbone, "retrieve_task": False, "describe_task": False,
             "processes": processes}  # fmt: skip
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
    """Learning to retrieve: query -> identifier, from the memorized model, memorize batches
    mixed in (as in the paper) so the images stay memorized. ``processes`` as in memorize."""
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
    from grace.configuration_grace import TrainConfig
    from grace.identifiers import IdentifierMap
    from grace.training_grace import train

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
    from grace.embedding import make_embedder
    from grace.evaluation import evaluate as run_evaluation
    from grace.evaluation import example_grid, write_report
    from grace.modeling_grace import GraceModel

    records = _records(dataset_dir)
    params = {"gallery": gallery, "num_beams": num_beams, "dense_seconds": dense_seconds}
    with step_run(ctx.tracking, ctx.pipeline_key, "evaluate", params) as run:
        gm = GraceModel.load(model_dir)
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
    from grace.modeling_grace import IDS_FILE
    from grace.registry import Gate
    from grace.registry import register as register_model

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
    from grace.registry import resolve_model
    from grace.versioning import diff

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
    """Extend/retire identifiers of the base model and continue its training on the new images
    plus a replay sample of old ones (no training at all when images were only removed).
    ``processes``: data-parallel training processes in this task, one per GPU (DeepSpeed)."""
    from grace.configuration_grace import TrainConfig
    from grace.incremental import ReplayConfig, continue_training, plan_update, update_identifiers
    from grace.modeling_grace import GraceModel
    from grace.registry import download_grace_model, resolve_model

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
            base = GraceModel.load(base_dir)
            plan = plan_update(base, records)
            emb = None
            if plan.added and base.id_map.scheme == "structured":
                from grace.embedding import make_embedder

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
    """Old-image and new-image recall/memorization of the candidate, and of the base model on
    the same old images and gallery, side by side (metrics, a chart and a table on the parent
    run); the candidate's old images also against the whole gallery (``old_whole_gallery_*``)."""
    from grace.incremental import UpdatePlan, evaluate_old_new
    from grace.modeling_grace import GraceModel
    from grace.registry import download_grace_model, resolve_model

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
            base = GraceModel.load(download_grace_model(name, version, tmp))
        metrics = evaluate_old_new(
            GraceModel.load(model_dir),
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

    from grace.registry import IncrementalGate, resolve_model

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


def _old_new_rows(m: dict[str, float]) -> list[tuple[str, list[float | None]]]:
    keys = ["grace_R@1", "grace_R@5", "grace_R@10", "memorization"]
    return [
        (label, [m.get(prefix + k) for k in keys])
        for label, prefix in (
            ("base, old images (old gallery)", "base_old_"),
            ("candidate, old images (old gallery)", "old_"),
            ("candidate, old images (whole gallery)", "old_whole_gallery_"),
            ("candidate, new images (whole gallery)", "new_"),
        )
    ]


def _old_new_html(m: dict[str, float], plan) -> str:
    cells = "".join(
        f"<tr><td>{label}</td>"
        + "".join(f"<td>{'' if v is None else f'{v:.3f}'}</td>" for v in values)
        + "</tr>"
        for label, values in _old_new_rows(m)
    )
    counts = ", ".join(f"{k}: {v}" for k, v in plan.summary().items())
    return (
        "<!doctype html><meta charset='utf-8'><title>old vs new images</title>"
        f"<h1>Incremental update: old vs new images</h1><p>{counts}</p>"
        "<table border=1 cellpadding=4><tr><th></th><th>R@1</th><th>R@5</th><th>R@10</th>"
        f"<th>memorization</th></tr>{cells}</table>"
        "<p>Old gallery: the old images only, the base's and the candidate's the same, so the "
        "difference is forgetting (what the gate compares). Whole gallery: every live image, as "
        "a user searches; new images that fit an old caption also crowd its top K there.</p>"
    )


def _old_new_figure(m: dict[str, float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = ["R@1", "R@5", "R@10", "memorization"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    rows = _old_new_rows(m)
    width = 0.8 / len(rows)
    for n, (label, values) in enumerate(rows):
        xs = [i + n * width for i in range(len(labels))]
        ax.bar(xs, [v if v is not None else 0.0 for v in values], width, label=label)
    ax.set_xticks([i + width * (len(rows) - 1) / 2 for i in range(len(labels))], labels)
    ax.set(ylim=(0, 1.05), title="old vs new images")
    ax.legend(fontsize="small", loc="lower left")
    fig.tight_layout()
    return fig


# ---- shared ----------------------------------------------------------------------------------
def _records(dataset_dir: str | os.PathLike):
    from grace.imageset import load_records

    manifest = Path(dataset_dir) / MANIFEST
    return load_records(manifest if manifest.is_file() else dataset_dir)


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as dotted MLflow params (``tiny.image_size``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
