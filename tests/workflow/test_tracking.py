"""What the workflow records in MLflow holds no credentials, whatever a caller passes."""

from __future__ import annotations

import mlflow
import pytest
from mlflow import MlflowClient

from grace.workflow.tracking import experiment_id, local_store, step_run


@pytest.fixture
def restored_tracking(monkeypatch):
    """experiment_id points MLflow at the store; later tests must not inherit it."""
    previous = mlflow.get_tracking_uri()
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    yield
    mlflow.set_tracking_uri(previous)


@pytest.mark.usefixtures("restored_tracking")
def test_params_and_tags_are_redacted_before_they_reach_mlflow(tmp_path):
    tracking = local_store(tmp_path / "mlflow", experiment="creds")
    experiment_id(tracking)
    params = {
        "source": "https://ghp_s3cret@github.com/team/images.git",
        "settings": {"remote": "http://key:s3cret@minio:9000"},
    }
    with step_run(tracking, "p1", "validate_data", params) as run:
        run.set_tags({"data.source": params["source"]}, on_parent=True)
    client = MlflowClient(tracking.uri)
    step, parent = client.get_run(run.run_id), client.get_run(run.parent_id)
    recorded = {**step.data.params, **parent.data.tags}
    assert "s3cret" not in repr(recorded)
    assert step.data.params["source"] == "https://***@github.com/team/images.git"
    assert parent.data.tags["data.source"] == "https://***@github.com/team/images.git"
    kind = client.get_experiment(step.info.experiment_id).tags["mlflow.experimentKind"]
    assert kind == "custom_model_development"  # the UI opens runs, not GenAI traces


class _Recorder:
    def __init__(self):
        self.points = []

    def log_metrics(self, metrics, step=None):
        self.points.append((step, metrics))


def test_training_curves_log_the_mean_loss_of_each_window_not_one_batch():
    from grace.workflow.tracking import MetricsLogger

    run = _Recorder()
    logger = MetricsLogger(run, every=4)
    for step in range(1, 11):
        task = "memorize" if step % 2 else "retrieve"
        logger(step, {"loss": float(step), f"loss_{task}": float(step), "lr": step / 100})
    logger.flush()
    assert [s for s, _ in run.points] == [1, 4, 8, 10]
    _, at8 = run.points[2]  # steps 5..8
    assert at8["loss"] == 6.5 and at8["loss_memorize"] == 6.0 and at8["loss_retrieve"] == 7.0
    assert at8["lr"] == 0.08  # as of the last step
    assert run.points[3][1]["loss"] == 9.5
