"""A small CLIP-style image-text dual encoder, trained from scratch on an image set's captions.

It serves twice: its image tower embeds images for structured identifiers (so ids carry what
captions can predict), and as a whole it is the dense-retrieval baseline GRACE is compared with.

* image tower: a small CNN over RGB resized to ``image_size``, with two coordinate channels and a
  flattened (not averaged) last feature map, because captions name positions ("top left");
* text tower: word embeddings + a GRU (or a tiny transformer), order-aware because
  "red circle and blue square" is not "blue circle and red square";
* both projected to ``embed_dim`` and L2-normalised; a learned logit scale.

The word vocabulary (built from training captions) is saved with the weights.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from grace.atomic_io import atomic_dir, write_json
from grace.models.dual_encoder.configuration import DualEncoderConfig

PAD, UNK = "<pad>", "<unk>"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "dual_encoder.json"
FORMAT_VERSION = 1
_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str) -> list[str]:
    """Lowercase words: the only normalisation, so the vocabulary stays tiny and predictable."""
    return _WORD.findall(text.lower())


def build_vocab(texts: Iterable[str], min_count: int = 1) -> list[str]:
    """Words seen at least ``min_count`` times, most frequent first; ``<pad>``=0, ``<unk>``=1."""
    counts = Counter(w for t in texts for w in split_words(t))
    words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return [PAD, UNK, *words]


def load_image_array(path: str | Path, size: int) -> np.ndarray:
    """RGB uint8 ``(3, size, size)``; the same resize at training and at embedding time."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()


class _ImageTower(nn.Module):
    def __init__(self, cfg: DualEncoderConfig):
        super().__init__()
        layers: list[nn.Module] = []
        c_in = 3 + 2  # RGB + (y, x) coordinates
        for w in cfg.widths:
            layers += [
                nn.Conv2d(c_in, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.Conv2d(w, w, 3, padding=1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
            c_in = w
        self.features = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.widths)
        self.proj = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c_in * side * side, cfg.embed_dim * 2),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.embed_dim * 2, cfg.embed_dim),
        )
        lin = torch.linspace(-1.0, 1.0, cfg.image_size)
        coords = torch.stack(torch.meshgrid(lin, lin, indexing="ij"))  # (2, s, s): y, x
        self.register_buffer("coords", coords, persistent=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = pixels.float() / 127.5 - 1.0 if pixels.dtype == torch.uint8 else pixels
        x = torch.cat([x, self.coords.expand(x.shape[0], -1, -1, -1)], dim=1)
        return self.proj(self.features(x))


class _TextTower(nn.Module):
    def __init__(self, cfg: DualEncoderConfig, vocab_size: int):
        super().__init__()
        self.kind = cfg.text_encoder
        self.embed = nn.Embedding(vocab_size, cfg.word_dim, padding_idx=0)
        if self.kind == "gru":
            self.rnn = nn.GRU(
                cfg.word_dim,
                cfg.text_width,
                num_layers=cfg.text_layers,
                batch_first=True,
                bidirectional=True,
            )
            out = 2 * cfg.text_width * 2  # final states of both directions + masked mean
        else:
            self.inp = nn.Linear(cfg.word_dim, cfg.text_width)
            self.pos = nn.Parameter(torch.randn(cfg.max_words, cfg.text_width) * 0.02)
            layer = nn.TransformerEncoderLayer(
                cfg.text_width,
                cfg.text_heads,
                dim_feedforward=cfg.text_width * 2,
                dropout=0.0,
                batch_first=True,
                norm_first=True,
            )
            self.encoder = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(cfg.text_width)
            out = cfg.text_width
        self.proj = nn.Sequential(
            nn.Linear(out, cfg.embed_dim * 2),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.embed_dim * 2, cfg.embed_dim),
        )

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        mask = ids != 0
        lengths = mask.sum(1).clamp(min=1)
        x = self.embed(ids)
        m = mask.unsqueeze(-1).to(x.dtype)
        if self.kind == "gru":
            packed = nn.utils.rnn.pack_padded_sequence(
                x, lengths.cpu(), batch_first=True, enforce_sorted=False
            )
            out, h = self.rnn(packed)
            out, _ = nn.utils.rnn.pad_packed_sequence(
                out, batch_first=True, total_length=ids.shape[1]
            )
            mean = (out * m).sum(1) / lengths.unsqueeze(-1).to(x.dtype)
            feats = torch.cat([h[-2], h[-1], mean], dim=-1)
        else:
            x = self.inp(x) + self.pos[: ids.shape[1]]
            x = self.norm(self.encoder(x, src_key_padding_mask=~mask))
            feats = (x * m).sum(1) / lengths.unsqueeze(-1).to(x.dtype)
        return self.proj(feats)


class DualEncoder(nn.Module):
    """Image and text towers into one L2-normalised space; ``vocab`` is the text tower's words."""

    def __init__(self, config: DualEncoderConfig, vocab: Sequence[str]):
        super().__init__()
        if len(vocab) < 2 or vocab[0] != PAD or vocab[1] != UNK:
            raise ValueError("vocab must start with <pad>, <unk>")
        self.config = config
        self.vocab = list(vocab)
        self.word_ids = {w: i for i, w in enumerate(self.vocab)}
        self.image_tower = _ImageTower(config)
        self.text_tower = _TextTower(config, len(self.vocab))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / config.temperature)))

    # -- inputs -----------------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Word ids ``(n, L)``, padded with 0 to the longest text (at most ``max_words``)."""
        rows = [
            [self.word_ids.get(w, 1) for w in split_words(t)][: self.config.max_words] or [1]
            for t in texts
        ]
        out = torch.zeros(len(rows), max((len(r) for r in rows), default=1), dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def load_images(self, paths: Sequence[str | Path]) -> torch.Tensor:
        """uint8 ``(n, 3, s, s)`` pixels of image files, resized to ``config.image_size``."""
        s = self.config.image_size
        if not paths:
            return torch.zeros(0, 3, s, s, dtype=torch.uint8)
        return torch.from_numpy(np.stack([load_image_array(p, s) for p in paths]))

    # -- towers -----------------------------------------------------------------------------
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_tower(pixels), dim=-1)

    def encode_texts(self, ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text_tower(ids), dim=-1)

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=self.config.max_logit_scale)

    def forward(self, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Image-to-text logits ``(n_images, n_texts)`` (scaled cosine similarities)."""
        return self.scale() * self.encode_images(pixels) @ self.encode_texts(ids).T

    # -- numpy convenience (eval mode, batched, no grad) ------------------------------------
    @torch.no_grad()
    def embed_pixels(self, pixels: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        was = self.training
        self.eval()
        try:
            out = [
                self.encode_images(pixels[i : i + batch_size])
                for i in range(0, len(pixels), batch_size)
            ]
        finally:
            self.train(was)
        if not out:
            return np.zeros((0, self.config.embed_dim), np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str], batch_size: int = 512) -> np.ndarray:
        """float32 ``(n, embed_dim)``, L2-normalised."""
        was = self.training
        self.eval()
        try:
            out = [
                self.encode_texts(self.tokenize(texts[i : i + batch_size]))
                for i in range(0, len(texts), batch_size)
            ]
        finally:
            self.train(was)
        if not out:
            return np.zeros((0, self.config.embed_dim), np.float32)
        return torch.cat(out).numpy().astype(np.float32, copy=False)

    def embed_images(self, paths: Sequence[str | Path], batch_size: int = 256) -> np.ndarray:
        """float32 ``(n, embed_dim)``, L2-normalised; files are read one batch at a time."""
        chunks = [
            self.embed_pixels(self.load_images(paths[i : i + batch_size]), batch_size)
            for i in range(0, len(paths), batch_size)
        ]
        if not chunks:
            return np.zeros((0, self.config.embed_dim), np.float32)
        return np.concatenate(chunks)

    # -- persistence ------------------------------------------------------------------------
    def save(self, directory: str | Path) -> Path:
        """Write ``model.safetensors`` + ``dual_encoder.json`` (config, vocab) atomically."""
        directory = Path(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        with atomic_dir(directory) as tmp:
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
            write_json(
                tmp / CONFIG_NAME,
                {
                    "format_version": FORMAT_VERSION,
                    "config": self.config.to_dict(),
                    "vocab": self.vocab,
                },
            )
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DualEncoder:
        """Load a model written by :meth:`save`, in eval mode."""
        directory = Path(directory)
        meta_path = directory / CONFIG_NAME
        if not meta_path.is_file() or not (directory / WEIGHTS_NAME).is_file():
            raise FileNotFoundError(
                f"{directory}: not a saved dual encoder (no {CONFIG_NAME} + {WEIGHTS_NAME})"
            )
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{meta_path}: unsupported format_version {meta.get('format_version')!r}"
            )
        model = cls(DualEncoderConfig.from_dict(meta["config"]), meta["vocab"])
        model.load_state_dict(load_file(str(directory / WEIGHTS_NAME)))
        return model.eval()
