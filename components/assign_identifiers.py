"""assign_identifiers: one identifier per image, of the chosen scheme."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def assign_identifiers(
    dataset: Input[Dataset],
    scheme: str,
    scheme_params: dict,
    embedder_seconds: float,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    identifiers: Output[Artifact],
):
    """Assign identifiers of ``scheme`` (with ``scheme_params``) to the validated set's images."""
    from grace.workflow.steps import assign_identifiers, context

    stats = assign_identifiers(
        dataset.path,
        identifiers.path,
        scheme=scheme,
        params=scheme_params,
        embedder_seconds=embedder_seconds,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    identifiers.metadata.update(scheme=scheme, identifiers=stats["identifiers"])
