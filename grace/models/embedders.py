"""Pluggable image/text embedders: what structured identifiers cluster, and the dense baseline.

Any object with ``embed_images`` and ``embed_texts`` returning float32, L2-normalised rows is an
:class:`ImageEmbedder`. Two come with the library: the small dual encoder trained on the set's
own captions (the default: runs offline on a CPU in about a minute) and a local CLIP checkpoint.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from grace.data.records import ImageRecord
from grace.errors import GraceError
from grace.identifiers.base import ImageEmbedder
from grace.models.dual_encoder.configuration import DualEncoderConfig
from grace.models.dual_encoder.modeling import DualEncoder

EMBEDDER_SPECS = ("dual-encoder", "dual-encoder:PATH", "clip:PATH")


class DualEncoderEmbedder:
    """A :class:`DualEncoder` as an :class:`ImageEmbedder`."""

    def __init__(self, model: DualEncoder, batch_size: int = 256):
        self.model = model.eval()
        self.batch_size = batch_size

    def embed_images(self, paths: list[Path]) -> np.ndarray:
        return self.model.embed_images(list(paths), batch_size=self.batch_size)

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        return self.model.embed_texts(list(texts), batch_size=self.batch_size)


def _features(out: torch.Tensor | object) -> torch.Tensor:
    # transformers 5.x returns a BaseModelOutputWithPooling whose pooler_output is the projected
    # embedding; 4.x returned that tensor directly
    return out if isinstance(out, torch.Tensor) else out.pooler_output  # type: ignore[attr-defined]


class ClipEmbedder:
    """A CLIP checkpoint on local disk (``save_pretrained`` layout), never fetched from the hub.

    Tokenizer and image processor are loaded separately (``AutoTokenizer``,
    ``AutoImageProcessor``) so that any tokenizer saved beside the model works.
    """

    def __init__(self, model_path: str | Path, batch_size: int = 64, device: str = "cpu"):
        from transformers import AutoImageProcessor, AutoTokenizer, CLIPModel

        path = Path(model_path)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: no such CLIP model folder")
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.image_processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
        self.max_length = int(self.model.config.text_config.max_position_embeddings)
        self.batch_size = batch_size

    @torch.no_grad()
    def embed_images(self, paths: list[Path]) -> np.ndarray:
        out = []
        for i in range(0, len(paths), self.batch_size):
            images = []
            for p in paths[i : i + self.batch_size]:
                with Image.open(p) as im:
                    images.append(im.convert("RGB"))
            px = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            out.append(_features(self.model.get_image_features(pixel_values=px.to(self.device))))
        return _normalised(out, self.model.config.projection_dim)

    @torch.no_grad()
    def embed_texts(self, texts: list[str]) -> np.ndarray:
        out = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(
                list(texts[i : i + self.batch_size]),
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
            enc = {k: v.to(self.device) for k, v in enc.items() if k != "token_type_ids"}
            out.append(_features(self.model.get_text_features(**enc)))
        return _normalised(out, self.model.config.projection_dim)


def _normalised(chunks: list[torch.Tensor], dim: int) -> np.ndarray:
    if not chunks:
        return np.zeros((0, dim), np.float32)
    x = torch.nn.functional.normalize(torch.cat(chunks).float(), dim=-1)
    return x.cpu().numpy().astype(np.float32, copy=False)


def make_embedder(
    spec: str,
    records: Sequence[ImageRecord],
    root: str | Path,
    *,
    max_seconds: float | None = None,
    config: DualEncoderConfig | None = None,
    progress: bool = True,
) -> ImageEmbedder:
    """Build an embedder from a spec string (the CLI's ``--embedder``).

    ``dual-encoder`` trains one on ``records`` (its train-split captions) for at most
    ``max_seconds`` (default: the config's); ``dual-encoder:PATH`` loads a saved one;
    ``clip:PATH`` loads a local CLIP checkpoint.
    """
    kind, _, arg = spec.partition(":")
    if kind == "dual-encoder" and not arg:
        from dataclasses import replace

        from grace.models.dual_encoder.training import train_dual_encoder

        cfg = config or DualEncoderConfig()
        if max_seconds is not None:
            cfg = replace(cfg, max_seconds=max_seconds)
        return DualEncoderEmbedder(train_dual_encoder(records, root, cfg, progress=progress))
    if kind == "dual-encoder":
        return DualEncoderEmbedder(DualEncoder.load(arg))
    if kind == "clip" and arg:
        return ClipEmbedder(arg)
    raise GraceError(f"unknown embedder {spec!r}: expected one of {', '.join(EMBEDDER_SPECS)}")


def dense_rank(text_emb: np.ndarray, image_emb: np.ndarray, k: int) -> np.ndarray:
    """Brute-force retrieval: indices ``(n_texts, k)`` of the best images per text, best first.

    Ties are broken by image index, so rankings are reproducible.
    """
    scores = np.asarray(text_emb, np.float32) @ np.asarray(image_emb, np.float32).T
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]
