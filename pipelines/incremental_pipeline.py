"""The incremental pipeline: re-memorize new images, keep the old ids, gate on forgetting.

Diff -> (nothing changed: stop) validate -> extend ids and continue training from the base
model -> evaluate old vs new images -> register through the incremental gate.

Only wiring. The diff is cheap, so a recurring run of this pipeline costs almost nothing on
days without new data (``dsl.If`` on the diff size); the base model is pinned to the version
the diff resolved, so every step works from the same model even if ``champion`` moves.
"""

from kfp import dsl

from grace_kfp.components.diff_data import diff_data
from grace_kfp.components.evaluate_incremental import evaluate_incremental
from grace_kfp.components.incremental_train import incremental_train
from grace_kfp.components.no_change import no_change
from grace_kfp.components.register_incremental import register_incremental
from grace_kfp.components.validate_data import validate_data
from grace_kfp.pipelines.task_settings import (
    DEFAULT_SECRET,
    with_credentials,
    with_light_resources,
    with_retries,
)


@dsl.pipeline(name="grace-incremental-update")
def incremental_update(
    data_repo: str,
    data_rev: str,
    data_dir: str,
    min_images: int,
    base_model: str,
    train_settings: dict,
    replay: dict,
    embedder: str,
    embedder_seconds: float,
    eval_beams: int,
    max_queries: int,
    model_name: str,
    gate_metric: str,
    old_tolerance: float,
    min_new_memorization: float,
    min_new_metric: float,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    credentials_secret: str,
    train_accelerator_type: str,
    train_accelerator_limit: int,
    train_processes: int,
    train_cpu_limit: str,
    train_memory_limit: str,
) -> bool:
    """The branch that runs when the data changed.

    A sub-pipeline, so the training task's
    resources are its own inputs (KFP does not pass a parent's parameters used only as resource
    settings into a ``dsl.If`` body).
    """
    track = dict(tracking_uri=tracking_uri, experiment=experiment, pipeline_key=pipeline_key)
    data = validate_data(
        source=data_repo, rev=data_rev, data_dir=data_dir, min_images=min_images, **track
    )
    train = incremental_train(
        dataset=data.outputs["dataset"],
        base_model=base_model,
        settings=train_settings,
        replay=replay,
        embedder=embedder,
        embedder_seconds=embedder_seconds,
        processes=train_processes,
        **track,
    )
    train.set_caching_options(False)
    train.set_accelerator_type(train_accelerator_type)
    train.set_accelerator_limit(train_accelerator_limit)
    train.set_cpu_request(train_cpu_limit).set_cpu_limit(train_cpu_limit)
    train.set_memory_request(train_memory_limit).set_memory_limit(train_memory_limit)
    ev = evaluate_incremental(
        dataset=data.outputs["dataset"],
        model=train.outputs["model"],
        plan=train.outputs["plan"],
        num_beams=eval_beams,
        max_queries=max_queries,
        **track,
    )
    reg = register_incremental(
        model=train.outputs["model"],
        metrics_json=ev.outputs["metrics_json"],
        dataset=data.outputs["dataset"],
        plan=train.outputs["plan"],
        model_name=model_name,
        gate_metric=gate_metric,
        old_tolerance=old_tolerance,
        min_new_memorization=min_new_memorization,
        min_new_metric=min_new_metric,
        **track,
    )
    reg.set_caching_options(False)
    with_light_resources([data, ev, reg])
    with_retries([data, train, ev, reg])
    with_credentials([data, train, ev, reg], credentials_secret)
    return reg.outputs["Output"]


@dsl.pipeline(name="grace-incremental", description="GRACE: memorize newly added images.")
def incremental_pipeline(
    data_repo: str,
    data_rev: str = "HEAD",
    base_model: str = "models:/grace@champion",
    data_dir: str = "data",
    min_images: int = 1,
    train_settings: dict = {"epochs": 20, "lr": 5e-4, "warmup_steps": 10, "max_seconds": 180},
    replay: dict = {"minimum": 8},
    embedder: str = "dual-encoder",
    embedder_seconds: float = 60.0,
    eval_beams: int = 10,
    max_queries: int = 0,
    model_name: str = "grace",
    gate_metric: str = "grace_R@10",
    old_tolerance: float = 0.01,
    min_new_memorization: float = 0.9,
    min_new_metric: float = 0.0,
    tracking_uri: str = "",
    experiment: str = "grace",
    credentials_secret: str = DEFAULT_SECRET,
    train_accelerator_type: str = "nvidia.com/gpu",
    train_accelerator_limit: int = 0,
    train_processes: int = 1,
    train_cpu_limit: str = "4",
    train_memory_limit: str = "16G",
) -> bool:
    """Returns whether the updated model became ``champion`` (False when nothing changed)."""
    key = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    track = dict(tracking_uri=tracking_uri, experiment=experiment, pipeline_key=key)
    change = diff_data(
        data_repo=data_repo, data_rev=data_rev, data_dir=data_dir, base_model=base_model, **track
    )
    change.set_caching_options(False)  # "what changed" depends on the registry, not the inputs
    with_light_resources([change])
    with_retries([change])
    with_credentials([change], credentials_secret)
    with dsl.If(change.outputs["changes"] != 0, name="data-changed"):
        update = incremental_update(
            data_repo=data_repo,
            data_rev=data_rev,
            data_dir=data_dir,
            min_images=min_images,
            base_model=change.outputs["base_model"],  # pinned: the version the diff resolved
            train_settings=train_settings,
            replay=replay,
            embedder=embedder,
            embedder_seconds=embedder_seconds,
            eval_beams=eval_beams,
            max_queries=max_queries,
            model_name=model_name,
            gate_metric=gate_metric,
            old_tolerance=old_tolerance,
            min_new_memorization=min_new_memorization,
            min_new_metric=min_new_metric,
            train_accelerator_type=train_accelerator_type,
            train_accelerator_limit=train_accelerator_limit,
            train_processes=train_processes,
            train_cpu_limit=train_cpu_limit,
            train_memory_limit=train_memory_limit,
            credentials_secret=credentials_secret,
            **track,
        )
    with dsl.Else(name="data-unchanged"):
        skip = no_change(diff=change.outputs["diff"], **track)
        skip.set_caching_options(False)
        with_light_resources([skip])
        with_retries([skip])
        with_credentials([skip], credentials_secret)
    return dsl.OneOf(update.output, skip.output)
