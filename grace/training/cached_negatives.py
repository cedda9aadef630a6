"""Every old image as a negative for the rows a run trains alone, at a fixed per-step cost.

When every weight but some embedding/output rows is frozen (``TrainConfig.train_rows_from``: an
incremental update training only its new atomic ids), an old image's hidden states at its
answer positions cannot change, nor can the frozen rows' logits of them. So they are computed
once, with the frozen model: per answer position the output head's input, the target's logit
and the log-sum-exp of the frozen rows' logits. A step then needs only the trained rows'
logits of those states, and the cross-entropy over the whole vocabulary follows exactly::

    loss = logsumexp([frozen_lse, h @ W[start:]^T]) - target_logit

Its gradient reaches the trained rows alone and pushes a new id down wherever it would outscore
an old image's own answer, for all old images and not just a replayed sample, without a
forward pass of any of them during training. An example listed k times (``memorize_repeats``)
is run once and weighs k, as it would among the training examples: the new image's memorize
answer and the old images' it must not take then keep the training run's balance.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from grace.constants import IGNORE_INDEX
from grace.errors import GraceError
from grace.training.examples import Example, ImageInputs, TextInputs, collate

# tasks whose answers are identifiers: where a new id can take an old image's place
ID_TASKS = ("memorize", "retrieve")


@dataclass
class CachedNegatives:
    """The answer positions of the old examples, computed once with the frozen model.

    Args:
        hidden (`torch.Tensor`):
            ``[M, d]`` the output head's input at each answer position.
        frozen_lse (`torch.Tensor`):
            ``[M]`` log-sum-exp of the frozen rows' logits (rows below ``start``).
        target_logit (`torch.Tensor`):
            ``[M]`` the logit of each position's target token.
        weight (`torch.Tensor`):
            ``[M]`` how many times the position's example was listed (a constant).
        start (`int`):
            First trained row of the head: rows ``start:`` train.
        examples (`int`):
            Examples cached, counted as listed.
    """

    hidden: torch.Tensor
    frozen_lse: torch.Tensor
    target_logit: torch.Tensor
    weight: torch.Tensor
    start: int
    examples: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def loss_sum(self, head: torch.nn.Module) -> torch.Tensor:
        """The summed cross-entropy of every cached answer position against the whole vocabulary.

        Each position counts its weight times; the sum is differentiable in the head's trained
        rows only.
        """
        logits = self.hidden @ head.weight[self.start :].T
        if getattr(head, "bias", None) is not None:
            logits = logits + head.bias[self.start :]
        every = torch.cat([self.frozen_lse[:, None], logits.float()], dim=1)
        return ((torch.logsumexp(every, dim=1) - self.target_logit) * self.weight).sum()


@torch.no_grad()
def cache_negatives(
    model: torch.nn.Module,
    examples: Sequence[Example],
    images: ImageInputs,
    texts: TextInputs,
    pad_token_id: int,
    start: int,
    device: torch.device,
    batch_size: int = 64,
) -> CachedNegatives:
    """Run the frozen ``model`` once over each distinct example and keep what the loss needs.

    The answers of ``examples`` must be frozen rows, below ``start``; the result holds what
    :meth:`CachedNegatives.loss_sum` needs, on ``device``.

    Raises:
        GraceError: If the output table is partitioned (ZeRO-3), or an answer is a trained row.
    """
    if not examples:
        raise ValueError("no examples to cache as negatives")
    head = model.get_output_embeddings()
    if head.weight.numel() == 0:
        raise GraceError(
            "cached negatives need the whole output table on every rank; ZeRO-3 partitions it "
            "(use ZeRO-2, or no deepspeed config)"
        )
    captured: list[torch.Tensor] = []
    hook = head.register_forward_hook(lambda _m, args, _out: captured.append(args[0]))
    listed = Counter(examples)
    hidden, lse, target, weight = [], [], [], []
    was_training = model.training
    model.eval()
    try:
        for members in _batches(list(listed), batch_size):
            batch = collate(members, images, pad_token_id, texts)
            labels = batch.pop("labels")[:, 1:]  # position t predicts token t + 1
            captured.clear()
            model(**{k: v.to(device) for k, v in batch.items()})
            answer = labels != IGNORE_INDEX
            h = captured[-1][:, :-1][answer.to(device)].float()
            y = labels[answer].to(device)
            if int(y.max()) >= start:
                raise GraceError(
                    f"a cached negative's answer is token {int(y.max())}, a trained row "
                    f"(>= {start}): only answers in frozen rows have fixed logits"
                )
            logits = head(h.to(head.weight.dtype)).float()
            hidden.append(h)
            lse.append(torch.logsumexp(logits[:, :start], dim=1))
            target.append(logits.gather(1, y[:, None])[:, 0])
            times = torch.tensor([float(listed[m]) for m in members])[:, None]
            weight.append(times.expand(answer.shape)[answer].to(device))
    finally:
        hook.remove()
        model.train(was_training)
    return CachedNegatives(
        torch.cat(hidden).to(head.weight.dtype),
        torch.cat(lse),
        torch.cat(target),
        torch.cat(weight),
        start,
        len(examples),
    )


def _batches(examples: Sequence[Example], size: int) -> list[list[Example]]:
    """Batches of one task and modality each (what ``collate`` accepts), in a fixed order."""
    groups: dict[tuple[str, bool], list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.task, ex.image is not None), []).append(ex)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
