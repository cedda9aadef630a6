"""The multimodal LLM behind GRACE: any Hugging Face image-text-to-text model, or a tiny one.

Real backbones (SmolVLM/Idefics3, Qwen2-VL, LLaVA, PaliGemma, ...) load by hub id or local path
through ``AutoModelForImageTextToText`` + ``AutoProcessor``. The tiny default is an Idefics3
built from a config with random init and a tokenizer trained offline on the set's texts, saved
with ``save_pretrained`` so that both go through the same loading path afterwards.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from grace.models.tokenization import add_identifier_tokens


def llama_text_config(
    tok: PreTrainedTokenizerBase, hidden: int, layers: int, heads: int, intermediate: int = 0
) -> dict:
    """The small Llama decoder of the built-in backbones, sized to ``tok``'s vocabulary."""
    return dict(
        model_type="llama",
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=512,
        pad_token_id=tok.pad_token_id,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )


def seeded_model(
    cls: type[PreTrainedModel], config, tok: PreTrainedTokenizerBase, seed: int
) -> PreTrainedModel:
    """A random-init model, the same for a seed whatever the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(config)
    _sync_generation_ids(model, tok)
    return model


def tokenizer_of(processor: ProcessorMixin | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The tokenizer of a processor (its ``.tokenizer``), or the argument if it is a tokenizer."""
    return getattr(processor, "tokenizer", processor)


def add_identifier_vocabulary(
    model: PreTrainedModel, processor: ProcessorMixin, tokens: Iterable[str]
) -> int:
    """Give the tokenizer whole-identifier tokens (atomic, structured) and rows for them.

    A model with an identifier table of its own (``grow_identifier_rows``, the lite backbone)
    appends rows there; others grow their vocabulary. New rows start at the mean of the existing
    ones (transformers' default for ``mean_resizing``), so a new id token is not an outlier at
    the first step.
    """
    tok = tokenizer_of(processor)
    added = add_identifier_tokens(tok, tokens)
    grow = getattr(model, "grow_identifier_rows", None)
    if grow is not None:
        grow(len(tok))
    elif len(tok) > model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(len(tok), mean_resizing=True)
    return added


def _sync_generation_ids(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    """``generate`` reads pad/eos from the generation config: make them the tokenizer's.

    A pad id of 0 is read as "missing" by beam search, which then pads finished beams with EOS.
    """
    gc = model.generation_config
    if tok.pad_token_id is not None:
        gc.pad_token_id = tok.pad_token_id
    if tok.eos_token_id is not None:
        gc.eos_token_id = tok.eos_token_id
