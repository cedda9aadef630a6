"""validate_data: the image set at a revision, checked by great-expectations; bad data stops."""

from kfp import dsl
from kfp.dsl import HTML, Artifact, Dataset, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def validate_data(
    source: str,
    rev: str,
    data_dir: str,
    min_images: int,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    dataset: Output[Dataset],
    report: Output[HTML],
    result: Output[Artifact],
) -> str:
    """Returns the data revision as a commit sha (what lineage and the registry record)."""
    from grace.workflow.steps import context, validate_data

    ctx = context(tracking_uri, experiment, pipeline_key)
    summary = validate_data(
        source,
        rev,
        dataset.path,
        report.path,
        result.path,
        data_dir=data_dir,
        min_images=min_images,
        ctx=ctx,
    )
    dataset.metadata.update(revision=summary["revision"], images=summary["images"])
    return summary["revision"]
