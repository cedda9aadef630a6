"""Credentials reach a pipeline's pods from a Kubernetes Secret, never from its parameters.

KFP prints a task's parameters in its logs and keeps them in the run's spec, so a token given as
a parameter is a token leaked (``pipeline_arguments`` refuses one). Each task instead gets these
environment variables from the Secret named by the pipeline's ``credentials_secret`` parameter;
every key is optional, so a cluster that needs none of them (or only S3) runs as it is.
"""

from __future__ import annotations

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
