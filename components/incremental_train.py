"""incremental_train: the base model's ids extended/retired, training continued on new images."""

from kfp import dsl
from kfp.dsl import Artifact, Dataset, Input, Model, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def incremental_train(
    dataset: Input[Dataset],
    base_model: str,
    settings: dict,
    replay: dict,
    embedder: str,
    embedder_seconds: float,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    model: Output[Model],
    plan: Output[Artifact],
    processes: int = 1,
):
    """Extend the base model's identifiers and continue its training on the new images.

    ``settings`` are TrainConfig fields; ``replay`` ReplayConfig fields (ratio, minimum, seed,
    only_new_ids, all_old_negatives, rows_training; unset ones chosen for the base's ids);
    ``processes`` data-parallel training processes, one per GPU (needs ``deepspeed``).
    """
    from grace.workflow.steps import context, incremental_train

    summary = incremental_train(
        dataset.path,
        base_model,
        model.path,
        plan.path,
        settings=settings,
        replay=replay,
        embedder=embedder,
        embedder_seconds=embedder_seconds,
        processes=processes,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    model.metadata.update(stage="incremental", base_model=base_model, **summary)
