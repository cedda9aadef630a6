"""Decode steps of a Llama-family text decoder run straight from its weights.

Why: a beam step of the tiny backbone is ~60 MFLOP, but one pass through transformers' modules
costs ~2 ms of Python and small ops whatever the size, which is most of a query. Here a step is
one fused QKV and one fused gate/up matmul per layer, keys and values are written into buffers
allocated once per search (no cache concatenation), and nothing else runs. The prefill (images
included) still goes through the model, whose cache is copied into the buffers.

Only plain Llama layers qualify (``LlamaDecoderLayer``: RMSNorm, rotary embeddings, SiLU gated
MLP, no biases); anything else returns ``None`` from ``LlamaSteps.of`` and the caller keeps
using the model. ``tests/test_beam_search.py`` holds both paths to ``generate``'s rankings.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaModel,
    apply_rotary_pos_emb,
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


def _rms(x: torch.Tensor, norm: nn.Module) -> torch.Tensor:
    """``LlamaRMSNorm`` as one fused op (float32 weights, as the tiny backbone has)."""
    return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)


class LlamaSteps:
    """Fused weights of a Llama decoder, and ``step`` to run new tokens over a KV buffer."""

    def __init__(self, text: LlamaModel, head: nn.Module) -> None:
        cfg = text.config
        self.embed = text.embed_tokens
        self.rotary = text.rotary_emb
        self.norm = text.norm
        self.head = head
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = []
        for layer in text.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append(
                (
                    layer.input_layernorm,
                    torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]),
                    a.o_proj.weight,
                    layer.post_attention_layernorm,
                    torch.cat([m.gate_proj.weight, m.up_proj.weight]),
                    m.down_proj.weight,
                    a.scaling,
                )
            )

    @classmethod
    def of(cls, model: PreTrainedModel) -> LlamaSteps | None:
        """The fused decoder of ``model``, cached on it; None if it is not plain Llama."""
        found = _decoder(model)
        if found is None:
            return None
        text, head = found
        cfg = text.config
        plain = (
            all(type(layer) is LlamaDecoderLayer for layer in text.layers)
            and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "hidden_act", "silu") == "silu"
            and getattr(head, "bias", None) is None
            and not model.training
            and text.embed_tokens.weight.dtype == torch.float32
        )
        if not plain or sum(p.numel() for p in text.parameters()) > MAX_PARAMETERS:
            return None
        version = tuple(p._version for p in model.parameters())  # weights changed: refuse
        cached = getattr(model, "_grace_llama_steps", None)
        if cached is None or cached[0] != version:
            cached = (version, cls(text, head))
            model._grace_llama_steps = cached
        return cached[1]

    def buffers(self, cache, extra: int) -> tuple[list[torch.Tensor], list[torch.Tensor], int]:
        """Key/value buffers holding the prefilled ``cache`` with room for ``extra`` tokens."""
        keys, values = [], []
        for layer in cache.layers:
            k, v = layer.keys, layer.values
            b, h, n, d = k.shape
            kb = k.new_empty(b, h, n + extra, d)
            vb = v.new_empty(b, h, n + extra, d)
            kb[:, :, :n] = k
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
    ) -> torch.Tensor:
        """Logits ``(batch, new, vocab)`` of ``tokens`` ``(batch, new)``; their keys and values go
        to positions ``filled:filled + new`` of the buffers; ``keep`` ``(batch, new, filled +
        new)`` says which cached tokens each new one attends to. ``last_only``: logits of the
        last new token only (a prefill)."""
        x = self.embed(tokens)
        cos, sin = self.rotary(x, positions)
        b, t = tokens.shape
        end = filled + t
        mask = keep[:, None]
        q_end, k_end = self.heads * self.head_dim, (self.heads + self.kv_heads) * self.head_dim
        for (ln1, wqkv, wo, ln2, wgu, wd, scaling), kb, vb in zip(
            self.layers, keys, values, strict=True
        ):
            h = F.linear(_rms(x, ln1), wqkv)
            q = h[..., :q_end].view(b, t, self.heads, self.head_dim).transpose(1, 2)
            k = h[..., q_end:k_end].view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            v = h[..., k_end:].view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            kb[:, :, filled:end] = k
            vb[:, :, filled:end] = v
            a = F.scaled_dot_product_attention(
                q,
                kb[:, :, :end],
                vb[:, :, :end],
                attn_mask=mask,
                scale=scaling,
                enable_gqa=self.kv_heads != self.heads,
            )
            x = x + F.linear(a.transpose(1, 2).reshape(b, t, -1), wo)
            gate, up = F.linear(_rms(x, ln2), wgu).chunk(2, dim=-1)
            x = x + F.linear(F.silu(gate) * up, wd)
        if last_only:
            x = x[:, -1:]
        return self.head(_rms(x, self.norm))
