"""Training examples of GRACE's tasks, tokenized once, and their batches.

Four tasks share one format, a user turn and an answer ending in EOS, with the loss on the
answer only:

- memorize: image -> identifier (learning to memorize);
- retrieve: query -> identifier (learning to retrieve; real or pseudo-queries);
- describe: identifier -> caption (the paper's "beyond retrieval");
- caption: image -> caption (what pseudo-queries are generated with).

Identifier answers are the exact token sequences of the :class:`IdentifierIndex`, so training
targets and the decoding trie can never disagree about how an identifier tokenizes.
"""

from __future__ import annotations

import hashlib
import io
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from transformers import ProcessorMixin

from grace.constants import IGNORE_INDEX
from grace.data.records import ImageRecord
from grace.errors import InvalidInputError, Problem
from grace.models.backbone import tokenizer_of
from grace.models.prompts import Prompts, retrieve_turn, user_turn
from grace.retrieval.index import IdentifierIndex

TASKS = ("memorize", "retrieve", "describe", "caption")


@dataclass(frozen=True)
class Example:
    """One tokenized training example of one task.

    Args:
        task (`str`):
            One of ``TASKS``.
        input_ids (`tuple[int, ...]`):
            The prompt, then the answer and EOS.
        n_prompt (`int`):
            The first ``n_prompt`` tokens get no loss.
        image (`int`, *optional*):
            Index into the set's :class:`ImageInputs`; `None`: a text-only prompt.
        text (`int`, *optional*):
            Index into the :class:`TextInputs` (a text-only prompt's extra tensors).
        gold (`int`, *optional*):
            The answer's image, for backbones with a query-image alignment.
    """

    task: str
    input_ids: tuple[int, ...]
    n_prompt: int
    image: int | None = None
    text: int | None = None
    gold: int | None = None


# A record's key is its image's sha256 (grace.data.imageset); tests' hand-made records are not.
_SHA256_KEY = re.compile(r"[0-9a-f]{64}")


class ImageInputs:
    """Each image's processor tensors (pixel values and friends), computed once per run.

    Prompt token ids depend on the image only through its size, so they are cached per
    (prompt, size): 1000 memorize prompts cost one tokenizer call, not a thousand.
    """

    def __init__(self, processor: ProcessorMixin, records: Sequence[ImageRecord], root: Path):
        self.processor = processor
        self.records = list(records)
        self.root = Path(root)
        self.tensors: list[dict[str, torch.Tensor]] = []
        self._prompt_ids: dict[tuple[str, int, int], tuple[int, ...]] = {}
        batched = getattr(processor, "image_inputs", None)  # a processor that batches features
        if batched is not None:
            for i in range(0, len(self.records), 256):
                self.tensors += batched([self.load(r) for r in self.records[i : i + 256]])
            return
        probe = user_turn(processor, "", with_image=True)
        for r in self.records:
            enc = processor(text=[probe], images=[[self.load(r)]], return_tensors="pt")
            self.tensors.append(
                {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            )

    def load(self, record: ImageRecord) -> Image.Image:
        """The image, checked against its key: a file replaced since validation is refused."""
        path = self.root / record.path
        data = path.read_bytes()
        if _SHA256_KEY.fullmatch(record.key) and hashlib.sha256(data).hexdigest() != record.key:
            raise InvalidInputError(
                [Problem(str(path), "unchanged-image", "changed since the set was validated")]
            )
        with Image.open(io.BytesIO(data)) as im:
            return im.convert("RGB")

    def prompt_ids(self, prompt: str, i: int) -> tuple[int, ...]:
        r = self.records[i]
        key = (prompt, r.width, r.height)
        if key not in self._prompt_ids:
            enc = self.processor(text=[prompt], images=[[self.load(r)]], return_tensors="pt")
            self._prompt_ids[key] = tuple(enc["input_ids"][0].tolist())
        return self._prompt_ids[key]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """Image tensors of several images, concatenated along the first (image) axis."""
        keys = self.tensors[indices[0]].keys()
        return {k: torch.cat([self.tensors[i][k] for i in indices]) for k in keys}


class TextInputs:
    """Token ids of each distinct text-only prompt, and any other tensors the processor gives.

    The other tensors are e.g. the lite backbone's frozen sentence features; all are computed
    once per run, in batches.
    """

    def __init__(self, processor: ProcessorMixin):
        self.processor = processor
        self.position: dict[str, int] = {}
        self.token_ids: list[tuple[int, ...]] = []
        self.tensors: list[dict[str, torch.Tensor]] = []

    def encode(self, prompts: Sequence[str], batch_size: int = 256) -> None:
        new = [p for p in dict.fromkeys(prompts) if p not in self.position]
        for i in range(0, len(new), batch_size):
            chunk = new[i : i + batch_size]
            enc = self.processor(text=chunk, return_tensors="pt", padding=True)
            extra = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
            for row, prompt in enumerate(chunk):
                keep = enc["attention_mask"][row].bool()
                self.position[prompt] = len(self.token_ids)
                self.token_ids.append(tuple(enc["input_ids"][row][keep].tolist()))
                self.tensors.append({k: v[row : row + 1] for k, v in extra.items()})

    def __getitem__(self, prompt: str) -> int:
        if prompt not in self.position:
            self.encode([prompt])
        return self.position[prompt]

    def batch(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        keys = self.tensors[indices[0]].keys()
        return {k: torch.cat([self.tensors[i][k] for i in indices]) for k in keys}


def answer_ids(processor: ProcessorMixin, text: str) -> tuple[int, ...]:
    """The token ids of an answer: ``text`` without special tokens, then EOS."""
    tok = tokenizer_of(processor)
    return (*tok(text, add_special_tokens=False)["input_ids"], tok.eos_token_id)


def build_examples(
    records: Sequence[ImageRecord],
    index: IdentifierIndex,
    processor: ProcessorMixin,
    images: ImageInputs,
    prompts: Prompts,
    tasks: Sequence[str] = TASKS,
    pseudo_queries: dict[str, list[str]] | None = None,
    memorize_repeats: int = 1,
    side_task_captions: int | None = None,
    texts: TextInputs | None = None,
    align: bool = False,
) -> list[Example]:
    """Every example of the requested tasks.

    Queries and descriptions use train-split captions only (held-out captions are the
    evaluation's); ``pseudo_queries`` (key -> texts) add retrieve examples for images that have
    none.

    The task mix: each memorize example appears ``memorize_repeats`` times, and describe and
    caption use only the first ``side_task_captions`` captions of an image (None: all), so a
    short budget is not spent mostly on the side tasks. With ``align`` a retrieve example also
    names its image (``gold``), for backbones that align queries with images.
    """
    eos = tokenizer_of(processor).eos_token_id
    position = {r.key: i for i, r in enumerate(images.records)}
    ids_of: dict[str, list[tuple[str, tuple[int, ...]]]] = {}
    for ident, key, seq in zip(index.identifiers, index.keys, index.sequences, strict=True):
        ids_of.setdefault(key, []).append((ident, seq))
    texts = texts if texts is not None else TextInputs(processor)

    def retrieve_prompts(r: ImageRecord, captions: list[str]) -> list[str]:
        queries = captions + list((pseudo_queries or {}).get(r.key, []))
        return [retrieve_turn(processor, prompts, q) for q in queries]

    def describe_prompt(identifier: str) -> str:
        return user_turn(processor, prompts.describe.format(identifier=identifier), False)

    # Text-prompt examples are drafted as (task, prompt, answer, gold) and made once every
    # prompt is known: TextInputs encodes them in batches (a sentence encoder per prompt is slow).
    drafts: list[Example | tuple[str, str, tuple[int, ...], int | None]] = []
    mem_prompt = user_turn(processor, prompts.memorize, with_image=True)
    cap_prompt = user_turn(processor, prompts.caption, with_image=True)
    for r in records:
        live = ids_of.get(r.key)
        if not live:
            continue  # retired or not in this map
        i = position[r.key]
        canonical = live[0][1] + (eos,)
        captions = list(r.captions) if r.split == "train" else []
        side = captions[:side_task_captions] if side_task_captions is not None else captions
        if "memorize" in tasks:
            p = images.prompt_ids(mem_prompt, i)
            mem = [Example("memorize", p + seq + (eos,), len(p), i) for _, seq in live]
            drafts += mem * memorize_repeats
        if "retrieve" in tasks:
            gold = i if align else None
            drafts += [("retrieve", q, canonical, gold) for q in retrieve_prompts(r, captions)]
        if "describe" in tasks and side:
            prompt = describe_prompt(live[0][0])
            drafts += [("describe", prompt, answer_ids(processor, c), None) for c in side]
        if "caption" in tasks and side:
            p = images.prompt_ids(cap_prompt, i)
            drafts += [Example("caption", p + answer_ids(processor, c), len(p), i) for c in side]
    texts.encode([d[1] for d in drafts if isinstance(d, tuple)])
    out: list[Example] = []
    for d in drafts:
        if isinstance(d, Example):
            out.append(d)
            continue
        task, prompt, answer, gold = d
        t = texts[prompt]
        p = texts.token_ids[t]
        out.append(Example(task, p + answer, len(p), text=t, gold=gold))
    return out


def plan_epoch(examples: Sequence[Example], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of one epoch, as lists of example indices; deterministic for a seed.

    Each batch holds one task and one modality (a text-only batch carries no pixel values), and
    the batches of all tasks are shuffled together, so memorize and retrieve steps interleave as
    in the paper.
    """
    rng = random.Random(seed)
    groups: dict[tuple[str, bool], list[int]] = {}
    for n, ex in enumerate(examples):
        groups.setdefault((ex.task, ex.image is not None), []).append(n)
    batches = []
    for members in groups.values():
        rng.shuffle(members)
        batches += [members[i : i + batch_size] for i in range(0, len(members), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(
    examples: Sequence[Example],
    images: ImageInputs,
    pad_token_id: int,
    texts: TextInputs | None = None,
) -> dict[str, Any]:
    """One batch of examples as model inputs.

    Right-padded input ids, attention mask, labels (-100 on prompt and padding), image and
    text-prompt tensors, and the answers' images as ``gold_*`` when the examples name them.
    """
    width = max(len(ex.input_ids) for ex in examples)
    ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(examples):
        n = len(ex.input_ids)
        ids[row, :n] = torch.tensor(ex.input_ids)
        mask[row, :n] = 1
        labels[row, ex.n_prompt : n] = ids[row, ex.n_prompt : n]
    batch: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    with_image = [ex.image for ex in examples if ex.image is not None]
    if with_image:
        if len(with_image) != len(examples):
            raise ValueError("a batch mixes examples with and without images")
        batch.update(images.batch(with_image))
    with_text = [ex.text for ex in examples if ex.text is not None]
    if with_text and texts is not None and texts.tensors[with_text[0]]:
        if len(with_text) != len(examples):
            raise ValueError("a batch mixes text-only prompts with image prompts")
        batch.update(texts.batch(with_text))
    golds = [ex.gold for ex in examples if ex.gold is not None]
    if golds:
        if len(golds) != len(examples):
            raise ValueError("a batch mixes examples with and without their answer's image")
        batch.update({f"gold_{k}": v for k, v in images.batch(golds).items()})
    return batch
