"""The ``tiny`` backbone: a small Idefics3 (SmolVLM architecture) built from a config, random init.

Kept as the fast, fully-Hugging-Face test backbone (docs/training.md#backbones).
"""

from __future__ import annotations

from collections.abc import Iterable

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedModel,
    ProcessorMixin,
)

from grace.models.backbone import llama_text_config, seeded_model
from grace.models.settings import TinyBackboneConfig
from grace.models.tokenization import train_tokenizer

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
    """Build a small Idefics3 with random init and a BPE tokenizer trained on ``texts``.

    Args:
        texts: Texts the tokenizer is trained on (the set's captions).
        cfg: Shape of the backbone.
        seed: Seed of the random init.

    Returns:
        The model and its ``Idefics3Processor``.
    """
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
