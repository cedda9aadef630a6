"""Training progress where no bar can be drawn: a line every ~10 s in a log (a pod, a pipeline).

On a terminal tqdm draws the bar; in a log its updates would be noise, so the loop writes one line
at most every ``every`` seconds instead: step, examples per second, the mean loss since the last
line and the time left by the rule that will actually stop the run (its step count or its time
budget, whichever comes first).
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

PROGRESS_EVERY_S = 10.0


def time_left(
    steps_left: int,
    steps_this_run: int,
    seconds_this_run: float,
    seconds_so_far: float,
    max_seconds: float | None,
) -> tuple[float, str]:
    """Seconds until the run stops, and which rule stops it (``"steps"`` or ``"time budget"``).

    Args:
        steps_left: Steps the plan still has.
        steps_this_run: Steps this process has taken (with ``seconds_this_run``, the rate).
        seconds_this_run: Seconds this process has trained.
        seconds_so_far: Training seconds including any run before a resume (the budget's clock).
        max_seconds: The time budget, or None.
    """
    rate = steps_this_run / max(seconds_this_run, 1e-9)
    by_steps = max(steps_left, 0) / max(rate, 1e-9)
    if max_seconds is not None and max_seconds - seconds_so_far < by_steps:
        return max(max_seconds - seconds_so_far, 0.0), "time budget"
    return by_steps, "steps"


def _clock(seconds: float) -> str:
    minutes, s = divmod(int(round(seconds)), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{s:02d}" if minutes >= 60 else f"{minutes}:{s:02d}"


class ProgressLog:
    """Writes a progress line at most every ``every`` seconds; silent on a terminal (tqdm's)."""

    def __init__(
        self, enabled: bool, every: float | None = None, stream: TextIO | None = None
    ) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled and not self.stream.isatty()
        self.every = PROGRESS_EVERY_S if every is None else every
        self.last = time.perf_counter()
        self.losses: list[float] = []

    def step(
        self,
        step: int,
        total: int,
        loss: float,
        examples_per_s: float,
        left: tuple[float, str],
    ) -> None:
        """Record one step; write a line if ``every`` seconds passed since the last one."""
        if not self.enabled:
            return
        self.losses.append(loss)
        now = time.perf_counter()
        if now - self.last < self.every:
            return
        mean = sum(self.losses) / len(self.losses)
        seconds, rule = left
        print(
            f"grace train: step {step}/{total}, {examples_per_s:.1f} examples/s, "
            f"loss {mean:.4f}, {_clock(seconds)} left ({rule})",
            file=self.stream,
            flush=True,
        )
        self.last, self.losses = now, []
