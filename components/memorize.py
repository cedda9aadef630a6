"""memorize: learning to memorize (image -> identifier), from the backbone."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def memorize(
    dataset: Input[Dataset],
    identifiers: Input[Artifact],
    backbone: str,
    settings: dict,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    model: Output[Model],
    processes: int = 1,
):
    """Learn to memorize (image -> identifier), starting from the backbone.

    ``settings`` are TrainConfig fields (epochs, max_seconds, lr, deepspeed, ...); ``processes``
    data-parallel training processes in this task, one per GPU (needs ``deepspeed``).
    """
    from grace.workflow.steps import context, memorize

    summary = memorize(
        dataset.path,
        identifiers.path,
        model.path,
        backbone=backbone,
        settings=settings,
        processes=processes,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    model.metadata.update(stage="memorize", **summary)
