"""The steps of the two workflows, as plain functions over folders and files.

Each KFP component (``components/``) moves its artifacts in and out of exactly one of these, and
the CLI can call them too, so the same code runs from a shell, from ``kfp.local`` and on a
cluster. Every step is one nested MLflow run under the pipeline's parent run (see
:mod:`grace.workflow.tracking`) and writes its outputs atomically: a failed step leaves no
half-written artifact behind.
"""

from grace.workflow.steps.common import MANIFEST, REVISION_FILE, StepContext, context
from grace.workflow.steps.incremental import (
    BASE_TAG,
    diff_data,
    evaluate_incremental,
    incremental_train,
    no_change,
    register_incremental,
)
from grace.workflow.steps.training import (
    assign_identifiers,
    evaluate,
    memorize,
    register,
    retrieve,
    validate_data,
)

__all__ = [
    "BASE_TAG",
    "MANIFEST",
    "REVISION_FILE",
    "StepContext",
    "assign_identifiers",
    "context",
    "diff_data",
    "evaluate",
    "evaluate_incremental",
    "incremental_train",
    "memorize",
    "no_change",
    "register",
    "register_incremental",
    "retrieve",
    "validate_data",
]
