"""retrieve: learning to retrieve (query -> identifier), continuing from the memorized model."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def retrieve(
    dataset: Input[Dataset],
    identifiers: Input[Artifact],
    memorized: Input[Model],
    settings: dict,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    model: Output[Model],
    processes: int = 1,
):
    """Learn to retrieve (query -> identifier), continuing from the memorized model.

    ``settings`` are TrainConfig fields (epochs, max_seconds, lr, deepspeed, ...); ``processes``
    data-parallel training processes in this task, one per GPU (needs ``deepspeed``).
    """
    from grace.workflow.steps import context, retrieve

    summary = retrieve(
        dataset.path,
        identifiers.path,
        memorized.path,
        model.path,
        settings=settings,
        processes=processes,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    model.metadata.update(stage="retrieve", **summary)
