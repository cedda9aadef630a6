"""What every task of a pipeline gets from the cluster: credentials, resources and retries.

Credentials reach the pods from a Kubernetes Secret, never from parameters: KFP prints a task's
parameters in its logs and keeps them in the run's spec, so a token given as a parameter is a
token leaked (``pipeline_arguments`` refuses one). Each task gets these environment variables
from the Secret named by the pipeline's ``credentials_secret`` parameter; every key is optional,
so a cluster that needs none of them (or only S3) runs as it is.

Every task also requests what it needs (a task without requests runs BestEffort, first to be
evicted) and retries: steps talk to git, S3 and MLflow, whose hiccups a retry waits out (a
retried pod starts its step over). ``kfp.local`` ignores the Secret and the resources, and
``run_local`` lifts the retries.
"""

from __future__ import annotations

from dataclasses import dataclass

from kfp import kubernetes

from grace.credentials import GIT_TOKEN_ENV, GIT_USER_ENV

DEFAULT_SECRET = "grace-credentials"
# Secret key -> environment variable of the same name: what boto3 (the DVC remote, MLflow's S3
# artifacts), the MLflow client and grace.credentials.with_git_token read.
CREDENTIAL_ENV = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN",
    GIT_TOKEN_ENV,
    GIT_USER_ENV,
)


@dataclass(frozen=True)
class Retries:
    """KFP's retry policy of every task: a flaky service gets a few minutes to come back."""

    num_retries: int = 2
    backoff_duration: str = "30s"
    backoff_factor: float = 2.0
    backoff_max_duration: str = "600s"


# The steps that do not train: validation, id assignment (a dual encoder of a minute), evaluation
# and registration. Training steps take theirs from pipeline parameters.
LIGHT_CPU = ("1", "2")  # request, limit
LIGHT_MEMORY = ("2G", "8G")


def with_credentials(tasks, secret_name) -> None:
    """Give every task the credential variables from ``secret_name`` (keys may be absent).

    Args:
        tasks: The pipeline's tasks.
        secret_name: The Secret's name: a pipeline parameter, so each run may name its own.
    """
    for task in tasks:
        kubernetes.use_secret_as_env(
            task, secret_name, {k: k for k in CREDENTIAL_ENV}, optional=True
        )


def with_light_resources(tasks) -> None:
    """Requests and limits of the steps that do not train.

    Args:
        tasks: Those steps' tasks.
    """
    for task in tasks:
        task.set_cpu_request(LIGHT_CPU[0]).set_cpu_limit(LIGHT_CPU[1])
        task.set_memory_request(LIGHT_MEMORY[0]).set_memory_limit(LIGHT_MEMORY[1])


def with_retries(tasks, retries: Retries = Retries()) -> None:
    """The same retry policy on every task (``run_local`` runs without it).

    Args:
        tasks: The pipeline's tasks.
        retries: The policy.
    """
    for task in tasks:
        task.set_retry(
            num_retries=retries.num_retries,
            backoff_duration=retries.backoff_duration,
            backoff_factor=retries.backoff_factor,
            backoff_max_duration=retries.backoff_max_duration,
        )
