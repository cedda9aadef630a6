"""Identifier rows in a table of their own, beside the text vocabulary.

Atomic and per-node structured identifiers add one token per image (or tree node). Grown into
the text vocabulary with ``resize_token_embeddings``, every step's head would be a matmul over
all of them and every dense optimizer step would update all of them: the cost of a step would
grow with the catalog. Here the tokens after the text vocabulary (``offset``) index two
``nn.Embedding`` tables, one for the decoder's input and one of output rows, with sparse
gradients: a step gathers and updates only the rows its batch uses (the identifier tree's
children of each position, :mod:`grace.models.lite.modeling_lite`). Memory per id:
``2 * hidden * 4`` bytes in fp32, plus the sparse Adam moments of the rows ever trained
(BENCHMARKS.md#identifier-rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class IdentifierTable(nn.Module):
    """Input and output rows of the identifier tokens ``offset, offset + 1, ...``.

    Args:
        rows: How many identifier tokens.
        hidden: The decoder width.
        offset: Token id of the first identifier (the text vocabulary's size).
        sparse: Sparse gradients (a lazy Adam then updates only the rows a batch used);
            DeepSpeed's optimizers need dense ones (:meth:`set_sparse`).
    """

    def __init__(self, rows: int, hidden: int, offset: int, sparse: bool = True) -> None:
        super().__init__()
        self.offset, self.sparse = int(offset), bool(sparse)
        self.inputs = nn.Parameter(torch.zeros(rows, hidden))
        self.outputs = nn.Parameter(torch.zeros(rows, hidden))

    @property
    def rows(self) -> int:
        """How many identifier tokens the table holds."""
        return self.inputs.shape[0]

    def set_sparse(self, sparse: bool) -> None:
        """Switch between sparse and dense gradients (before an optimizer is built)."""
        self.sparse = bool(sparse)

    def input_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The input embeddings of identifier ``tokens`` (all ``>= offset``)."""
        return F.embedding(tokens - self.offset, self.inputs, sparse=self.sparse)

    def output_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """The output rows of identifier ``tokens`` (all ``>= offset``)."""
        return F.embedding(tokens - self.offset, self.outputs, sparse=self.sparse)

    @torch.no_grad()
    def grow(self, rows: int, input_mean: torch.Tensor, output_mean: torch.Tensor) -> None:
        """Append rows up to ``rows`` in all, each starting at the given mean row.

        A new id then starts where an average token is, not as an outlier (transformers'
        ``mean_resizing``); old rows are kept as they are.
        """
        extra = int(rows) - self.rows
        if extra < 0:
            raise ValueError(f"the table has {self.rows} rows; it cannot shrink to {rows}")
        if extra == 0:
            return
        for name, mean in (("inputs", input_mean), ("outputs", output_mean)):
            old = getattr(self, name)
            new = mean.to(old.dtype).expand(extra, -1)
            setattr(self, name, nn.Parameter(torch.cat([old.data, new]), old.requires_grad))
