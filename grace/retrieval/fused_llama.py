"""Decode steps of a Llama-family text decoder run straight from its weights.

Why: a beam step of the small built-in decoders is little arithmetic, and one pass through
transformers' modules costs a fixed overhead of Python and small ops that is most of a query
(docs/performance.md, BENCHMARKS.md). Here a step is one fused QKV and one fused gate/up matmul
per layer, keys and values are written into buffers
allocated once per search (no cache concatenation), and nothing else runs: the RMSNorm weights
are folded into the matmul after them, rotary angles come from a table and turn queries and keys
with one complex multiply, and one additive attention mask serves all layers. A prompt with
images or other features is prefilled by the model (whose cache is then copied into the buffers)
unless the model gives its input embeddings (``prompt_embeddings``, as the lite backbone does).

Only plain Llama layers qualify (``LlamaDecoderLayer``: RMSNorm, rotary embeddings, SiLU gated
MLP, no biases); anything else returns ``None`` from ``LlamaSteps.of`` and the caller keeps
using the model. ``tests/retrieval/test_beam_search.py`` holds both paths to ``generate``'s
rankings.
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaModel,
)

MAX_PARAMETERS = 200_000_000
"""Larger decoders are compute-bound (the Python saved is noise) and the fused copies of their
weights would cost memory: they keep the model's own forward."""


def _decoder(model: PreTrainedModel) -> tuple[LlamaModel, nn.Module] | None:
    """(Llama text model, LM head) of a causal LM or of a vision-language wrapper, if any."""
    head = model.get_output_embeddings()
    inner = getattr(model, "model", None)
    for text in (inner, getattr(inner, "text_model", None)):
        if isinstance(text, LlamaModel) and head is not None:
            return text, head
    return None


def _rms(x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``LlamaRMSNorm`` without its weight (folded into the next matmul), in three ops.

    The mean square comes from the vector norm, then ``x / sqrt(mean + eps)``. ``F.rms_norm``
    decomposes into more small ops on CPU, slower at a decode step's size.
    """
    n = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    return x * torch.addcmul(eps, n, n, value=1.0 / x.shape[-1]).rsqrt_()


def _packed_linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``F.linear(x, w)`` with ``w`` from ``_pack``."""
    return torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")


def _pairs_side_by_side(head_dim: int) -> torch.Tensor:
    """Row order of a head that puts Llama's rotated pairs ``(i, i + head_dim / 2)`` side by side.

    Rotary embedding then becomes one complex multiply. Queries and keys are permuted alike,
    which leaves their dot products (and so attention) unchanged.
    """
    half = torch.arange(head_dim // 2)
    return torch.stack([half, half + head_dim // 2], dim=-1).flatten()


def _packed_matmuls(like: torch.Tensor) -> bool:
    """Whether weights can be prepacked for oneDNN here (float32 on a CPU that has it).

    ``torch.compile`` freezes CPU linears this way. Whether it pays depends on the CPU (see
    ``_packing_pays``).
    """
    return (
        like.device.type == "cpu"
        and like.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    )


def _packing_pays(weights: list[torch.Tensor], rows: int = 10, rounds: int = 7) -> bool:
    """Whether oneDNN's packed matmuls beat ``F.linear`` (MKL) on this CPU for ``weights``.

    Each weight is applied to ``rows`` rows as one query's beam step does: a probe of a few
    milliseconds, once per fused model. Packing is faster on some CPUs and slower on others
    (docs/performance.md), so neither choice can be fixed. Packing must win by 5 %, so that a
    near tie keeps MKL; both are float32 and rank alike.
    """
    packed = [_pack(w) for w in weights]
    xs = [torch.randn(rows, w.shape[1], dtype=w.dtype) for w in weights]
    plain_times, packed_times = [], []
    with torch.no_grad():
        for _ in range(rounds):  # interleaved, so a change of load hits both alike
            for ws, times, run in (
                (weights, plain_times, F.linear),
                (packed, packed_times, _packed_linear),
            ):
                t0 = time.perf_counter()
                for x, w in zip(xs, ws, strict=True):
                    run(x, w)
                times.append(time.perf_counter() - t0)
    return statistics.median(packed_times[1:]) < 0.95 * statistics.median(plain_times[1:])


def _pack(w: torch.Tensor) -> torch.Tensor:
    """``w`` in oneDNN's blocked layout (any row count > 1 gets the same layout)."""
    return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 16)


_STATIC_ROPE = ("default", "linear", "llama3", "yarn")
"""Rotary types whose angles depend on the position only, so that a table can hold them."""


class LlamaSteps:
    """Fused weights of a Llama decoder, and ``step`` to run new tokens over a KV buffer.

    Keys live in the buffers with each head's rows in ``_pairs_side_by_side`` order.
    """

    def __init__(self, text: LlamaModel, head: nn.Module, packed: bool | None = None) -> None:
        """``packed``: the matmul path (None: ``_packing_pays`` decides, on a prepacking CPU)."""
        cfg = text.config
        self._text = text
        self._sources = [text.embed_tokens.weight, head.weight, text.norm.weight]
        self._sources += [w for layer in text.layers for w in layer.parameters()]
        self._versions = [w._version for w in self._sources]
        self.embed = text.embed_tokens
        self.rotary = text.rotary_emb
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.order = _pairs_side_by_side(self.head_dim)
        d = self.head_dim

        def paired(w: torch.Tensor, heads: int) -> torch.Tensor:
            return w.view(heads, d, -1)[:, self.order].reshape(heads * d, -1)

        self.eps = torch.tensor(text.norm.variance_epsilon)
        layers = []
        for layer in text.layers:
            a, m = layer.self_attn, layer.mlp
            qkv = [paired(a.q_proj.weight, self.heads), paired(a.k_proj.weight, self.kv_heads)]
            layers.append(
                [
                    torch.cat([*qkv, a.v_proj.weight]) * layer.input_layernorm.weight,
                    a.o_proj.weight,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight])
                    * layer.post_attention_layernorm.weight,
                    m.down_proj.weight,
                ]
            )
        head_weight = head.weight * text.norm.weight
        if not _packed_matmuls(self.embed.weight):
            self.packed = False
        elif packed is None:
            self.packed = _packing_pays([*layers[0], head_weight])
        else:
            self.packed = packed
        pack = _pack if self.packed else lambda w: w
        self.layers = [
            (*(pack(w) for w in ws), layer.self_attn.scaling)
            for ws, layer in zip(layers, text.layers, strict=True)
        ]
        self.head = pack(head_weight)
        self.norm_weight = text.norm.weight.detach().clone()
        self._turns = torch.zeros(0, d // 2, dtype=torch.complex64)

    def _rotation(self, positions: torch.Tensor) -> torch.Tensor:
        """``(batch, new, 1, head_dim / 2)`` complex rotations of ``positions``.

        They come from a table that the model's own rotary module fills (so the angles are its
        own) and that grows on need.
        """
        need = int(positions.max()) + 1
        if need > self._turns.shape[0]:
            at = torch.arange(max(need, 2 * self._turns.shape[0], 512), device=positions.device)
            cos, sin = self.rotary(self.embed.weight, at[None])
            half = self.head_dim // 2
            self._turns = torch.complex(cos[0, :, :half], sin[0, :, :half])
        return self._turns[positions][:, :, None]

    @classmethod
    def of(cls, model: PreTrainedModel) -> LlamaSteps | None:
        """The fused decoder of ``model``, cached on it; None while it trains or is not plain Llama.

        The cache is rebuilt once the weights it copied change (in place, or the embeddings or
        head replaced). A hit checks only those weights, a negligible cost per query.
        """
        found = _decoder(model)
        if found is None or model.training:
            return None
        text, head = found
        cached = getattr(model, "_grace_llama_steps", None)
        if cached is not None and cached._reads(text, head):
            return cached
        cfg = text.config
        plain = (
            all(type(layer) is LlamaDecoderLayer for layer in text.layers)
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "hidden_act", "silu") == "silu"
            and getattr(head, "bias", None) is None
            and text.embed_tokens.weight.dtype == torch.float32
            and text.rotary_emb.rope_type in _STATIC_ROPE
        )
        if not plain or sum(p.numel() for p in text.parameters()) > MAX_PARAMETERS:
            return None
        # a rebuild keeps the path the probe chose for this model: same numerics, no new probe
        model._grace_llama_steps = cls(text, head, cached.packed if cached is not None else None)
        return model._grace_llama_steps

    def _reads(self, text: LlamaModel, head: nn.Module) -> bool:
        """Whether these fused weights are still those of ``text`` and ``head``."""
        return (
            self._text is text
            and text.embed_tokens.weight is self._sources[0]
            and head.weight is self._sources[1]
            and [w._version for w in self._sources] == self._versions
        )

    def buffers(self, cache, extra: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Key/value buffers holding the prefilled ``cache`` with room for ``extra`` tokens."""
        keys, values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            b, h, n, d = k.shape
            kb = k.new_empty(b, h, n + extra, d)
            vb = v.new_empty(b, h, n + extra, d)
            kb[:, :, :n] = k[..., self.order]  # the buffers' order of a head's rows
            vb[:, :, :n] = v
            keys.append(kb)
            values.append(vb)
        return keys, values, cache.layers[0].keys.shape[2]

    def empty_buffers(
        self, batch: int, length: int, like: torch.Tensor
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Key/value buffers for ``length`` tokens of ``batch`` rows, to prefill with ``step``."""
        dtype = self.embed.weight.dtype
        shape = (batch, self.kv_heads, length, self.head_dim)
        make = lambda: torch.empty(shape, dtype=dtype, device=like.device)  # noqa: E731
        return [make() for _ in self.layers], [make() for _ in self.layers]

    @torch.no_grad()
    def step(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        keep: torch.Tensor,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        filled: int,
        last_only: bool = False,
        embeds: torch.Tensor | None = None,
        hidden: bool = False,
    ) -> torch.Tensor:
        """Logits ``(batch, new, vocab)`` of ``tokens`` ``(batch, new)``.

        Their keys and values go to positions ``filled:filled + new`` of the buffers; ``keep``
        ``(batch, new, filled + new)`` says which cached tokens each new one attends to.
        ``last_only``: logits of the last new token only (a prefill). ``embeds``: the tokens'
        input embeddings, when the model puts more than token embeddings there (projected
        features, identifier rows). ``hidden``: the head's input ``(batch, new, hidden)``
        instead of logits, for a search that scores a few output rows only.
        """
        x = F.embedding(tokens, self.embed.weight) if embeds is None else embeds
        turn = self._rotation(positions)
        b, t = tokens.shape
        end = filled + t
        # one additive mask for all layers (SDPA would convert a boolean one in each)
        mask = torch.zeros(keep.shape, dtype=x.dtype, device=x.device)
        mask = mask.masked_fill_(~keep, float("-inf"))[:, None]
        rotated, k_end = self.heads + self.kv_heads, (self.heads + self.kv_heads) * self.head_dim
        linear = _packed_linear if self.packed else F.linear
        for (wqkv, wo, wgu, wd, scaling), kb, vb in zip(self.layers, keys, values, strict=True):
            h = linear(_rms(x, self.eps), wqkv)
            qk = torch.view_as_complex(h[..., :k_end].unflatten(-1, (rotated, -1, 2)))
            qk = torch.view_as_real(qk * turn).flatten(-2)
            q = qk[:, :, : self.heads].transpose(1, 2)
            kb[:, :, filled:end] = qk[:, :, self.heads :].transpose(1, 2)
            vb[:, :, filled:end] = h[..., k_end:].view(b, t, self.kv_heads, -1).transpose(1, 2)
            a = F.scaled_dot_product_attention(
                q,
                kb[:, :, :end],
                vb[:, :, :end],
                attn_mask=mask,
                scale=scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            x = x + linear(a.transpose(1, 2).reshape(b, t, -1), wo)
            gate, up = linear(_rms(x, self.eps), wgu).chunk(2, dim=-1)
            x = x + linear(F.silu(gate) * up, wd)
        if last_only:
            x = x[:, -1:]
        if hidden:
            return _rms(x, self.eps) * self.norm_weight
        return linear(_rms(x, self.eps), self.head)
