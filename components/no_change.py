"""no_change: the end of an incremental run whose data did not change (nothing trained)."""

from kfp import dsl
from kfp.dsl import Artifact, Input

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def no_change(
    diff: Input[Artifact],
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
) -> bool:
    """Returns False: no new model, ``champion`` unchanged."""
    from grace.workflow.steps import context, no_change

    return no_change(diff.path, ctx=context(tracking_uri, experiment, pipeline_key))
