"""Training progress in a log: a line every ~10 s, counting down by the rule that stops the run."""

from __future__ import annotations

import io
import re

import pytest

from grace.data.synth import synthesize
from grace.identifiers import assign_identifiers
from grace.training import progress, train
from grace.training.config import TrainConfig
from grace.training.progress import ProgressLog, time_left


def test_time_left_follows_whichever_rule_stops_the_run_first():
    # 10 steps in 5 s, 90 left: 45 s by steps
    assert time_left(90, 10, 5.0, 5.0, None) == (pytest.approx(45.0), "steps")
    assert time_left(90, 10, 5.0, 5.0, 600.0) == (pytest.approx(45.0), "steps")
    # a 60 s budget with 30 s spent before a resume and 5 s now: 25 s, by the budget
    assert time_left(90, 10, 5.0, 35.0, 60.0) == (pytest.approx(25.0), "time budget")
    assert time_left(90, 10, 5.0, 70.0, 60.0) == (0.0, "time budget")


def test_a_line_per_interval_with_the_mean_loss_of_the_interval():
    out = io.StringIO()
    log = ProgressLog(True, every=0.0, stream=out)
    log.step(5, 100, 2.0, 31.5, (75.0, "time budget"))
    assert out.getvalue() == (
        "grace train: step 5/100, 31.5 examples/s, loss 2.0000, 1:15 left (time budget)\n"
    )
    quiet = io.StringIO()
    ProgressLog(False, every=0.0, stream=quiet).step(1, 2, 1.0, 1.0, (1.0, "steps"))
    assert quiet.getvalue() == ""


def test_training_in_a_log_prints_progress_lines(small_backbone, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(progress, "PROGRESS_EVERY_S", 0.0)
    records = synthesize(tmp_path / "d", n=4, seed=5)
    cfg = TrainConfig(
        backbone="tiny", tiny=small_backbone, epochs=2, batch_size=2, checkpoint_every=0,
        max_seconds=600.0,
    )  # fmt: skip
    train(records, tmp_path / "d", assign_identifiers(records, "numeric"), tmp_path / "r", cfg)
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("grace train:")]
    pattern = (
        r"grace train: step (\d+)/(\d+), [\d.]+ examples/s, loss [\d.]+, [\d:]+ left \(steps\)"
    )
    steps = [int(re.fullmatch(pattern, x).group(1)) for x in lines]
    assert (
        steps
        and steps == sorted(steps)
        and steps[-1] == int(re.fullmatch(pattern, lines[-1]).group(2))
    )
