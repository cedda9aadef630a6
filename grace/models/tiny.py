"""The ``tiny`` backbone: a small Idefics3 (SmolVLM architecture) built from a config, random init.

Kept as the fast, fully-Hugging-Face test backbone (docs/training.md#backbones).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from transformers import (
    Idefics3Config,
    Idefics3ForConditionalGeneration,
    Idefics3Processor,
    PreTrainedModel,
    ProcessorMixin,
)

from grace.models.backbone import llama_text_config, seeded_model
from grace.models.tokenization import train_tokenizer


@dataclass
class TinyBackboneConfig:
    """The offline test backbone: an Idefics3 (SmolVLM architecture) from a config, random init.

    Idefics3's pixel shuffle cuts image tokens by ``scale_factor**2``: 64 px, patch 8 gives
    64 patches and 16 image tokens.

    Args:
        image_size (`int`, *optional*, defaults to `64`):
            Side in pixels of the images the vision tower reads.
        patch_size (`int`, *optional*, defaults to `8`):
            Side in pixels of one vision patch.
        vision_hidden (`int`, *optional*, defaults to `128`):
            Width of the vision tower (its MLP is twice as wide).
        vision_layers (`int`, *optional*, defaults to `2`):
            Layers of the vision tower.
        text_hidden (`int`, *optional*, defaults to `256`):
            Width of the Llama decoder.
        text_layers (`int`, *optional*, defaults to `4`):
            Layers of the Llama decoder.
        heads (`int`, *optional*, defaults to `4`):
            Attention heads, in both the vision tower and the decoder.
        scale_factor (`int`, *optional*, defaults to `2`):
            Pixel-shuffle factor: image tokens = patches / ``scale_factor**2``.
        vocab_size (`int`, *optional*, defaults to `2000`):
            Size of the BPE vocabulary trained on the run's texts.
    """

    image_size: int = 64
    patch_size: int = 8
    vision_hidden: int = 128
    vision_layers: int = 2
    text_hidden: int = 256
    text_layers: int = 4
    heads: int = 4
    scale_factor: int = 2
    vocab_size: int = 2000

    @property
    def image_seq_len(self) -> int:
        return (self.image_size // self.patch_size) ** 2 // self.scale_factor**2


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
