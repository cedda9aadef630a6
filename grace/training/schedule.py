"""The learning-rate schedule: linear warm-up, then a cosine decay that ends annealed.

The decay follows whichever budget runs out first, optimizer steps or ``max_seconds``, so a
run stopped by its wall-clock budget still ends at a low learning rate instead of its peak.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from grace.training.config import TrainConfig
from grace.training.examples import Example


def get_lr(step: int, total: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """The learning rate of one optimizer step (without decay the tiny model plateaus).

    Args:
        step: Optimizer steps taken so far (0 for the first step).
        total: Optimizer steps of the whole run (:func:`total_steps`).
        cfg: The run's settings: ``lr``, ``warmup_steps`` and ``max_seconds``.
        seconds: Training time spent so far, resumed runs included.

    Returns:
        The warm-up share of ``cfg.lr``, then its cosine decay to 0 over the steps or the
        seconds, whichever is further along.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.max_seconds:
        frac = max(frac, seconds / cfg.max_seconds)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def total_steps(examples: Sequence[Example], cfg: TrainConfig, extra_retrieve: int) -> int:
    """Optimizer steps of the whole run, known up front so the schedule ends annealed.

    Args:
        examples: One epoch's examples before any pseudo-queries (each batch holds one task,
            with or without images).
        cfg: The run's settings: ``batch_size``, ``epochs`` and ``pseudo_query_at``.
        extra_retrieve: Text-only retrieve examples the pseudo-queries add (0 for none).

    Returns:
        The steps of the epochs before the pseudo-queries plus those of the epochs after.
    """
    sizes: dict[tuple[str, bool], int] = {}
    for ex in examples:
        key = (ex.task, ex.image is not None)
        sizes[key] = sizes.get(key, 0) + 1

    def per_epoch(s: dict[tuple[str, bool], int]) -> int:
        return sum(math.ceil(n / cfg.batch_size) for n in s.values())

    before = per_epoch(sizes)
    sizes[("retrieve", False)] = sizes.get(("retrieve", False), 0) + extra_retrieve
    after = per_epoch(sizes)
    # the epoch whose start reaches pseudo_query_at (a time budget may reach it sooner)
    pseudo_epoch = min(math.ceil(cfg.pseudo_query_at * cfg.epochs - 1e-9), cfg.epochs)
    pseudo_epoch = pseudo_epoch if extra_retrieve else cfg.epochs
    return before * pseudo_epoch + after * (cfg.epochs - pseudo_epoch)


def time_share(cfg: TrainConfig, seconds: float) -> float:
    """How much of the wall-clock budget ``seconds`` of training used.

    Args:
        cfg: The run's settings: ``max_seconds`` (``None`` or 0: no time budget).
        seconds: Training time spent so far, resumed runs included.

    Returns:
        ``seconds / cfg.max_seconds``, or 0.0 without a time budget.
    """
    return seconds / cfg.max_seconds if cfg.max_seconds else 0.0
