"""register: an MLflow model version, alias challenger; champion only through the gate."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def register(
    model: Input[Model],
    metrics_json: Input[Artifact],
    dataset: Input[Dataset],
    model_name: str,
    gate_metric: str,
    gate_tolerance: float,
    min_memorization: float,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    decision: Output[Artifact],
) -> bool:
    """Returns whether ``champion`` moved; the decision artifact says why."""
    from grace.workflow.model_registry import Gate
    from grace.workflow.steps import context, register

    gate = Gate(metric=gate_metric, tolerance=gate_tolerance, min_memorization=min_memorization)
    outcome = register(
        model.path,
        metrics_json.path,
        dataset.path,
        decision.path,
        model_name=model_name,
        gate=gate,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    decision.metadata.update(version=outcome["version"], promoted=outcome["promoted"])
    print(f"model {model_name} v{outcome['version']}: " + "; ".join(outcome["reasons"]))
    return outcome["promoted"]
