"""Learning to memorize and learning to retrieve, in one loop you can read top to bottom.

A run writes ``out/init`` (the backbone with identifier tokens, before training),
``out/checkpoints/step-N`` (weights, optimizer, loop position: a killed run resumes from the
newest one and ends with the same weights as an uninterrupted run) and ``out/model`` (the
trained :class:`GraceRetriever`). Every folder is written atomically.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
import warnings
from collections.abc import Sequence
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm.auto import tqdm

from grace.atomic_io import atomic_dir, digest_mismatch, folder_digests, replace_dir, write_json
from grace.constants import LITE_BACKBONE, TINY_BACKBONE
from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.identifiers import IdentifierMap
from grace.models.backbone import add_identifier_vocabulary, tokenizer_of
from grace.models.factory import BUILT_IN, build_backbone, load_backbone
from grace.retrieval.index import IdentifierIndex
from grace.retrieval.retriever import GraceRetriever
from grace.training.choices import ID_TASKS, choice_positions, label_choices
from grace.training.config import TrainConfig
from grace.training.distillation import IdGallery
from grace.training.distributed import MetricsCallback, rank_and_world, shard
from grace.training.engine import TrainEngine, make_engine
from grace.training.examples import (
    Example,
    ImageInputs,
    TextInputs,
    build_examples,
    collate,
    plan_epoch,
)
from grace.training.fingerprint import check_or_record, run_fingerprint
from grace.training.progress import ProgressLog, time_left
from grace.training.pseudo_queries import model_captions, nearest_captions, resolve_source
from grace.training.schedule import get_lr, time_share, total_steps

STATE_FILE = "trainer_state.json"


def train_loop(
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

    ``stop_after_steps`` ends the run early after writing a checkpoint (what a kill looks like
    to the next run, minus the lost work since the last checkpoint). ``progress`` shows a bar
    only when stderr is a terminal. With ``config.processes`` > 1 the run happens in that many
    data-parallel processes (:mod:`grace.training.distributed`); under an outside launcher
    this process is one rank and trains on its share of every batch.

    ``negatives``: images not trained on whose memorize and retrieve answers the trained rows
    must not take (an incremental update's old images). Only with ``train_rows_from``, where
    their hidden states are fixed: :mod:`grace.training.cached_negatives` computes them once and
    every step adds their cross-entropy, weighted as if they were among the training examples.
    """
    cfg = config or TrainConfig()
    live_records = [r for r in records if r.key in id_map.ids]
    if not live_records:
        raise GraceError("no image of the set has a live identifier in this map")
    negatives = [r for r in negatives if r.key in id_map.ids]
    if negatives and cfg.train_rows_from is None:
        raise GraceError(
            "negatives are cached hidden states, fixed only when every weight but the trained "
            "rows is frozen: set train_rows_from (ReplayConfig.only_new_ids)"
        )
    rank, world = rank_and_world()
    if world > 1 and cfg.deepspeed is None:
        raise GraceError(
            f"{world} ranks need a DeepSpeed config to average gradients: set deepspeed="
            "configs/deepspeed/zero2.json (each rank would otherwise train alone on its share)"
        )
    with _threads(cfg.num_threads):
        run = _Run(live_records, Path(root), id_map, Path(out), cfg, negatives, rank, world)
        run.start_clock(progress, stop_after_steps)
        while run.epoch < cfg.epochs and not run.stopped:
            run.make_pseudo_queries_if_due()
            plan = plan_epoch(run.examples, cfg.batch_size, seed=cfg.seed * 100_003 + run.epoch)
            for b in range(run.first_batch, len(plan)):
                batch = [run.examples[n] for n in plan[b]]
                metrics = run.step(batch, epoch=run.epoch + (b + 1) / len(plan))
                if callback is not None:
                    callback(run.global_step, metrics)
                run.show(metrics)
                run.stopped = run.out_of_time() or run.asked_to_stop()
                last = b + 1 == len(plan)
                run.checkpoint_if_due(next_batch=(run.epoch + 1, 0) if last else (run.epoch, b + 1))
                if run.stopped:
                    break
            else:
                run.epoch, run.first_batch = run.epoch + 1, 0
        return run.finish()


class _Run:
    """One training run, set up once, and the named steps the loop takes.

    Setting up builds the task examples and the schedule's step total, the engine, the
    distillation gallery, the cached negatives, and reads where the loop stands (resumed from
    ``out/checkpoints``). The loop then calls :meth:`start_clock`, per epoch
    :meth:`make_pseudo_queries_if_due`, per batch :meth:`step`, :meth:`show` and
    :meth:`checkpoint_if_due`, and :meth:`finish` at the end.
    """

    def __init__(
        self,
        live_records: list[ImageRecord],
        root: Path,
        id_map: IdentifierMap,
        out: Path,
        cfg: TrainConfig,
        negatives: list[ImageRecord],
        rank: int,
        world: int,
    ) -> None:
        self.live_records, self.root, self.id_map, self.out = live_records, root, id_map, out
        self.cfg, self.negatives, self.rank, self.world = cfg, negatives, rank, world
        model, state = self._load_examples()
        # identifier answers as a softmax over each node's children (lite); others: full vocab
        self.factorized = hasattr(model, "choice_logits")
        self.engine = self._make_engine(model)
        self.gallery = None  # the distillation's teacher ranks these (retrieve batches only)
        if "retrieve" in self.tasks and self.align and getattr(model.config, "distill_weight", 0):
            self.gallery = IdGallery.build(self.images, self.index).to(self.engine.device)
        self.cached_negatives = None
        if negatives:  # the frozen model's answers to the old images, once
            self.cached_negatives = _cached_negatives(
                self.engine,
                negatives,
                self.index,
                self.processor,
                root,
                cfg,
                self.tasks,
                self.texts,
            )
            # per step, each cached position (a choice among 2+ children) weighs one over the
            # training examples' choice positions: the old images as a whole weigh what the
            # new examples' choices weigh (their single-child positions carry no loss)
            id_answers = [
                list(ex.input_ids[ex.n_prompt :]) for ex in self.examples if ex.task in ID_TASKS
            ]
            answers = choice_positions(id_answers, self.index.trie)
            answers += sum(
                len(ex.input_ids) - ex.n_prompt for ex in self.examples if ex.task not in ID_TASKS
            )
            self.negatives_weight = 1.0 / max(answers, 1)
        self.global_step, self.epoch = state["step"], state["epoch"]
        self.first_batch = state["batch"]  # of the epoch the run resumes in
        self.seconds_before_resume = float(state.get("seconds", 0.0))
        if self.global_step:
            step_dir = out / "checkpoints" / f"step-{self.global_step:08d}"
            self.engine.load_checkpoint(step_dir / "engine")
        self.engine.model.train()

    def _load_examples(self) -> tuple[torch.nn.Module, dict]:
        """The backbone and the loop state it resumes from; sets the examples and step total."""
        cfg, live_records = self.cfg, self.live_records
        model, self.processor, state = _start_or_resume(live_records, self.id_map, self.out, cfg)
        self.tok = tokenizer_of(self.processor)
        self.index = IdentifierIndex.build(self.id_map, self.tok)
        self.images = ImageInputs(self.processor, live_records, self.root)
        self.tasks = ["memorize"] + (["retrieve"] if cfg.retrieve_task else [])
        self.tasks += ["describe"] if cfg.describe_task else []
        self.tasks += ["caption"] if cfg.caption_task else []
        self.pseudo: dict[str, list[str]] | None = state.get("pseudo_queries")
        self.texts = TextInputs(self.processor)
        self.align = getattr(model.config, "alignment_weight", 0) > 0
        self.examples = self._build_examples(None)
        self.uncaptioned = [r for r in live_records if not (r.split == "train" and r.captions)]
        self.source = _pseudo_query_source(model, cfg) if self.uncaptioned else "off"
        # planned from the examples without pseudo-queries, so a run resumed after they were
        # generated follows the same lr schedule as one that never stopped
        per_image = cfg.pseudo_queries_per_image if self.source == "nearest" else 1
        extra = len(self.uncaptioned) * per_image if self.source != "off" else 0
        self.total = total_steps(self.examples, cfg, extra)
        if self.pseudo is not None:
            self.examples = self._build_examples(self.pseudo)
        return model, state

    def _build_examples(self, pseudo: dict[str, list[str]] | None) -> list[Example]:
        cfg = self.cfg
        return build_examples(
            self.live_records,
            self.index,
            self.processor,
            self.images,
            cfg.prompts,
            self.tasks,
            pseudo,
            memorize_repeats=cfg.memorize_repeats,
            side_task_captions=cfg.side_task_captions,
            texts=self.texts,
            align=self.align,
        )

    def _make_engine(self, model: torch.nn.Module) -> TrainEngine:
        cfg, decay = self.cfg, self.cfg.weight_decay
        if cfg.deepspeed is not None:  # DeepSpeed's optimizers take dense gradients only
            for module in model.modules():
                if hasattr(module, "set_sparse"):
                    module.set_sparse(False)
        if cfg.train_rows_from is not None:
            _train_only_rows(model, cfg.train_rows_from)
            decay = 0.0  # decoupled decay would shrink the frozen rows of the same tensors
        return make_engine(
            model,
            _param_groups(model, decay),
            lr=cfg.lr,
            ds_config_path=cfg.deepspeed,
            grad_clip=cfg.grad_clip,
            bf16=cfg.bf16,
            micro_batch_size=math.ceil(cfg.batch_size / self.world),
        )

    def start_clock(self, progress: bool, stop_after_steps: int | None) -> None:
        """Start the progress bar and the clock, right before the first step."""
        self.stop_after_steps = stop_after_steps
        # disable=None: no bar when stderr is not a terminal (a log would get every update)
        quiet = None if progress else True
        self.bar = tqdm(
            total=self.total,
            initial=self.global_step,
            desc="grace train",
            disable=quiet,
            # tqdm's own ETA counts steps; the postfix's "left" knows about the time budget
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
        )
        self.log = ProgressLog(progress)  # lines where the bar is off (a log, not a terminal)
        self.t0 = time.perf_counter()
        self.first_step = self.global_step
        self.seen = 0  # examples trained on since the start (this process's run)
        self.elapsed = 0.0  # seconds since the start, as of the last step's end
        self.stopped = False

    def seconds(self) -> float:
        """Training time so far, the run before a resume included."""
        return self.seconds_before_resume + time.perf_counter() - self.t0

    def make_pseudo_queries_if_due(self) -> None:
        """Give the images without train captions pseudo-queries once ``pseudo_query_at`` is due.

        Due at the start of the first epoch that reaches that share of the epochs or of the
        time budget; the examples are rebuilt with the pseudo-queries' retrieve examples.
        """
        cfg = self.cfg
        done = max(self.epoch / cfg.epochs, time_share(cfg, self.seconds()))
        # at an epoch's start only: a run resumed mid-epoch keeps that epoch's plan
        due = self.first_batch == 0 and done >= cfg.pseudo_query_at
        if self.source == "off" or self.pseudo is not None or not due:
            return
        engine = self.engine
        engine.model.eval()
        if self.source == "nearest":
            self.pseudo = nearest_captions(
                engine.module,
                self.processor,
                self.live_records,
                self.uncaptioned,
                self.images,
                self.texts,
                cfg.prompts,
                cfg.pseudo_queries_per_image,
            )
        else:
            retriever = GraceRetriever(
                engine.module, self.processor, self.id_map, self.live_records, cfg.prompts
            )
            self.pseudo = model_captions(retriever, self.uncaptioned, self.images, per_image=1)
        self.examples = self._build_examples(self.pseudo)
        engine.model.train()

    def step(self, batch_examples: list[Example], epoch: float) -> dict[str, float]:
        """One optimizer step on a batch (this rank's share of it); its metrics."""
        cfg, engine = self.cfg, self.engine
        lr = get_lr(self.global_step, self.total, cfg, self.seconds())
        engine.set_lr(lr)
        rank_batch = shard(batch_examples, self.rank, self.world)  # data parallel
        batch = collate(rank_batch, self.images, self.tok.pad_token_id, self.texts)
        if self.factorized and batch_examples[0].task in ID_TASKS:  # scored among siblings
            batch["label_choices"] = label_choices(batch["labels"], self.index.trie)
        batch = {k: v.to(engine.device) for k, v in batch.items()}
        if self.gallery is not None and batch_examples[0].task == "retrieve":
            sample = torch.Generator().manual_seed(cfg.seed * 100_003 + self.global_step)
            gold = [ex.gold for ex in rank_batch if ex.gold is not None]
            batch.update(self.gallery.inputs(gold, cfg.distill_gallery_size, sample))
        with engine.autocast():
            loss = engine.model(**batch).loss
            if self.cached_negatives is not None:
                negatives = self.cached_negatives.loss_sum(engine.module)
                loss = loss + negatives * self.negatives_weight
        engine.backward(loss)
        grad_norm = engine.step()
        self.global_step += 1
        self.seen += len(batch_examples)
        self.elapsed = time.perf_counter() - self.t0
        mean_loss = engine.mean_over_ranks(loss)
        metrics = {
            "loss": mean_loss,
            f"loss_{batch_examples[0].task}": mean_loss,
            "lr": lr,
            "epoch": epoch,
            "samples_per_second": self.seen / max(self.elapsed, 1e-9),
        }
        if grad_norm is not None:
            metrics["grad_norm"] = float(grad_norm)
        return metrics

    def show(self, metrics: dict[str, float]) -> None:
        """The bar on a terminal, a line every ~10 s in a log.

        Both count down by the rule that will stop the run: its steps or its time budget.
        """
        seconds, rule = left = time_left(
            self.total - self.global_step,
            self.global_step - self.first_step,
            self.elapsed,
            self.seconds_before_resume + self.elapsed,
            self.cfg.max_seconds,
        )
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{metrics['loss']:.3f}", left=f"{seconds:.0f}s ({rule})", refresh=False
        )
        self.log.step(
            self.global_step, self.total, metrics["loss"], metrics["samples_per_second"], left
        )

    def out_of_time(self) -> bool:
        """The wall-clock budget is spent (as of the last step's end)."""
        budget = self.cfg.max_seconds
        return budget is not None and self.seconds_before_resume + self.elapsed >= budget

    def asked_to_stop(self) -> bool:
        """``stop_after_steps`` reached: a test's stand-in for a kill."""
        return self.stop_after_steps is not None and self.global_step >= self.stop_after_steps

    def checkpoint_if_due(self, next_batch: tuple[int, int]) -> None:
        """Write a checkpoint every ``checkpoint_every`` steps and when the run stops.

        ``next_batch`` (epoch, batch) is where a run resumed from it goes on.
        """
        every = self.cfg.checkpoint_every
        if self.stopped or (every and self.global_step % every == 0):
            seconds = self.seconds_before_resume + self.elapsed
            _save_checkpoint(
                self.engine,
                self.out,
                self.global_step,
                next_batch,
                self.pseudo,
                self.cfg.keep_checkpoints,
                seconds,
            )

    def finish(self) -> GraceRetriever:
        """The trained retriever, saved to ``out/model`` unless the run was stopped on purpose."""
        self.bar.close()
        engine = self.engine
        engine.model.eval()
        answers = len(self.cached_negatives or ())
        trained = GraceRetriever(
            engine.module,
            self.processor,
            self.id_map,
            self.live_records,
            self.cfg.prompts,
            info={
                "train_config": self.cfg.to_dict(),
                "steps": self.global_step,
                "complete": not self.stopped,
                "world_size": self.world,
                "cached_negatives": {"images": len(self.negatives), "answers": answers},
            },
        )
        if self.stopped and self.asked_to_stop():
            return trained  # interrupted on purpose: the checkpoint is the artifact
        weights = engine.state_dict_for_save()  # every rank takes part in gathering
        if engine.is_main:
            trained.save(self.out / "model", state_dict=weights)
        return trained


def _start_or_resume(
    live_records: Sequence[ImageRecord], id_map: IdentifierMap, out: Path, cfg: TrainConfig
) -> tuple[torch.nn.Module, object, dict]:
    """The backbone (from ``out/init`` when resuming) and where the loop left off."""
    state = {"step": 0, "epoch": 0, "batch": 0, "pseudo_queries": None}
    init = out / "init"
    fingerprint = run_fingerprint(live_records, id_map, cfg.to_dict())
    main_rank = rank_and_world()[0] == 0
    check_or_record(out, fingerprint, init.is_dir(), record=main_rank)
    if main_rank:  # what a killed writer left (hidden temporaries); never read, only in the way
        for stale in [*out.glob(".*"), *(out / "checkpoints").glob(".*")]:
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
    latest = _latest_checkpoint(out)
    if init.is_dir():
        model, processor = load_backbone(init)
        if latest is not None:
            state = json.loads((latest / STATE_FILE).read_text())
        return model, processor, state
    if cfg.backbone in BUILT_IN:  # its tokenizer is trained on the set's texts and the ids
        texts = [c for r in live_records for c in r.captions]
        texts += [id_map.token_text(i) for i, _ in id_map.identifiers()]
        texts += [p for p in vars(cfg.prompts).values()]
        sizes = {LITE_BACKBONE: cfg.lite, TINY_BACKBONE: cfg.tiny}[cfg.backbone]
        model, processor = build_backbone(cfg.backbone, texts, sizes, seed=cfg.seed)
    else:
        model, processor = load_backbone(cfg.backbone)
    add_identifier_vocabulary(model, processor, id_map.new_tokens())
    if rank_and_world()[0] == 0:  # every rank built the same model; concurrent renames collide
        with atomic_dir(init) as tmp:
            model.save_pretrained(tmp)
            processor.save_pretrained(tmp)
    return model, processor, state


def _latest_checkpoint(out: Path) -> Path | None:
    """The newest whole checkpoint, or None.

    A damaged newest one (a disk that filled up, a bad copy) is passed over for the one before
    it, with a warning, instead of stopping the resume.
    """
    folder = out / "checkpoints"
    ckpts = sorted(folder.glob("step-*")) if folder.is_dir() else []
    for ckpt in reversed(ckpts):
        damage = _checkpoint_damage(ckpt)
        if damage is None:
            return ckpt
        warnings.warn(f"{ckpt}: {damage}; resuming from an older checkpoint", stacklevel=2)
    return None


def _checkpoint_damage(ckpt: Path) -> str | None:
    """Why ``ckpt`` cannot be resumed from, or None if every file is as it was written."""
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, ValueError):
        return f"no readable {STATE_FILE}"
    want = state.get("files")
    if want is None:  # written before checkpoints listed their files
        return None
    mismatch = digest_mismatch(want, folder_digests(ckpt, skip=(STATE_FILE,)))
    if mismatch is None or mismatch[1] == "extra":  # a file added later is never read
        return None
    rel, kind = mismatch
    return f"{rel} is missing" if kind == "missing" else f"{rel} does not match its sha256"


def _save_checkpoint(
    engine, out: Path, step: int, position, pseudo, keep: int, seconds: float
) -> None:
    """Write a checkpoint that a reader finds whole or not at all.

    All ranks write their shards into one hidden folder; the main rank adds the loop position
    and renames it into place.
    """
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
            files = folder_digests(partial)  # the engine's files: the state is not written yet
            state = {**where, "pseudo_queries": pseudo, "seconds": seconds, "files": files}
            write_json(partial / STATE_FILE, state)
            replace_dir(partial, target)
            for old in sorted((out / "checkpoints").glob("step-*"))[: -max(keep, 1)]:
                shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if engine.is_main:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    engine.barrier()


def _cached_negatives(engine, negatives, index, processor, root, cfg, tasks, texts):
    """The negatives' memorize/retrieve answers, cached.

    Of the tasks this run trains, in its mix: memorize examples ``memorize_repeats`` times.
    """
    from grace.training.cached_negatives import cache_negatives

    images = ImageInputs(processor, negatives, root)
    id_tasks = [t for t in tasks if t in ID_TASKS]
    examples = build_examples(
        negatives,
        index,
        processor,
        images,
        cfg.prompts,
        id_tasks,
        texts=texts,
        memorize_repeats=cfg.memorize_repeats,
    )
    pad = tokenizer_of(processor).pad_token_id
    return cache_negatives(
        engine.module,
        examples,
        images,
        texts,
        index.trie,
        pad,
        cfg.train_rows_from,
        engine.device,
        batch_size=cfg.batch_size,
    )


def _train_only_rows(model: torch.nn.Module, start: int) -> None:
    """Freeze everything but the embedding and output rows of tokens ``start:``.

    Gradients of the other rows are zeroed, so Adam (whose moments stay zero) and clipping
    leave them as they are. A model with an identifier table (lite) trains rows of that table;
    others, rows of their grown vocabulary.
    """
    table = getattr(model, "identifiers", None)
    if table is not None and hasattr(table, "offset"):
        first, tensors = start - table.offset, (table.inputs, table.outputs)
        rows = table.offset + table.rows
    else:
        embeddings = (model.get_input_embeddings(), model.get_output_embeddings())
        first, tensors = start, tuple({id(t.weight): t.weight for t in embeddings}.values())
        rows = model.get_input_embeddings().weight.shape[0]
    if not 0 <= first < tensors[0].shape[0]:
        raise GraceError(
            f"train_rows_from={start} leaves no row to train: the model has {rows} token rows "
            "(only atomic and per-node structured identifiers add rows)"
        )
    for p in model.parameters():
        p.requires_grad_(False)
    for weight in tensors:
        weight.requires_grad_(True)
        weight.register_hook(lambda grad, first=first: _rows_from(grad, first))


def _rows_from(grad: torch.Tensor, first: int) -> torch.Tensor:
    """``grad`` with the rows before ``first`` zeroed (dense) or dropped (sparse)."""
    if grad.is_sparse:
        grad = grad.coalesce()
        keep = grad.indices()[0] >= first
        return torch.sparse_coo_tensor(
            grad.indices()[:, keep], grad.values()[keep], grad.shape, check_invariants=False
        )
    keep = torch.zeros(grad.shape[0], 1, dtype=grad.dtype, device=grad.device)
    keep[first:] = 1
    return grad * keep


def _param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases, norms and embeddings (as in nanoGPT).

    Parameters that get sparse gradients (identifier rows) form a group of their own, for the
    lazy Adam that updates only the rows a step used
    (:class:`~grace.training.engine.DenseAndSparseAdam`).
    """
    sparse = {
        id(p)
        for m in model.modules()
        if getattr(m, "sparse", False) is True and hasattr(m, "set_sparse")
        for p in m.parameters(recurse=False)
    }
    decay, no_decay, sparse_rows = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in sparse:
            sparse_rows.append(p)
            continue
        rows = "embed" in name or name.startswith("identifiers.")  # token rows: no decay
        (decay if p.ndim >= 2 and not rows else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return groups + ([{"params": sparse_rows, "sparse": True}] if sparse_rows else [])


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
