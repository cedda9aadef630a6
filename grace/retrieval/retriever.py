"""A trained GRACE model: backbone + processor + identifier map + the trie over its ids.

What ``grace retrieve``, ``grace describe``, ``grace evaluate`` and the registry's pyfunc load.
Retrieval is beam search constrained by the trie, so every answer is a live identifier and the
cost of a query does not grow with the number of images.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import PreTrainedModel, ProcessorMixin

from grace.atomic_io import atomic_dir, write_json
from grace.data.imageset import read_manifest, write_manifest
from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.identifiers import IdentifierMap
from grace.models.backbone import tokenizer_of
from grace.models.factory import load_backbone
from grace.models.prompts import Prompts, retrieve_turn, user_turn
from grace.retrieval.beam_search import trie_beam_search
from grace.retrieval.index import IdentifierIndex

FORMAT_VERSION = 1
GRACE_FILE = "grace.json"
IDS_FILE = "identifiers.json"
MANIFEST_FILE = "manifest.parquet"


@dataclass(frozen=True)
class Hit:
    """One retrieved image: its identifier, image key, path in the set, and score.

    The score is the identifier's length-normalised log-probability (higher is better).
    """

    identifier: str
    key: str
    path: str
    score: float


class GraceRetriever:
    """A trained GRACE model ready to retrieve: backbone, processor, identifiers and their trie.

    Args:
        model: The trained backbone (put in eval mode).
        processor: Its processor.
        id_map: The images' identifiers; the trie is built over the live ones.
        records: The image set's records (for the hits' paths).
        prompts: The task prompts it was trained with (defaults: :class:`Prompts`).
        info: Free-form facts saved with the model (``grace.json``).
    """

    def __init__(
        self,
        model: PreTrainedModel,
        processor: ProcessorMixin,
        id_map: IdentifierMap,
        records: Sequence[ImageRecord],
        prompts: Prompts | None = None,
        info: dict[str, Any] | None = None,
    ):
        self.model = model.eval()
        self.processor = processor
        self.tokenizer = tokenizer_of(processor)
        self.id_map = id_map
        self.records = list(records)
        self.path_of = {r.key: r.path for r in self.records}
        self.prompts = prompts or Prompts()
        self.info = dict(info or {})
        self.index = IdentifierIndex.build(id_map, self.tokenizer)
        self.max_id_tokens = max((len(s) for s in self.index.sequences), default=1)
        self.search = trie_beam_search  # swap in beam_search.generate_beam_search to compare

    # ---- persistence -----------------------------------------------------------------------
    def save(
        self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
    ) -> Path:
        """Write weights (safetensors), processor, identifiers, manifest; atomically.

        ``state_dict`` passes weights gathered from a sharded (ZeRO-3) engine.
        """
        with atomic_dir(directory) as tmp:
            self.model.save_pretrained(tmp, state_dict=state_dict)
            self.processor.save_pretrained(tmp)
            self.id_map.save(tmp / IDS_FILE)
            write_manifest(self.records, tmp / MANIFEST_FILE)
            write_json(
                tmp / GRACE_FILE,
                {"format_version": FORMAT_VERSION, "prompts": asdict(self.prompts), **self.info},
            )
        return Path(directory)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> GraceRetriever:
        directory = Path(directory)
        if not (directory / GRACE_FILE).is_file():
            raise GraceError(f"{directory}: not a GRACE model folder (no {GRACE_FILE})")
        meta = json.loads((directory / GRACE_FILE).read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise GraceError(f"{directory / GRACE_FILE}: unsupported format_version")
        model, processor = load_backbone(directory)
        prompts = Prompts(**meta.pop("prompts"))
        meta.pop("format_version")
        return cls(
            model,
            processor,
            IdentifierMap.load(directory / IDS_FILE),
            read_manifest(directory / MANIFEST_FILE),
            prompts,
            meta,
        )

    # ---- generation ------------------------------------------------------------------------
    def _text_inputs(self, prompts: list[str]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        return dict(self.processor(text=prompts, return_tensors="pt", padding=True))

    def _image_inputs(self, prompt: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        self.tokenizer.padding_side = "left"
        return dict(
            self.processor(
                text=[prompt] * len(images),
                images=[[im] for im in images],
                return_tensors="pt",
                padding=True,
            )
        )

    @torch.no_grad()
    def _constrained(
        self, inputs: dict[str, torch.Tensor], k: int, num_beams: int
    ) -> list[list[Hit]]:
        """Top-k images per row by beam search over the identifier trie.

        A hit's score is its identifier's length-normalised log-probability (sum over its tokens
        and EOS, divided by their number); an image with several ids (semantic) keeps its best.
        ``self.search`` is ``trie_beam_search`` (``generate_beam_search`` is the reference).
        """
        out = self.search(
            self.model,
            inputs,
            self.index.trie,
            num_beams=max(num_beams, 1),
            max_new_tokens=self.max_id_tokens + 1,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        results = []
        for seqs, scores in zip(out.sequences.tolist(), out.scores.tolist(), strict=True):
            hits: dict[str, Hit] = {}
            for seq, score in zip(seqs, scores, strict=True):
                found = self.index.resolve(seq)
                if found is None or found[1] in hits:
                    continue  # several ids of one image (semantic): keep the best
                hits[found[1]] = Hit(found[0], found[1], self.path_of.get(found[1], ""), score)
            ranked = sorted(hits.values(), key=lambda h: -h.score)
            results.append(ranked[:k])
        return results

    def retrieve(
        self, queries: Sequence[str], k: int = 10, num_beams: int = 10, batch_size: int = 16
    ) -> list[list[Hit]]:
        """Top-``k`` images of each text query (at most ``num_beams``), best first."""
        results: list[list[Hit]] = []
        for i in range(0, len(queries), batch_size):
            chunk = queries[i : i + batch_size]
            prompts = [retrieve_turn(self.processor, self.prompts, q) for q in chunk]
            results += self._constrained(self._text_inputs(prompts), k, num_beams)
        return results

    def recall_identifiers(
        self, images: Sequence[Image.Image], num_beams: int = 1, batch_size: int = 32
    ) -> list[Hit | None]:
        """The identifier the model gives each image (learning to memorize, checked)."""
        prompt = user_turn(self.processor, self.prompts.memorize, with_image=True)
        out: list[Hit | None] = []
        for i in range(0, len(images), batch_size):
            inputs = self._image_inputs(prompt, list(images[i : i + batch_size]))
            out += [h[0] if h else None for h in self._constrained(inputs, 1, num_beams)]
        return out

    @torch.no_grad()
    def _free_text(self, inputs: dict[str, torch.Tensor], max_new_tokens: int) -> list[str]:
        width = inputs["input_ids"].shape[1]
        out = self.model.generate(
            **inputs,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
        return [" ".join(t.split()) for t in texts]

    def describe(self, identifiers: Sequence[str], max_new_tokens: int = 48) -> list[str]:
        """A description of each memorized image, given only its identifier."""
        unknown = [i for i in identifiers if i not in self.index.position]
        if unknown:
            raise GraceError(f"unknown identifier {unknown[0]!r} (not a live id of this model)")
        prompts = [
            user_turn(self.processor, self.prompts.describe.format(identifier=i), False)
            for i in identifiers
        ]
        return self._free_text(self._text_inputs(prompts), max_new_tokens)

    def caption(
        self, images: Sequence[Image.Image], max_new_tokens: int = 48, batch_size: int = 32
    ) -> list[str]:
        """Captions of images (how pseudo-queries for images without text are made)."""
        prompt = user_turn(self.processor, self.prompts.caption, with_image=True)
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            inputs = self._image_inputs(prompt, list(images[i : i + batch_size]))
            out += self._free_text(inputs, max_new_tokens)
        return out


GraceModel = GraceRetriever
"""The retriever's name before the layered layout; kept as an alias for one release."""
