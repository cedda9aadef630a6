"""``make demo`` shows the pipeline's steps live while their noise stays in the log."""

from __future__ import annotations

import io
import threading
import time

from grace_kfp.pipelines.demo import following

KFP_LOG = [
    "23:47:49.253 - INFO - Running pipeline: 'grace-training'\n",
    "23:47:49.259 - INFO - Executing task 'validate-data'\n",
    "    [KFP Executor 2026-12-07 INFO]: Skipping registering function DataSourceManager._x\n",
    "23:48:04.707 - INFO - Task 'validate-data' finished with status SUCCESS\n",
    "23:48:04.710 - INFO - Executing task 'memorize'\n",
    "grace train: step 10/800, 31.2 examples/s, loss 2.1000, 1:50 left (time budget)\n",
    "grace train: step 20/800, 31.5 examples/s, loss 1.9000, 1:40 left (time budget)\n",
    "23:51:01.042 - INFO - Task 'memorize' finished with status FAILURE\n",
]


def test_the_demo_echoes_step_milestones_and_progress_but_not_the_noise(tmp_path):
    log = tmp_path / "pipeline.log"
    log.write_text("an earlier run's line: Executing task 'old'\n")
    terminal = io.StringIO()

    def pipeline() -> None:  # writes as the tasks would, while the demo follows
        with open(log, "a") as f:
            for line in KFP_LOG:
                f.write(line)
                f.flush()
                time.sleep(0.02)

    with following(log, terminal, poll=0.01, progress_every=0.0):
        writer = threading.Thread(target=pipeline)
        writer.start()
        writer.join()
    shown = terminal.getvalue().splitlines()
    assert [line.split(" in ")[0] for line in shown] == [
        "   validate-data ...",
        "   validate-data success",
        "   memorize ...",
        "     memorize: step 10/800, 31.2 examples/s, loss 2.1000, 1:50 left (time budget)",
        "     memorize: step 20/800, 31.5 examples/s, loss 1.9000, 1:40 left (time budget)",
        "   memorize failure",
    ]
    assert shown[1].endswith(" s")
