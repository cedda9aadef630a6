"""Every old image as a negative for the rows a run trains alone, at a fixed per-step cost.

When every weight but some identifier rows is frozen (``TrainConfig.train_rows_from``: an
incremental update training only its new ids' rows), an old image's hidden states at its answer
positions cannot change, nor can the frozen rows' logits of them. An answer token is scored
among its trie node's children (the factorized softmax of training and search), so per answer
position whose children include a trained row, the frozen model's hidden state, the target's
logit and the log-sum-exp of the frozen children's logits are computed once. A step then needs
only the trained children's logits of those states, and the cross-entropy over the children
follows exactly::

    loss = logsumexp([frozen_lse, h @ W[trained children]^T]) - target_logit

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
from grace.retrieval.trie import Trie
from grace.training.choices import ID_TASKS, label_choices
from grace.training.examples import Example, ImageInputs, TextInputs, collate

__all__ = ["ID_TASKS", "CachedNegatives", "cache_negatives"]


@dataclass
class CachedNegatives:
    """The answer positions of the old examples that a trained row competes at, computed once.

    Args:
        hidden (`torch.Tensor`):
            ``[M, d]`` the decoder's output at each answer position.
        frozen_lse (`torch.Tensor`):
            ``[M]`` log-sum-exp of the frozen children's logits (tokens below ``start``).
        target_logit (`torch.Tensor`):
            ``[M]`` the logit of each position's target token.
        trained (`torch.Tensor`):
            ``[M, K]`` the position's trained children (tokens ``>= start``), -1 padded.
        weight (`torch.Tensor`):
            ``[M]`` how many times the position's example was listed (a constant).
        start (`int`):
            First trained token: rows of tokens ``start:`` train.
        examples (`int`):
            Examples cached, counted as listed.
    """

    hidden: torch.Tensor
    frozen_lse: torch.Tensor
    target_logit: torch.Tensor
    trained: torch.Tensor
    weight: torch.Tensor
    start: int
    examples: int

    def __len__(self) -> int:
        return self.hidden.shape[0]

    def loss_sum(self, model: torch.nn.Module) -> torch.Tensor:
        """The summed cross-entropy of every cached answer position among its children.

        Each position counts its weight times; the sum is differentiable in the model's trained
        rows only.
        """
        if not len(self):
            return self.hidden.new_zeros(())
        logits = model.choice_logits(self.hidden, self.trained)
        every = torch.cat([self.frozen_lse[:, None], logits], dim=1)
        return ((torch.logsumexp(every, dim=1) - self.target_logit) * self.weight).sum()


@torch.no_grad()
def cache_negatives(
    model: torch.nn.Module,
    examples: Sequence[Example],
    images: ImageInputs,
    texts: TextInputs,
    trie: Trie,
    pad_token_id: int,
    start: int,
    device: torch.device,
    batch_size: int = 64,
) -> CachedNegatives:
    """Run the frozen ``model`` once over each distinct example and keep what the loss needs.

    The answers of ``examples`` must be frozen rows, below ``start``; ``trie`` holds every
    identifier, old and new (the children a position is scored among). The result holds what
    :meth:`CachedNegatives.loss_sum` needs, on ``device``.

    Raises:
        GraceError: If the model scores no children (not the lite backbone), or an answer is
            a trained row.
    """
    if not examples:
        raise ValueError("no examples to cache as negatives")
    if not hasattr(model, "choice_logits"):
        raise GraceError(
            "cached negatives need a backbone that scores identifier tokens among their trie "
            "children (the lite backbone); use all_old_negatives=false with this one"
        )
    listed = Counter(examples)
    hidden, lse, target, trained, weight = [], [], [], [], []
    was_training = model.training
    model.eval()
    try:
        for members in _batches(list(listed), batch_size):
            batch = collate(members, images, pad_token_id, texts)
            labels = batch.pop("labels")
            choices = label_choices(labels, trie).to(device)
            answer = labels[:, 1:] != IGNORE_INDEX
            y = labels[:, 1:][answer].to(device)
            if int(y.max()) >= start:
                raise GraceError(
                    f"a cached negative's answer is token {int(y.max())}, a trained row "
                    f"(>= {start}): only answers in frozen rows have fixed logits"
                )
            h = model.answer_hidden(
                labels.to(device), **{k: v.to(device) for k, v in batch.items()}
            )
            logits = model.choice_logits(h, choices)
            new = choices >= start
            keep = new.any(1)  # elsewhere no trained row competes: the loss is a constant
            frozen = logits.masked_fill(new, float("-inf"))
            hidden.append(h[keep].float())
            lse.append(torch.logsumexp(frozen[keep], dim=1))
            target.append(
                logits.gather(1, (choices == y[:, None]).float().argmax(1, True))[keep, 0]
            )
            trained.append(_packed(torch.where(new, choices, -1)[keep]))
            times = torch.tensor([float(listed[m]) for m in members])[:, None]
            weight.append(times.expand(answer.shape)[answer].to(device)[keep])
    finally:
        model.train(was_training)
    width = max(t.shape[1] for t in trained)
    trained = [torch.nn.functional.pad(t, (0, width - t.shape[1]), value=-1) for t in trained]
    return CachedNegatives(
        torch.cat(hidden),
        torch.cat(lse),
        torch.cat(target),
        torch.cat(trained),
        torch.cat(weight),
        start,
        len(examples),
    )


def _packed(choices: torch.Tensor) -> torch.Tensor:
    """``choices`` with each row's tokens (>= 0) moved left and the columns of padding cut."""
    order = torch.sort((choices < 0).to(torch.int8), dim=1, stable=True).indices
    packed = choices.gather(1, order)
    width = int((choices >= 0).sum(1).max()) if choices.numel() else 0
    return packed[:, : max(width, 1)]


def _batches(examples: Sequence[Example], size: int) -> list[list[Example]]:
    """Batches of one task and modality each (what ``collate`` accepts), in a fixed order."""
    groups: dict[tuple[str, bool], list[Example]] = {}
    for ex in examples:
        groups.setdefault((ex.task, ex.image is not None), []).append(ex)
    return [g[i : i + size] for g in groups.values() for i in range(0, len(g), size)]
