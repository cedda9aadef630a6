"""diff_data: what changed in the data since the base model's revision (no image downloaded)."""

from typing import NamedTuple

from kfp import dsl
from kfp.dsl import Artifact, Output

from grace_kfp.components import GRACE_IMAGE


@dsl.component(base_image=GRACE_IMAGE, install_kfp_package=False)
def diff_data(
    data_repo: str,
    data_rev: str,
    data_dir: str,
    base_model: str,
    tracking_uri: str,
    experiment: str,
    pipeline_key: str,
    diff: Output[Artifact],
) -> NamedTuple("DiffOutputs", changes=int, base_model=str):
    """Compare the data at ``data_rev`` with the base model's data revision.

    Returns:
        ``changes``: images added + removed + modified (0: nothing to do; -1: unknown);
        ``base_model``: the base pinned to its version (``models:/NAME/VERSION``).
    """
    from collections import namedtuple

    from grace.workflow.steps import context, diff_data

    found = diff_data(
        data_repo,
        data_rev,
        base_model,
        diff.path,
        data_dir=data_dir,
        ctx=context(tracking_uri, experiment, pipeline_key),
    )
    diff.metadata.update(changes=found["changes"], base_model=found["base_model"])
    return namedtuple("DiffOutputs", ["changes", "base_model"])(
        found["changes"], found["base_model"]
    )
