"""The processor of the ``lite`` backbone: a tokenizer plus the frozen encoders' features.

It answers the calls GRACE makes of any Hugging Face processor (``processor(text=..., images=...,
return_tensors="pt", padding=...)``, ``apply_chat_template``, ``save_pretrained``, ``.tokenizer``)
and returns what :class:`GraceLiteForConditionalGeneration` takes:

- a prompt with an image: ``<image>`` becomes ``image_tokens`` placeholders, and
  ``image_features`` holds the image's frozen EfficientNet-Lite0 features;
- a text-only prompt (a query, a describe request): it holds one ``<sentence>`` placeholder and
  ``sentence_features`` holds the frozen MiniLM embedding of the prompt's text, which is what lets
  a query the model never saw find its image. Words before the placeholder are also decoder
  tokens; words after it reach the decoder only through the feature. A query's words go after
  it unless ``query_words`` is on (:meth:`feature_query`): a query prompt is then one token, which
  trains much faster and memorized structured ids where word tokens did not (BENCHMARKS.md).

Sentence features are cached by text, so a training run encodes each prompt once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import AutoTokenizer, BatchFeature, PreTrainedTokenizerBase

from grace.atomic_io import write_json
from grace.models.lite.frozen_encoders import (
    PACKAGED_TEXT_ENCODER,
    image_features,
    sentence_features,
)

PROCESSOR_FILE = "grace_lite_processor.json"
IMAGE_TOKEN = "<image>"
SENTENCE_TOKEN = "<sentence>"


class GraceLiteProcessor:
    """A tokenizer plus the frozen encoders, called like any Hugging Face processor.

    Args:
        tokenizer: The backbone's tokenizer; it must know ``<image>`` and ``<sentence>``.
        image_size: Side in pixels images are resized to for the image encoder.
        image_grid: Image tokens per side (``image_grid**2`` placeholders per image).
        text_encoder: The packaged MiniLM's name, or a sentence encoder's path.
        query_words: Whether a query's words are also decoder tokens (:meth:`feature_query`);
            the default True is what processors saved before the setting existed did.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        image_size: int = 128,
        image_grid: int = 1,
        text_encoder: str = PACKAGED_TEXT_ENCODER,
        query_words: bool = True,  # True for processors saved before the setting existed
    ):
        for token in (IMAGE_TOKEN, SENTENCE_TOKEN):
            if tokenizer.convert_tokens_to_ids(token) in (None, tokenizer.unk_token_id):
                raise ValueError(f"the lite backbone's tokenizer needs the token {token}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.image_grid = image_grid
        self.text_encoder = text_encoder
        self.query_words = query_words
        self._sentences: dict[str, torch.Tensor] = {}

    @property
    def image_tokens(self) -> int:
        return self.image_grid**2

    def apply_chat_template(self, conversation: list[dict[str, Any]], **kwargs: Any) -> Any:
        return self.tokenizer.apply_chat_template(conversation, **kwargs)

    @staticmethod
    def feature_query(text: str) -> str:
        """A prompt whose words the decoder reads only as their sentence feature.

        It is what :func:`grace.models.prompts.retrieve_turn` makes of a query when
        ``query_words`` is off.
        """
        return SENTENCE_TOKEN + text

    # ---- features --------------------------------------------------------------------------
    def sentence_features(self, texts: Sequence[str]) -> torch.Tensor:
        """``(n, 1, d)`` frozen sentence embeddings of the texts' words (placeholders removed)."""
        clean = [self._sentence_text(t) for t in texts]
        missing = list(dict.fromkeys(t for t in clean if t not in self._sentences))
        if missing:
            for t, f in zip(missing, sentence_features(missing, self.text_encoder), strict=True):
                self._sentences[t] = f
        return torch.stack([self._sentences[t] for t in clean])[:, None, :]

    def image_features(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """``(n, image_tokens, 1280)`` frozen image features."""
        return image_features(images, self.image_size, self.image_grid)

    def image_inputs(self, images: Sequence[Image.Image]) -> list[dict[str, torch.Tensor]]:
        """Each image's model inputs, computed in batches (a training run calls this once)."""
        feats = self.image_features(images)
        return [{"image_features": feats[i : i + 1]} for i in range(len(images))]

    @staticmethod
    def _sentence_text(prompt: str) -> str:
        return prompt.replace(SENTENCE_TOKEN, "").replace(IMAGE_TOKEN, "").strip()

    # ---- the processor call ----------------------------------------------------------------
    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images: Sequence[Sequence[Image.Image]] | Sequence[Image.Image] | None = None,
        return_tensors: str | None = "pt",
        padding: bool | str = False,
        **kwargs: Any,
    ) -> BatchFeature:
        if text is None:
            raise ValueError("GraceLiteProcessor needs text (the prompt); images go with it")
        texts = [text] if isinstance(text, str) else list(text)
        flat: list[Image.Image] = []
        for row in images or []:
            flat += list(row) if isinstance(row, (list, tuple)) else [row]
        placeholders = sum(t.count(IMAGE_TOKEN) for t in texts)
        if placeholders != len(flat):
            raise ValueError(
                f"{placeholders} {IMAGE_TOKEN} placeholders in the prompts but {len(flat)} images"
            )
        expanded = []
        for t in texts:
            if IMAGE_TOKEN in t:
                expanded.append(t.replace(IMAGE_TOKEN, IMAGE_TOKEN * self.image_tokens))
            elif SENTENCE_TOKEN in t:  # words after the placeholder are the feature's only
                expanded.append(t[: t.index(SENTENCE_TOKEN) + len(SENTENCE_TOKEN)])
            else:  # the chat template puts <sentence> last; a raw prompt gets it at the end
                expanded.append(t + SENTENCE_TOKEN)
        enc = self.tokenizer(expanded, return_tensors=return_tensors, padding=padding, **kwargs)
        data = dict(enc)
        if flat:
            data["image_features"] = self.image_features(flat)
        text_only = [t for t in texts if IMAGE_TOKEN not in t]
        if text_only and len(text_only) != len(texts):
            raise ValueError("one call takes prompts with images or text-only prompts, not both")
        if text_only:
            data["sentence_features"] = self.sentence_features(text_only)
        return BatchFeature(data, tensor_type=return_tensors)

    # ---- persistence -----------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike, **kwargs: Any) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory)
        settings = {
            "processor_class": type(self).__name__,
            "image_size": self.image_size,
            "image_grid": self.image_grid,
            "text_encoder": self.text_encoder,
            "query_words": self.query_words,
        }
        write_json(directory / PROCESSOR_FILE, settings)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GraceLiteProcessor:
        directory = Path(directory)
        settings = json.loads((directory / PROCESSOR_FILE).read_text())
        settings.pop("processor_class", None)
        tok = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
        return cls(tok, **settings)

    @staticmethod
    def is_saved_in(directory: str | os.PathLike) -> bool:
        return (Path(directory) / PROCESSOR_FILE).is_file()
