"""Learning to memorize and to retrieve: :func:`train` runs the loop here or launches ranks.

The loop (:mod:`grace.training.loop`) runs one process or one rank; the launcher
(:mod:`grace.training.distributed`) takes the loop as its per-rank entry, so neither imports the
other.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from grace.training.config import TrainConfig
from grace.training.distributed import MetricsCallback, launch_training, rank_and_world

if TYPE_CHECKING:
    from grace.data.records import ImageRecord
    from grace.identifiers import IdentifierMap
    from grace.retrieval.retriever import GraceRetriever

__all__ = ["MetricsCallback", "TrainConfig", "train"]


def train(
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    id_map: IdentifierMap,
    out: str | os.PathLike,
    config: TrainConfig | None = None,
    callback: MetricsCallback | None = None,
    progress: bool = True,
    stop_after_steps: int | None = None,
    negatives: Sequence[ImageRecord] = (),
) -> GraceRetriever:
    """Train GRACE on an image set and its identifiers; resume from ``out`` if a run is there.

    With ``config.processes`` > 1 and no launched world yet, starts that many data-parallel
    ranks, each running :func:`~grace.training.loop.train_loop`; otherwise runs the loop in this
    process (one rank of an outside launcher's world, or the whole run).

    Args:
        records: The image set's records; only those with a live identifier are trained.
        root: The image set's folder (image paths are relative to it).
        id_map: Identifiers of the images.
        out: Run folder: ``init/``, ``checkpoints/`` and the trained ``model/``.
        config: Training settings (defaults: :class:`TrainConfig`).
        callback: Called with ``(step, metrics)`` after each logged step (rank 0's).
        progress: Show a progress bar when stderr is a terminal.
        stop_after_steps: End early after writing a checkpoint (a one-process test hook).
        negatives: Old images whose answers the trained rows must not take (incremental).

    Returns:
        The trained retriever, as saved under ``out/model``.
    """
    from grace.training.loop import train_loop  # here: importing the settings stays light

    cfg = config or TrainConfig()
    if cfg.processes > 1 and rank_and_world()[1] == 1:  # not inside a launched world: start one
        if stop_after_steps is not None:
            raise ValueError("stop_after_steps is a one-process test hook (processes=1)")
        return launch_training(
            train_loop, records, root, id_map, out, cfg, callback, progress, negatives
        )
    return train_loop(
        records, root, id_map, out, cfg, callback, progress, stop_after_steps, negatives
    )
