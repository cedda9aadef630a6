"""Train the dual encoder with the symmetric InfoNCE (CLIP) loss on an image set's own captions.

Sets are small, so every training image is preloaded once as one uint8 tensor and every caption
is tokenized once; a step samples one caption per image (caption augmentation). Training stops
at ``config.steps`` or ``config.max_seconds``, whichever comes first, and the cosine learning-rate
decay follows whichever of the two is nearer, so a time-budgeted run still ends annealed.
With ``max_seconds=None`` a run is deterministic for a seed (same thread count).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.models.dual_encoder.configuration import DualEncoderConfig
from grace.models.dual_encoder.modeling import DualEncoder, build_vocab, load_image_array

MetricsCallback = Callable[[int, dict[str, float]], None]


@contextmanager
def _threads(n: int | None):
    old = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def training_pairs(records: Sequence[ImageRecord]) -> list[ImageRecord]:
    """The records a dual encoder learns from: train split, with at least one caption."""
    return [r for r in records if r.split == "train" and any(c.strip() for c in r.captions)]


def clip_loss(logits: torch.Tensor, same_text: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over image-to-text ``logits``.

    ``same_text[i, j]`` marks identical captions, which count as positives too (a short caption
    shared by several images in a batch is not a negative for any of them).
    """
    t = same_text.float()
    t = t / t.sum(1, keepdim=True)
    return 0.5 * (F.cross_entropy(logits, t) + F.cross_entropy(logits.T, t))


def train_dual_encoder(
    records: Sequence[ImageRecord],
    root: str | Path,
    config: DualEncoderConfig | None = None,
    progress: bool = True,
    callback: MetricsCallback | None = None,
) -> DualEncoder:
    """Train a :class:`DualEncoder` on the train-split (image, caption) pairs of ``records``.

    ``callback(step, metrics)`` gets ``loss``, ``lr``, ``logit_scale``, ``seconds`` and
    ``epoch`` after every step (a plain hook: MLflow or anything else plugs in here).
    Returns the model in eval mode.
    """
    cfg = config or DualEncoderConfig()
    pairs = training_pairs(records)
    if len(pairs) < 2:
        raise GraceError(
            f"training a dual encoder needs at least 2 train-split images with captions, "
            f"got {len(pairs)}"
        )
    t_start = time.perf_counter()
    with _threads(cfg.num_threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        gen = torch.Generator().manual_seed(cfg.seed)
        model, data = _Pairs.load(pairs, Path(root), cfg)
        opt = _optimizer(model, cfg)
        n = len(pairs)
        bs = min(cfg.batch_size, n)
        per_epoch = max(1, n // bs)  # drop the ragged tail: tiny last batches make noisy InfoNCE
        model.train()
        bar = tqdm(  # disable=None: no bar when stderr is not a terminal (logs, pipelines)
            total=cfg.steps, desc="dual encoder", disable=None if progress else True, leave=False
        )
        perm = torch.randperm(n, generator=gen)
        step = 0
        try:
            while step < cfg.steps:
                elapsed = time.perf_counter() - t_start
                if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                    break
                lr = _lr(step, elapsed, cfg)
                for g in opt.param_groups:
                    g["lr"] = lr

                b = step % per_epoch
                if b == 0 and step > 0:
                    perm = torch.randperm(n, generator=gen)
                img, ids, same = data.batch(perm[b * bs : (b + 1) * bs], cfg.shift_pixels, gen)

                loss = clip_loss(model(img, ids), same)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                metrics = {
                    "loss": float(loss.detach()),
                    "lr": lr,
                    "logit_scale": float(model.scale().detach()),
                    "seconds": time.perf_counter() - t_start,
                    "epoch": step / per_epoch,
                }
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", refresh=False)
                if callback is not None:
                    callback(step, metrics)
        finally:
            bar.close()
    return model.eval()


@dataclass
class _Pairs:
    """The training pairs, preloaded: every image once, every caption tokenized once."""

    pixels: torch.Tensor
    """``(images, 3, size, size)`` uint8."""
    tokens: torch.Tensor
    """``(captions, length)`` every caption of every image, image by image."""
    text_id: torch.Tensor
    """``(captions,)`` identical captions (after tokenization) share one id."""
    offsets: torch.Tensor
    """``(images,)`` each image's first caption in ``tokens``."""
    counts: torch.Tensor
    """``(images,)`` its number of captions."""

    @classmethod
    def load(
        cls, pairs: Sequence[ImageRecord], root: Path, cfg: DualEncoderConfig
    ) -> tuple[DualEncoder, _Pairs]:
        """A fresh model, its vocabulary built from the captions, and the pairs it trains on."""
        captions = [[c for c in r.captions if c.strip()] for r in pairs]
        model = DualEncoder(
            cfg, build_vocab((c for cs in captions for c in cs), cfg.min_word_count)
        )
        pixels = torch.from_numpy(
            np.stack([load_image_array(root / r.path, cfg.image_size) for r in pairs])
        )
        tokens = model.tokenize([c for cs in captions for c in cs])
        # identical captions share one id, for the loss's positives mask
        seen: dict[tuple[int, ...], int] = {}
        text_id = torch.tensor([seen.setdefault(tuple(t), len(seen)) for t in tokens.tolist()])
        offsets = torch.tensor([0, *np.cumsum([len(cs) for cs in captions])[:-1].tolist()])
        counts = torch.tensor([len(cs) for cs in captions])
        return model, cls(pixels, tokens, text_id, offsets, counts)

    def batch(
        self, idx: torch.Tensor, max_shift: int, gen: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Images ``idx``, shifted, with one sampled caption each; which captions are the same."""
        pick = self.offsets[idx] + (torch.rand(len(idx), generator=gen) * self.counts[idx]).long()
        ids = self.tokens[pick]
        ids = ids[:, : int((ids != 0).sum(1).max())]
        img = _shift(self.pixels[idx], max_shift, gen)
        same = self.text_id[pick][:, None] == self.text_id[pick][None, :]
        return img, ids, same


def _optimizer(model: DualEncoder, cfg: DualEncoderConfig) -> torch.optim.AdamW:
    """AdamW without weight decay on biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim < 2 or name == "logit_scale" else decay).append(p)
    return torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": cfg.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=cfg.lr,
    )


def _lr(step: int, elapsed: float, cfg: DualEncoderConfig) -> float:
    """Linear warm-up times a cosine decay over the steps or the seconds, whichever is nearer."""
    frac = step / cfg.steps
    if cfg.max_seconds is not None:
        frac = max(frac, elapsed / cfg.max_seconds)
    lr = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup_steps))
    lr *= 0.5 * (1.0 + math.cos(math.pi * min(1.0, frac)))
    return lr


def _shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (edges replicated).

    A cheap augmentation, small enough to keep "top left" true.
    """
    if max_shift <= 0:
        return x
    n, _, h, w = x.shape
    pad = F.pad(x.float(), (max_shift,) * 4, mode="replicate").to(x.dtype)
    dy = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (n,), generator=gen)
    out = torch.empty_like(x)
    for oy in range(2 * max_shift + 1):
        for ox in range(2 * max_shift + 1):
            sel = (dy == oy) & (dx == ox)
            out[sel] = pad[sel, :, oy : oy + h, ox : ox + w]
    return out
