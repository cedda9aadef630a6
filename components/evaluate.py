"""evaluate: Recall@K on held-out queries, memorization, latency, beside the dense baseline."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Input, Metrics, Model, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def evaluate(
    dataset: Input[Dataset],
    model: Input[Model],
    gallery: str,
    num_beams: int,
    dense_seconds: float,
    max_queries: int,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    metrics: Output[Metrics],
    metrics_json: Output[Artifact],
    report: Output[HTML],
):
    """``max_queries`` 0 evaluates every held-out query."""
    from grace.workflow.steps import context, evaluate

    values = evaluate(
        dataset.path,
        model.path,
        metrics_json.path,
        report.path,
        gallery=gallery,
        num_beams=num_beams,
        dense_seconds=dense_seconds,
        max_queries=max_queries or None,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    for name, value in values.items():
        metrics.log_metric(name, value)
