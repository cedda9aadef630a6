"""Data-parallel training in N processes on one machine (one per GPU), from a plain call.

``TrainConfig.processes = N`` makes :func:`grace.training.train` start N copies of itself
through torch's elastic launcher (what ``torchrun --standalone`` runs) and wait for them, so the
CLI, a KFP task holding N GPUs and the incremental update all get multi-GPU training from the same
setting. Each rank builds the same model, takes its share of every global batch
(:func:`shard`), and DeepSpeed averages the gradients, so N processes follow the same optimizer
path as one process with the whole batch. Rank 0 writes the model; its metrics (the loss
averaged over ranks) reach the caller's callback while the run goes on.

A run started by an outside launcher (``deepspeed --num_gpus N``, ``torchrun``, a Kubeflow
Trainer TrainJob) already has ``RANK``/``WORLD_SIZE`` set: then ``train`` runs as that rank. (A
world of one, as :func:`grace.training.engine.ensure_dist_env` sets up for in-process DeepSpeed,
is not a launch: ``processes`` > 1 still starts its ranks.)
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from grace.errors import GraceError

if TYPE_CHECKING:
    from grace.data.records import ImageRecord
    from grace.identifiers import IdentifierMap
    from grace.retrieval.retriever import GraceRetriever
    from grace.training.config import TrainConfig

T = TypeVar("T")
MetricsCallback = Callable[[int, dict[str, float]], None]
"""Called with ``(step, metrics)`` as training goes; ranks relay rank 0's to the caller."""


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the world size a launcher set (0 and 1 without one)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def shard(batch: Sequence[T], rank: int, world: int) -> list[T]:
    """Rank ``rank``'s share of a global batch: every ``world``-th item from ``rank`` on.

    Shares are disjoint, cover the batch, and differ in size by at most one. A batch smaller
    than the world (an epoch's last) gives the ranks left without an item one item again, so
    every rank has work for the collective backward.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside a world of {world}")
    if not batch:
        raise ValueError("cannot shard an empty batch")
    mine = list(batch[rank::world])
    return mine or [batch[rank % len(batch)]]


def launch_training(
    entry: Callable[..., Any],
    records: Sequence[ImageRecord],
    root: str | os.PathLike,
    id_map: IdentifierMap,
    out: str | os.PathLike,
    config: TrainConfig,
    callback: MetricsCallback | None = None,
    progress: bool = True,
    negatives: Sequence[ImageRecord] = (),
) -> GraceRetriever:
    """Run ``entry`` in ``config.processes`` local processes; return the model rank 0 saved.

    ``entry`` is the per-rank training function (:func:`grace.training.loop.train_loop`),
    passed in so that this launcher never imports the loop that calls it.

    Needs a DeepSpeed config (``config.deepspeed``): DeepSpeed does the gradient all-reduce
    (gloo on CPU, nccl on GPUs). A rank that fails stops the others and raises here.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from grace.retrieval.retriever import GraceRetriever

    if config.deepspeed is None:
        raise GraceError(
            f"processes={config.processes} needs a DeepSpeed config for the gradient all-reduce:"
            " set deepspeed=configs/deepspeed/zero2.json (or zero3.json)"
        )
    launch = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=config.processes,
        run_id=str(uuid.uuid4()),
        rdzv_backend="c10d",  # torchrun --standalone: a TCP store on a free local port
        rdzv_endpoint="localhost:0",
        max_restarts=0,  # a failed rank is a failed run: resuming is the caller's decision
        monitor_interval=0.5,
    )
    # the spawned ranks inherit this process's authkey, so they can use the manager's queue
    with multiprocessing.Manager() as manager:
        queue = relay = None
        if callback is not None:
            queue = manager.Queue()
            relay = threading.Thread(target=_relay, args=(queue, callback), daemon=True)
            relay.start()
        try:
            elastic_launch(launch, _rank_main)(
                entry,
                list(records),
                os.fspath(root),
                id_map,
                os.fspath(out),
                config,
                queue,
                progress,
                list(negatives),
            )
        except ChildFailedError as e:
            raise GraceError(f"distributed training failed: {e.format_msg()}") from e
        finally:
            if relay is not None:
                queue.put(None)
                relay.join()
    return GraceRetriever.load(Path(out) / "model")


def _rank_main(
    entry: Callable[..., Any],
    records: list[ImageRecord],
    root: str,
    id_map: IdentifierMap,
    out: str,
    config: TrainConfig,
    queue: Any,
    progress: bool,
    negatives: list[ImageRecord],
) -> None:
    """One rank: the ordinary training loop, which reads its rank from the launcher's env."""
    rank, _ = rank_and_world()
    callback = None
    if queue is not None and rank == 0:

        def callback(step: int, metrics: dict[str, float]) -> None:
            queue.put((step, metrics))

    entry(
        records,
        root,
        id_map,
        out,
        config,
        callback,
        progress=progress and rank == 0,
        negatives=negatives,
    )


def _relay(queue: Any, callback: MetricsCallback) -> None:
    """Hand rank 0's metrics to the caller's callback in this process, in step order."""
    while (item := queue.get()) is not None:
        callback(*item)
