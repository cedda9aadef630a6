"""The multimodal LLM behind GRACE: any Hugging Face image-text-to-text model, or a tiny one.

Real backbones (SmolVLM/Idefics3, Qwen2-VL, LLaVA, PaliGemma, ...) load by hub id or local path
through ``AutoModelForImageTextToText`` + ``AutoProcessor``. The tiny default is an Idefics3
built from a config with random init and a tokenizer trained offline on the set's texts, saved
with ``save_pretrained`` so that both go through the same loading path afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import (
    AutoModelForImageTextToText,
    AutoProcessor,
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    ProcessorMixin,
)

from grace.configuration_grace import TinyBackboneConfig
from grace.tokenization import add_identifier_tokens, train_tokenizer

IDEFICS3_SPECIAL_TOKENS = ("<fake_token_around_image>", "<global-img>", "<end_of_utterance>")
# One user turn, then the answer. Enough for a model that never saw a chat format.
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% else %}{{ c['text'] }}{% endif %}"
    "{% endfor %}{% endfor %}{% if add_generation_prompt %} :{% endif %}"
)


def build_tiny_backbone(
    texts: Iterable[str], cfg: TinyBackboneConfig, seed: int = 0
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """A small Idefics3 with random init and a BPE tokenizer trained on ``texts``."""
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    tok = train_tokenizer(
        texts, vocab_size=cfg.vocab_size, extra_special_tokens=IDEFICS3_SPECIAL_TOKENS
    )
    side = {"longest_edge": cfg.image_size}
    image_processor = Idefics3ImageProcessorPil(
        do_resize=True, size=side, max_image_size=side, do_image_splitting=False
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tok,
        image_seq_len=cfg.image_seq_len,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=cfg.vision_hidden,
            intermediate_size=2 * cfg.vision_hidden,
            num_hidden_layers=cfg.vision_layers,
            num_attention_heads=cfg.heads,
            image_size=cfg.image_size,
            patch_size=cfg.patch_size,
        ),
        text_config=llama_text_config(tok, cfg.text_hidden, cfg.text_layers, cfg.heads),
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        scale_factor=cfg.scale_factor,
        pad_token_id=tok.pad_token_id,
    )
    return seeded_model(Idefics3ForConditionalGeneration, config, tok, seed), processor


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


def load_backbone(name_or_path: str | os.PathLike) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Load a saved GRACE model or any image-text-to-text backbone (hub id or local folder).

    A saved ``lite`` backbone (its processor is GRACE's own) loads through its classes.
    With ``HF_HUB_OFFLINE=1`` (tests, air-gapped clusters) only local files are used.
    """
    from grace.modeling_grace_lite import GraceLiteForConditionalGeneration
    from grace.processing_grace_lite import GraceLiteProcessor

    local = Path(name_or_path).is_dir()
    if local and GraceLiteProcessor.is_saved_in(name_or_path):
        processor = GraceLiteProcessor.from_pretrained(name_or_path)
        model = GraceLiteForConditionalGeneration.from_pretrained(str(name_or_path))
        _sync_generation_ids(model, processor.tokenizer)
        return model, processor
    offline = local or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    processor = AutoProcessor.from_pretrained(str(name_or_path), local_files_only=offline)
    model = AutoModelForImageTextToText.from_pretrained(str(name_or_path), local_files_only=offline)
    _sync_generation_ids(model, tokenizer_of(processor))
    return model, processor


def tokenizer_of(processor: ProcessorMixin | PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    return getattr(processor, "tokenizer", processor)


def add_identifier_vocabulary(
    model: PreTrainedModel, processor: ProcessorMixin, tokens: Iterable[str]
) -> int:
    """Give the tokenizer whole-identifier tokens (atomic, structured) and grow the embeddings.

    New rows start at the mean of the existing embeddings (transformers' default for
    ``mean_resizing``), so a new id token is not an outlier at the first step.
    """
    tok = tokenizer_of(processor)
    added = add_identifier_tokens(tok, tokens)
    if len(tok) > model.get_input_embeddings().weight.shape[0]:
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
