"""Learning to memorize and learning to retrieve, in one loop you can read top to bottom.

A run writes ``out/init`` (the backbone with identifier tokens, before training),
``out/checkpoints/step-N`` (weights, optimizer, loop position: a killed run resumes from the
newest one and ends with the same weights as an uninterrupted run) and ``out/model`` (the
trained :class:`GraceModel`). Every folder is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grace.alignment_distillation import IdGallery
from grace.atomic_io import atomic_dir, replace_dir, write_json
from grace.configuration_grace import LITE_BACKBONE, TINY_BACKBONE, TrainConfig
from grace.deepspeed_engine import make_engine
from grace.distributed_training import launch_training, rank_and_world, shard
from grace.errors import GraceError
from grace.identifier_index import IdentifierIndex
from grace.identifiers import IdentifierMap
from grace.modeling_backbone import (
    add_identifier_vocabulary,
    build_tiny_backbone,
    load_backbone,
    tokenizer_of,
)
from grace.modeling_grace import GraceModel
from grace.modeling_grace_lite import build_lite_backbone
from grace.pseudo_queries import model_captions, nearest_captions, resolve_source
from grace.records import ImageRecord
from grace.task_examples import ImageInputs, TextInputs, build_examples, collate, plan_epoch

MetricsCallback = Callable[[int, dict[str, float]], None]
STATE_FILE = "trainer_state.json"


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
) -> GraceModel:
    """Train GRACE on an image set and its identifiers; resume from ``out`` if a run is there.

    ``stop_after_steps`` ends the run early after writing a checkpoint (what a kill looks like
    to the next run, minus the lost work since the last checkpoint). ``progress`` shows a bar
    only when stderr is a terminal. With ``config.processes`` > 1 the run happens in that many
    data-parallel processes (:mod:`grace.distributed_training`); under an outside launcher
    this process is one rank and trains on its share of every batch.

    ``negatives``: images not trained on whose memorize and retrieve answers the trained rows
    must not take (an incremental update's old images). Only with ``train_rows_from``, where
    their hidden states are fixed: :mod:`grace.cached_negatives` computes them once and every
    step adds their cross-entropy, weighted as if they were among the training examples.
    """
    cfg = config or TrainConfig()
    out, root = Path(out), Path(root)
    live = [r for r in records if r.key in id_map.ids]
    if not live:
        raise GraceError("no image of the set has a live identifier in this map")
    negatives = [r for r in negatives if r.key in id_map.ids]
    if negatives and cfg.train_rows_from is None:
        raise GraceError(
            "negatives are cached hidden states, fixed only when every weight but the trained "
            "rows is frozen: set train_rows_from (ReplayConfig.only_new_ids)"
        )
    rank, world = rank_and_world()
    if cfg.processes > 1 and world == 1:  # not yet inside a launched world: start one
        if stop_after_steps is not None:
            raise ValueError("stop_after_steps is a one-process test hook (processes=1)")
        return launch_training(records, root, id_map, out, cfg, callback, progress, negatives)
    if world > 1 and cfg.deepspeed is None:
        raise GraceError(
            f"{world} ranks need a DeepSpeed config to average gradients: set deepspeed="
            "configs/deepspeed/zero2.json (each rank would otherwise train alone on its share)"
        )
    threads = _threads(cfg.num_threads)
    with threads:
        model, processor, state = _start_or_resume(live, id_map, out, cfg)
        tok = tokenizer_of(processor)
        index = IdentifierIndex.build(id_map, tok)
        images = ImageInputs(processor, live, root)
        tasks = ["memorize"] + (["retrieve"] if cfg.retrieve_task else [])
        tasks += ["describe"] if cfg.describe_task else []
        tasks += ["caption"] if cfg.caption_task else []
        pseudo: dict[str, list[str]] | None = state.get("pseudo_queries")
        texts = TextInputs(processor)
        mix = {
            "memorize_repeats": cfg.memorize_repeats,
            "side_task_captions": cfg.side_task_captions,
            "texts": texts,
            "align": getattr(model.config, "alignment_weight", 0) > 0,
        }
        examples = build_examples(live, index, processor, images, cfg.prompts, tasks, **mix)
        needy = [r for r in live if not (r.split == "train" and r.captions)]
        source = _pseudo_query_source(model, cfg) if needy else "off"
        use_pseudo = source != "off"
        # planned from the examples without pseudo-queries, so a run resumed after they were
        # generated follows the same lr schedule as one that never stopped
        per_image = cfg.pseudo_queries_per_image if source == "nearest" else 1
        extra = len(needy) * per_image if use_pseudo else 0
        total = _total_steps(examples, cfg, extra)
        if pseudo is not None:
            examples = build_examples(
                live, index, processor, images, cfg.prompts, tasks, pseudo, **mix
            )

        decay = cfg.weight_decay
        if cfg.train_rows_from is not None:
            _train_only_rows(model, cfg.train_rows_from)
            decay = 0.0  # decoupled decay would shrink the frozen rows of the same tensors
        engine = make_engine(
            model,
            _param_groups(model, decay),
            lr=cfg.lr,
            ds_config_path=cfg.deepspeed,
            grad_clip=cfg.grad_clip,
            bf16=cfg.bf16,
            micro_batch_size=math.ceil(cfg.batch_size / world),
        )
        gallery = None  # the distillation's teacher ranks these (retrieve batches only)
        if "retrieve" in tasks and mix["align"] and getattr(model.config, "distill_weight", 0):
            gallery = IdGallery.build(images, index).to(engine.device)
        fixed = None
        if negatives:  # the frozen model's answers to the old images, once
            fixed = _cached_negatives(engine, negatives, index, processor, root, cfg, tasks, texts)
            # per step, as if each of their answer tokens were one of the training examples'
            per_step = 1.0 / sum(len(ex.input_ids) - ex.n_prompt for ex in examples)
        step, epoch, first_batch = state["step"], state["epoch"], state["batch"]
        spent = float(state.get("seconds", 0.0))  # training time of the run before a resume
        if step:
            engine.load_checkpoint(out / "checkpoints" / f"step-{step:08d}" / "engine")
        engine.model.train()
        # disable=None: no bar when stderr is not a terminal (a log would get every update)
        quiet = None if progress else True
        bar = tqdm(total=total, initial=step, desc="grace train", disable=quiet)
        t0 = time.perf_counter()
        seen = 0
        stopped = False
        while epoch < cfg.epochs and not stopped:
            done = max(epoch / cfg.epochs, _time_share(cfg, spent + time.perf_counter() - t0))
            # at an epoch's start only: a run resumed mid-epoch keeps that epoch's plan
            if use_pseudo and pseudo is None and first_batch == 0 and done >= cfg.pseudo_query_at:
                engine.model.eval()
                if source == "nearest":
                    pseudo = nearest_captions(
                        engine.module, processor, live, needy, images, texts, cfg.prompts,
                        cfg.pseudo_queries_per_image,
                    )  # fmt: skip
                else:
                    gm = GraceModel(engine.module, processor, id_map, live, cfg.prompts)
                    pseudo = model_captions(gm, needy, images, per_image=1)
                examples = build_examples(
                    live, index, processor, images, cfg.prompts, tasks, pseudo, **mix
                )
                engine.model.train()
            plan = plan_epoch(examples, cfg.batch_size, seed=cfg.seed * 100_003 + epoch)
            for b in range(first_batch, len(plan)):
                lr = _lr(step, total, cfg, spent + time.perf_counter() - t0)
                engine.set_lr(lr)
                batch_examples = [examples[n] for n in plan[b]]
                mine = shard(batch_examples, rank, world)  # data parallel: this rank's share
                batch = collate(mine, images, tok.pad_token_id, texts)
                batch = {k: v.to(engine.device) for k, v in batch.items()}
                if gallery is not None and batch_examples[0].task == "retrieve":
                    sample = torch.Generator().manual_seed(cfg.seed * 100_003 + step)
                    gold = [ex.gold for ex in mine if ex.gold is not None]
                    batch.update(gallery.inputs(gold, cfg.distill_gallery_size, sample))
                with engine.autocast():
                    loss = engine.model(**batch).loss
                    if fixed is not None:
                        head = engine.module.get_output_embeddings()
                        loss = loss + fixed.loss_sum(head) * per_step
                engine.backward(loss)
                grad_norm = engine.step()
                step += 1
                seen += len(batch_examples)
                elapsed = time.perf_counter() - t0
                mean_loss = engine.mean_over_ranks(loss)
                metrics = {
                    "loss": mean_loss,
                    f"loss_{batch_examples[0].task}": mean_loss,
                    "lr": lr,
                    "epoch": epoch + (b + 1) / len(plan),
                    "samples_per_second": seen / max(elapsed, 1e-9),
                }
                if grad_norm is not None:
                    metrics["grad_norm"] = float(grad_norm)
                if callback is not None:
                    callback(step, metrics)
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
                position = (epoch, b + 1) if b + 1 < len(plan) else (epoch + 1, 0)
                out_of_time = cfg.max_seconds is not None and spent + elapsed >= cfg.max_seconds
                stopped = out_of_time or (stop_after_steps is not None and step >= stop_after_steps)
                if stopped or (cfg.checkpoint_every and step % cfg.checkpoint_every == 0):
                    _save_checkpoint(
                        engine, out, step, position, pseudo, cfg.keep_checkpoints, spent + elapsed
                    )
                if stopped:
                    break
            else:
                epoch, first_batch = epoch + 1, 0
        bar.close()
        engine.model.eval()
        trained = GraceModel(
            engine.module,
            processor,
            id_map,
            live,
            cfg.prompts,
            info={
                "train_config": cfg.to_dict(),
                "steps": step,
                "complete": not stopped,
                "world_size": world,
                "cached_negatives": {"images": len(negatives), "answers": len(fixed or ())},
            },
        )
        if stopped and stop_after_steps is not None and step >= stop_after_steps:
            return trained  # interrupted on purpose: the checkpoint is the artifact
        weights = engine.state_dict_for_save()  # every rank takes part in gathering
        if engine.is_main:
            trained.save(out / "model", state_dict=weights)
        return trained


def _start_or_resume(
    live: Sequence[ImageRecord], id_map: IdentifierMap, out: Path, cfg: TrainConfig
) -> tuple[torch.nn.Module, object, dict]:
    """The backbone (from ``out/init`` when resuming) and where the loop left off."""
    state = {"step": 0, "epoch": 0, "batch": 0, "pseudo_queries": None}
    init = out / "init"
    latest = _latest_checkpoint(out)
    if init.is_dir():
        model, processor = load_backbone(init)
        if latest is not None:
            state = json.loads((latest / STATE_FILE).read_text())
        return model, processor, state
    built_in = {
        LITE_BACKBONE: (build_lite_backbone, cfg.lite),
        TINY_BACKBONE: (build_tiny_backbone, cfg.tiny),
    }
    if cfg.backbone in built_in:  # its tokenizer is trained on the set's texts and the ids
        build, sizes = built_in[cfg.backbone]
        texts = [c for r in live for c in r.captions]
        texts += [id_map.token_text(i) for i, _ in id_map.identifiers()]
        texts += [p for p in vars(cfg.prompts).values()]
        model, processor = build(texts, sizes, seed=cfg.seed)
    else:
        model, processor = load_backbone(cfg.backbone)
    add_identifier_vocabulary(model, processor, id_map.new_tokens())
    if rank_and_world()[0] == 0:  # every rank built the same model; concurrent renames collide
        with atomic_dir(init) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return model, processor, state


def _latest_checkpoint(out: Path) -> Path | None:
    ckpts = sorted((out / "checkpoints").glob("step-*")) if (out / "checkpoints").is_dir() else []
    ckpts = [c for c in ckpts if (c / STATE_FILE).is_file()]
    return ckpts[-1] if ckpts else None


def _save_checkpoint(
    engine, out: Path, step: int, position, pseudo, keep: int, seconds: float
) -> None:
    """All ranks write their shards into one hidden folder; the main rank adds the loop position
    and renames it into place, so a reader finds a whole checkpoint or none."""
    target = out / "checkpoints" / f"step-{step:08d}"
    partial = target.with_name(f".{target.name}.partial")  # the same name on every rank
    if engine.is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    try:
        engine.barrier()
        engine.save_checkpoint(partial / "engine")  # collective
        engine.barrier()
        if engine.is_main:
            where = {"step": step, "epoch": position[0], "batch": position[1]}
            write_json(
                partial / STATE_FILE, {**where, "pseudo_queries": pseudo, "seconds": seconds}
            )
            replace_dir(partial, target)
            for old in sorted((out / "checkpoints").glob("step-*"))[: -max(keep, 1)]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if engine.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    engine.barrier()


def _cached_negatives(engine, negatives, index, processor, root, cfg, tasks, texts):
    """The negatives' memorize/retrieve answers (of the tasks this run trains, in its mix:
    memorize examples ``memorize_repeats`` times), cached."""
    from grace.cached_negatives import ID_TASKS, cache_negatives

    images = ImageInputs(processor, negatives, root)
    mine = [t for t in tasks if t in ID_TASKS]
    examples = build_examples(negatives, index, processor, images, cfg.prompts, mine, texts=texts,
                              memorize_repeats=cfg.memorize_repeats)  # fmt: skip
    pad = tokenizer_of(processor).pad_token_id
    return cache_negatives(
        engine.module, examples, images, texts, pad, cfg.train_rows_from, engine.device,
        batch_size=cfg.batch_size,
    )  # fmt: skip


def _train_only_rows(model: torch.nn.Module, start: int) -> None:
    """Freeze everything but the embedding and output rows ``start:``: gradients of the other
    rows are zeroed, so Adam (whose moments stay zero) and clipping leave them as they are."""
    tables = {
        id(t.weight): t.weight
        for t in (model.get_input_embeddings(), model.get_output_embeddings())
    }
    rows = model.get_input_embeddings().weight.shape[0]
    if not 0 < start < rows:
        raise GraceError(
            f"train_rows_from={start} leaves no row to train: the vocabulary has {rows} rows "
            "(only atomic identifiers add rows)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for weight in tables.values():
        keep = torch.zeros(weight.shape[0], 1, dtype=weight.dtype, device=weight.device)
        keep[start:] = 1
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, keep=keep: grad * keep)


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings (as in nanoGPT)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _lr(step: int, total: int, cfg: TrainConfig, seconds: float = 0.0) -> float:
    """Linear warm-up, then cosine decay to 0 (without decay the tiny model plateaus).

    With a wall-clock budget the decay follows whichever runs out first, steps or seconds, so a
    run stopped by ``max_seconds`` still ends annealed instead of at its peak learning rate.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    if cfg.max_seconds:
        frac = max(frac, seconds / cfg.max_seconds)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))


def _total_steps(examples, cfg: TrainConfig, extra_retrieve: int) -> int:
    """Optimizer steps of the whole run, known up front so the schedule ends annealed."""
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
    p = min(math.ceil(cfg.pseudo_query_at * cfg.epochs - 1e-9), cfg.epochs)
    p = p if extra_retrieve else cfg.epochs
    return before * p + after * (cfg.epochs - p)


def _time_share(cfg: TrainConfig, seconds: float) -> float:
    return seconds / cfg.max_seconds if cfg.max_seconds else 0.0


def _pseudo_query_source(model: torch.nn.Module, cfg: TrainConfig) -> str:
    """Where this run's pseudo-queries come from ("off" when it trains no retrieval)."""
    if not cfg.retrieve_task:
        return "off"
    source = resolve_source(cfg.pseudo_queries, model)
    if source == "caption" and not cfg.caption_task:
        raise GraceError(
            "pseudo_queries='caption' captions images with the caption task: set "
            "caption_task=true, or pseudo_queries='nearest' (lite) or 'off'"
        )
    return source


def _threads(n: int | None):
    if not n:
        return nullcontext()

    class _Threads:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)

    return _Threads()
