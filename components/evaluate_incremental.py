"""evaluate_incremental: old-image and new-image recall side by side, and the base's on old."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def evaluate_incremental(
    dataset: Input[Dataset],
    model: Input[Model],
    plan: Input[Artifact],
    num_beams: int,
    max_queries: int,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    metrics: Output[Metrics],
    metrics_json: Output[Artifact],
    report: Output[HTML],
):
    """``max_queries`` 0 evaluates every held-out query (of old and of new images each)."""
    from grace.workflow.steps import context, evaluate_incremental

    values = evaluate_incremental(
        dataset.path,
        model.path,
        plan.path,
        metrics_json.path,
        report.path,
        num_beams=num_beams,
        max_queries=max_queries or None,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
