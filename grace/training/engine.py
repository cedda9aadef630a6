"""One training-step API for a plain PyTorch loop, with or without DeepSpeed ZeRO.

A nanoGPT-style loop (forward, loss, backward, clip, step, its own lr schedule) calls the same
methods either way, so ``--deepspeed ds_config.json`` changes no loop code::

    engine = make_engine(model, param_groups, lr, ds_config_path, grad_clip=1.0, bf16=True)
    for step in ...:
        engine.set_lr(lr_at(step))
        with engine.autocast():
            loss = loss_fn(engine.model(batch.to(engine.device)))
        engine.backward(loss)
        engine.step()
    state = engine.state_dict_for_save()  # collective under ZeRO-3; a dict on rank 0 only

Both paths train with the same ``torch.optim.AdamW`` built from the loop's param groups (DeepSpeed
gets it as a client optimizer factory unless the json has its own ``"optimizer"`` section), so
on one process in fp32 they do the same math and no DeepSpeed optimizer kernel is JIT-compiled.
DeepSpeed is imported only when a config is given: it is heavy and optional at run time.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import socket
from abc import ABC, abstractmethod
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from grace.atomic_io import write_with

log = logging.getLogger(__name__)

ParamGroups = Iterable[torch.nn.Parameter] | Iterable[dict[str, Any]]

# A launcher (deepspeed, torchrun, mpirun) sets at least one of these; we then leave the env alone.
_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
_PLAIN_CKPT = "plain_state.pt"
_CLIENT_KEY = "grace_client_state"


class TrainEngine(ABC):
    """The loop-facing API; :func:`make_engine` returns one of its two implementations."""

    model: torch.nn.Module  # call forward on this (the DeepSpeed engine wraps the module)
    module: torch.nn.Module  # the unwrapped module (config, custom methods, eval)
    optimizer: torch.optim.Optimizer
    bf16: bool

    @property
    @abstractmethod
    def is_main(self) -> bool:
        """Whether this process is rank 0: the one that logs and writes single-copy artifacts."""
        ...

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where the loop should put its batches."""
        ...

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """bf16 autocast around forward and loss, so fp32 inputs meet bf16 weights safely."""
        if not self.bf16:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=torch.bfloat16)

    def set_lr(self, lr: float) -> None:
        """Set every param group's lr: the loop owns the schedule (warm-up, cosine, time budget)."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None: ...

    @abstractmethod
    def step(self) -> float | None:
        """Clip, step the optimizer and zero the grads; return the pre-clip grad norm if known."""
        ...

    @abstractmethod
    def state_dict_for_save(self) -> dict[str, torch.Tensor] | None:
        """Full model weights on CPU on the main rank, ``None`` elsewhere (call on every rank).

        Tensors already on CPU are the live weights, not copies: save them, or clone to keep.
        In DeepSpeed bf16 mode they are bf16 (the fp32 master copy is in the checkpoint).
        """
        ...

    @abstractmethod
    def save_checkpoint(
        self, ckpt_dir: str | Path, client_state: dict[str, Any] | None = None
    ) -> None:
        """Save weights, optimizer state and ``client_state`` (step, RNG...) for resuming."""
        ...

    @abstractmethod
    def load_checkpoint(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Restore what :meth:`save_checkpoint` wrote; return its ``client_state``."""
        ...

    def barrier(self) -> None:
        """Wait for every rank (e.g. around a checkpoint that all ranks write into one folder).

        One process (the plain engine) has no one to wait for.
        """
        return None

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        """A scalar (e.g. the loss of this rank's share) averaged over all ranks; collective."""
        return float(value.detach())


def _adamw(
    params: ParamGroups, lr: float, betas: tuple[float, float], eps: float, weight_decay: float
) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)


class DenseAndSparseAdam:
    """``AdamW`` for the dense parameters and ``SparseAdam`` for those with sparse gradients.

    A group marked ``"sparse": True`` (identifier rows, :mod:`grace.models.lite.identifier_table`)
    goes to ``torch.optim.SparseAdam``, the lazy Adam that updates only the rows a step's
    gradient names (and their moments): a dense AdamW would update every row of an N-row
    table at every step, an O(N) step. The two optimizers are stepped, zeroed and saved
    together; ``param_groups`` lists both's groups, so a learning-rate schedule sets both.
    """

    def __init__(
        self, groups: list[dict[str, Any]], lr: float, betas: tuple[float, float], eps: float,
        weight_decay: float,
    ) -> None:  # fmt: skip
        dense = [
            {k: v for k, v in g.items() if k != "sparse"} for g in groups if not g.get("sparse")
        ]
        sparse = [{"params": g["params"]} for g in groups if g.get("sparse")]
        self.dense = _adamw(dense, lr, betas, eps, weight_decay) if dense else None
        self.sparse = (
            torch.optim.SparseAdam(sparse, lr=lr, betas=betas, eps=eps) if sparse else None
        )

    @property
    def _parts(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.dense, self.sparse) if o is not None]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for o in self._parts for g in o.param_groups]

    def step(self) -> None:
        for o in self._parts:
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self._parts:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"dense": _state(self.dense), "sparse": _state(self.sparse)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "dense" not in state:  # a checkpoint of the single AdamW of before
            state = {"dense": state, "sparse": None}
        for o, s in ((self.dense, state["dense"]), (self.sparse, state["sparse"])):
            if (o is None) != (s is None):
                raise ValueError("the checkpoint's optimizer does not match these parameters")
            if o is not None:
                o.load_state_dict(s)


def _state(o: torch.optim.Optimizer | None) -> dict[str, Any] | None:
    return None if o is None else o.state_dict()


@torch.no_grad()
def clip_grad_norm(params: list[torch.nn.Parameter], max_norm: float) -> torch.Tensor:
    """``clip_grad_norm_`` that also takes sparse gradients (which torch's does not).

    Returns the total norm before clipping.
    """
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    norms = []
    for i, g in enumerate(grads):
        if g.is_sparse:
            g = grads[i] = g.coalesce()
            norms.append(torch.linalg.vector_norm(g.values()))
        else:
            norms.append(torch.linalg.vector_norm(g))
    total = torch.linalg.vector_norm(torch.stack(norms))
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for p in params:
        if p.grad is not None:
            p.grad = p.grad.coalesce() * scale if p.grad.is_sparse else p.grad.mul_(scale)
    return total


class PlainEngine(TrainEngine):
    """Single-process AdamW + ``clip_grad_norm_``: the default, and the DeepSpeed reference."""

    def __init__(
        self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float, bf16: bool
    ):
        self.model = self.module = model
        self.optimizer = optimizer
        self.grad_clip = grad_clip
        self.bf16 = bf16

    @property
    def is_main(self) -> bool:
        return True

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float | None:
        norm = None
        if self.grad_clip > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            norm = float(clip_grad_norm(params, self.grad_clip))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def state_dict_for_save(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def save_checkpoint(
        self, ckpt_dir: str | Path, client_state: dict[str, Any] | None = None
    ) -> None:
        state = {
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "client_state": client_state or {},
        }
        write_with(Path(ckpt_dir) / _PLAIN_CKPT, lambda tmp: torch.save(state, tmp))

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict[str, Any]:
        path = Path(ckpt_dir) / _PLAIN_CKPT
        if not path.is_file():
            raise FileNotFoundError(f"no plain (non-DeepSpeed) checkpoint at {path}")
        # tensors and plain values only: a tampered file cannot run code when it is loaded
        state = torch.load(path, map_location=self.device, weights_only=True)
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        return state["client_state"]


class DeepSpeedTrainEngine(TrainEngine):
    """Adapter over a ``deepspeed.DeepSpeedEngine`` (ZeRO 0-3); every method is collective."""

    def __init__(self, ds_engine: Any, bf16: bool):
        self.model = ds_engine
        self.module = ds_engine.module
        self.optimizer = ds_engine.optimizer
        self.bf16 = bf16
        self._ds = ds_engine

    @property
    def is_main(self) -> bool:
        return self._ds.global_rank == 0

    @property
    def device(self) -> torch.device:
        return torch.device(self._ds.device)

    def backward(self, loss: torch.Tensor) -> None:
        self._ds.backward(loss)

    def step(self) -> float | None:
        self._ds.step()  # clips by "gradient_clipping", steps, zeroes the grads
        norm = self._ds.get_global_grad_norm()
        return None if norm is None else float(norm)

    def state_dict_for_save(self) -> dict[str, torch.Tensor] | None:
        if self._ds.zero_optimization_partition_weights():  # ZeRO-3: gather the shards
            if not self._ds.zero_gather_16bit_weights_on_model_save():
                raise ValueError(
                    "ZeRO-3 exports weights only with zero_optimization."
                    "stage3_gather_16bit_weights_on_model_save: true (or run zero_to_fp32.py)"
                )
            state = self._ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.module.state_dict() if self.is_main else None
        if state is None or not self.is_main:
            return None
        return {k: v.detach().cpu() for k, v in state.items()}

    def save_checkpoint(
        self, ckpt_dir: str | Path, client_state: dict[str, Any] | None = None
    ) -> None:
        self._ds.save_checkpoint(str(ckpt_dir), client_state={_CLIENT_KEY: client_state or {}})

    def load_checkpoint(self, ckpt_dir: str | Path) -> dict[str, Any]:
        """Load the ``latest`` tag and return our client state.

        Under ZeRO-3 use a fresh engine: DeepSpeed cannot load into one that has already saved
        (its module is partitioned).
        """
        path, client_state = self._ds.load_checkpoint(str(ckpt_dir))
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint ('latest' tag) in {ckpt_dir}")
        # DeepSpeed's "client state" also carries its own bookkeeping keys: return only ours
        return (client_state or {}).get(_CLIENT_KEY, {})

    def barrier(self) -> None:
        import deepspeed.comm

        deepspeed.comm.barrier()

    def mean_over_ranks(self, value: torch.Tensor) -> float:
        import deepspeed.comm

        world = deepspeed.comm.get_world_size()
        if world == 1:
            return float(value.detach())
        total = value.detach().float().reshape(1).to(self.device).clone()
        deepspeed.comm.all_reduce(total)  # SUM: gloo has no AVG
        return float(total) / world


def make_engine(
    model: torch.nn.Module,
    param_groups: ParamGroups,
    lr: float,
    ds_config_path: str | Path | None = None,
    grad_clip: float = 1.0,
    bf16: bool = False,
    *,
    micro_batch_size: int = 1,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> TrainEngine:
    """Wrap ``model`` for training: plain AdamW without a config, DeepSpeed with one.

    ``param_groups`` is what ``torch.optim.AdamW`` takes (params, or dicts with per-group
    ``weight_decay``); ``weight_decay`` is the default for groups without one. ``grad_clip <= 0``
    turns clipping off. ``micro_batch_size`` only fills DeepSpeed's batch-size bookkeeping.

    ``bf16`` means autocast over fp32 weights on the plain path, and DeepSpeed's bf16 mode (bf16
    weights, fp32 master copy in the optimizer) with a config; :meth:`TrainEngine.autocast` is
    right for both. With DeepSpeed, call this on every rank, and the model is moved to the device.
    """
    groups = [g if isinstance(g, dict) else {"params": [g]} for g in param_groups]
    if ds_config_path is None:
        opt = DenseAndSparseAdam(groups, lr, betas, eps, weight_decay)
        return PlainEngine(model, opt, grad_clip, bf16)
    if any(g.get("sparse") for g in groups):
        raise ValueError(
            "DeepSpeed's optimizers take dense gradients: switch the model's sparse tables to "
            "dense (set_sparse(False)) before making a DeepSpeed engine"
        )

    cfg = json.loads(Path(ds_config_path).read_text())
    cfg = resolve_ds_config(
        cfg,
        lr=lr,
        grad_clip=grad_clip,
        bf16=bf16,
        micro_batch_size=micro_batch_size,
        betas=betas,
        eps=eps,
        weight_decay=weight_decay,
    )
    ensure_dist_env()
    import deepspeed  # lazy: heavy, and only this path needs it

    _skip_shm_comm_build_on_cpu()
    # Our own AdamW (a factory, so DeepSpeed builds it after moving the model) unless the json
    # names one, e.g. DeepSpeedCPUAdam for ZeRO-Offload.
    client_opt = None
    if "optimizer" not in cfg:

        def client_opt(params: ParamGroups) -> torch.optim.AdamW:
            return _adamw(params, lr, betas, eps, weight_decay)

    ds_engine, *_ = deepspeed.initialize(
        model=model, model_parameters=groups, optimizer=client_opt, config=cfg
    )
    return DeepSpeedTrainEngine(ds_engine, bf16=bool(cfg.get("bf16", {}).get("enabled", False)))


def resolve_ds_config(
    cfg: dict[str, Any],
    *,
    lr: float,
    grad_clip: float,
    bf16: bool,
    micro_batch_size: int,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.01,
) -> dict[str, Any]:
    """A copy of ``cfg`` with ``"auto"`` fields taken from the loop, as HF Trainer does.

    Any other ``"auto"`` is dropped so DeepSpeed's default applies. A ``"scheduler"`` section is
    refused (the loop sets the lr every step and the two would fight), and so is gradient
    accumulation (the loop steps after every backward).
    """
    cfg = copy.deepcopy(cfg)
    if "scheduler" in cfg:
        raise ValueError("remove the DeepSpeed 'scheduler' section: the training loop sets the lr")
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ValueError(f"gradient_accumulation_steps must be 1 or 'auto', got {gas!r}")
    cfg["gradient_accumulation_steps"] = 1
    _fill(cfg, "train_micro_batch_size_per_gpu", micro_batch_size)
    _fill(cfg, "gradient_clipping", max(0.0, grad_clip))
    _fill(cfg.setdefault("bf16", {}), "enabled", bf16)
    _fill(cfg.setdefault("fp16", {}), "enabled", False)
    if cfg["bf16"]["enabled"] and cfg["fp16"]["enabled"]:
        raise ValueError("DeepSpeed config enables both bf16 and fp16")
    opt_params = cfg.get("optimizer", {}).get("params", {})
    for key, value in {
        "lr": lr,
        "betas": list(betas),
        "eps": eps,
        "weight_decay": weight_decay,
    }.items():
        _fill(opt_params, key, value)
    _drop_auto(cfg)
    return cfg


def _fill(section: dict[str, Any], key: str, value: Any) -> None:
    if section.get(key, "auto") == "auto":
        section[key] = value


def _drop_auto(node: dict[str, Any]) -> None:
    for key in list(node):
        if node[key] == "auto":
            log.info("DeepSpeed config: %r is 'auto' with no loop value; using its default", key)
            del node[key]
        elif isinstance(node[key], dict):
            _drop_auto(node[key])


def ensure_dist_env() -> None:
    """Give DeepSpeed a one-process gloo/nccl world when no launcher set one up.

    Without RANK/WORLD_SIZE/... DeepSpeed tries MPI discovery (mpi4py) and fails; a launcher's
    values are never overridden.
    """
    if any(v in os.environ for v in _LAUNCHER_VARS):
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        os.environ["MASTER_PORT"] = str(_free_port())
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_shm_comm_build_on_cpu() -> None:
    """Stop DeepSpeed JIT-compiling its CPU shared-memory all-reduce, which training never uses.

    On the CPU accelerator every ``TorchBackend()`` (built by ``deepspeed.initialize``) calls
    ``build_shm_op()``, which compiles ``deepspeed_shm_comm`` with ninja (minutes on a small
    CPU) whenever ``deepspeed.ops.__compatible_ops__`` marks it compatible (always on Linux) and no
    prebuilt copy is installed. The op only serves ``inference_all_reduce`` (training's
    ``all_reduce`` goes to torch.distributed), so we mark it incompatible in that dict, which
    DeepSpeed caches and consults there (no code is patched). CUDA's accelerator has no such
    builder, so GPU runs never build it.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() == "cpu":
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
