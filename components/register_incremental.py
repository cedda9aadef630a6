"""register_incremental: a model version linked to its base; champion only through the gate.

The incremental gate: new images memorized, old-image recall within tolerance of the base.
"""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def register_incremental(
    model: Input[Model],
    metrics_json: Input[Artifact],
    dataset: Input[Dataset],
    plan: Input[Artifact],
    model_name: str,
    gate_metric: str,
    old_tolerance: float,
    min_new_memorization: float,
    min_new_metric: float,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    decision: Output[Artifact],
) -> bool:
    """Returns whether ``champion`` moved; the decision artifact says why."""
    from grace.workflow.model_registry import IncrementalGate
    from grace.workflow.steps import context, register_incremental

    gate = IncrementalGate(
        metric=gate_metric,
        old_tolerance=old_tolerance,
        min_new_memorization=min_new_memorization,
        min_new_metric=min_new_metric,
    )
    outcome = register_incremental(
        model.path,
        metrics_json.path,
        dataset.path,
        plan.path,
        decision.path,
        model_name=model_name,
        gate=gate,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    decision.metadata.update(version=outcome["version"], promoted=outcome["promoted"])
    print(f"model {model_name} v{outcome['version']}: " + "; ".join(outcome["reasons"]))
    return outcome["promoted"]
