"""training_pipeline: validate -> assign ids -> memorize -> retrieve -> evaluate -> register.

Only wiring: every step is a component around one ``grace.workflow.steps`` call. The data is named
by a git+DVC repository and a revision, so KFP caching and MLflow lineage key on it. Training steps
get the cluster resources given here (``kfp.local`` ignores them); ``train_processes`` > 1 trains
data-parallel in that many processes of the task, one per GPU (with a DeepSpeed config in the
settings).
"""

from kfp import dsl

from grace_kfp.components.assign_identifiers import assign_identifiers
from grace_kfp.components.evaluate import evaluate
from grace_kfp.components.memorize import memorize
from grace_kfp.components.register import register
from grace_kfp.components.retrieve import retrieve
from grace_kfp.components.validate_data import validate_data
from grace_kfp.pipelines.task_settings import (
    DEFAULT_SECRET,
    with_credentials,
    with_light_resources,
    with_retries,
)


@dsl.pipeline(name="grace-training", description="GRACE: memorize and retrieve an image set.")
def training_pipeline(
    data_repo: str,
    data_rev: str = "HEAD",
    data_dir: str = "data",
    min_images: int = 1,
    id_scheme: str = "structured",  # grace.constants.DEFAULT_ID_SCHEME (a test holds them equal)
    scheme_params: dict = {},
    embedder_seconds: float = 60.0,
    backbone: str = "lite",
    memorize_settings: dict = {"epochs": 40, "max_seconds": 180},
    retrieve_settings: dict = {"epochs": 40, "max_seconds": 180},
    eval_gallery: str = "all",
    eval_beams: int = 10,
    dense_seconds: float = 60.0,
    max_queries: int = 0,
    model_name: str = "grace",
    gate_metric: str = "grace_R@10",
    gate_tolerance: float = 0.01,
    min_memorization: float = 0.9,
    tracking_uri: str = "",
    experiment: str = "grace",
    credentials_secret: str = DEFAULT_SECRET,
    train_accelerator_type: str = "nvidia.com/gpu",
    train_accelerator_limit: int = 0,
    train_processes: int = 1,
    train_cpu_limit: str = "4",
    train_memory_limit: str = "16G",
) -> bool:
    """Returns whether the new model became ``champion``."""
    key = dsl.PIPELINE_JOB_ID_PLACEHOLDER
    track = dict(tracking_uri=tracking_uri, experiment=experiment, pipeline_key=key)
    data = validate_data(
        source=data_repo, rev=data_rev, data_dir=data_dir, min_images=min_images, **track
    )
    ids = assign_identifiers(
        dataset=data.outputs["dataset"],
        scheme=id_scheme,
        scheme_params=scheme_params,
        embedder_seconds=embedder_seconds,
        **track,
    )
    mem = memorize(
        dataset=data.outputs["dataset"],
        identifiers=ids.outputs["identifiers"],
        backbone=backbone,
        settings=memorize_settings,
        processes=train_processes,
        **track,
    )
    ret = retrieve(
        dataset=data.outputs["dataset"],
        identifiers=ids.outputs["identifiers"],
        memorized=mem.outputs["model"],
        settings=retrieve_settings,
        processes=train_processes,
        **track,
    )
    for task in (mem, ret):
        task.set_caching_options(False)
        task.set_accelerator_type(train_accelerator_type)
        task.set_accelerator_limit(train_accelerator_limit)
        task.set_cpu_request(train_cpu_limit).set_cpu_limit(train_cpu_limit)
        task.set_memory_request(train_memory_limit).set_memory_limit(train_memory_limit)
    ev = evaluate(
        dataset=data.outputs["dataset"],
        model=ret.outputs["model"],
        gallery=eval_gallery,
        num_beams=eval_beams,
        dense_seconds=dense_seconds,
        max_queries=max_queries,
        **track,
    )
    reg = register(
        model=ret.outputs["model"],
        metrics_json=ev.outputs["metrics_json"],
        dataset=data.outputs["dataset"],
        model_name=model_name,
        gate_metric=gate_metric,
        gate_tolerance=gate_tolerance,
        min_memorization=min_memorization,
        **track,
    )
    reg.set_caching_options(False)
    with_light_resources([data, ids, ev, reg])
    with_retries([data, ids, mem, ret, ev, reg])
    with_credentials([data, ids, mem, ret, ev, reg], credentials_secret)
    return reg.outputs["Output"]
