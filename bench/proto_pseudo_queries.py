"""Prototype (not the library's model): why held-out queries miss atomic ids, and what fixes it.

On the frozen features of the ``lite`` backbone (EfficientNet-Lite0 pooled image features,
MiniLM sentence embeddings of the captions, computed once) it trains, in seconds:

- ``dense``: two MLP heads with InfoNCE, scored by cosine: the ceiling of these features as a
  dual encoder;
- GRACE with atomic ids reduced to its core: projectors into a shared trunk, then one output
  row per image; memorize (image -> id), retrieve (train caption -> id) and the projector
  InfoNCE of the lite backbone, alternating. Variants: no alignment, feature noise on memorize,
  and ``pq=K`` pseudo-queries: from ``pq_at`` of the run on, each held-out image also answers
  the K train captions its projected image is closest to (what ``pseudo_queries="nearest"``
  does in the library).

Held-out R@K is over all images with the captions of test-split images, as in
``grace.evaluation``. Example (BENCHMARKS.md, "what was tried"):

    python bench/proto_pseudo_queries.py dense base noalign noise pq1 pq3 pq5 pq10
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from grace.frozen_encoders import IMAGE_FEATURE_DIM, image_features, sentence_features
from grace.synth import synthesize

VARIANTS: dict[str, dict] = {
    "dense": {"dense": True},
    "base": {},
    "noalign": {"align": 0.0},
    "noise": {"noise": 1.0},
    "pq1": {"pq": 1},
    "pq3": {"pq": 3},
    "pq5": {"pq": 5},
    "pq10": {"pq": 10},
}


def features(data: Path, n: int):
    records = synthesize(data, n=n, seed=0)
    images = [Image.open(data / r.path).convert("RGB") for r in records]
    x = image_features(images, 128, 1)[:, 0]
    pairs = [(c, i, r.split) for i, r in enumerate(records) for c in r.captions]
    s = sentence_features([c for c, _, _ in pairs])
    owner = torch.tensor([i for _, i, _ in pairs])
    train = torch.tensor([k for k, p in enumerate(pairs) if p[2] == "train"])
    test = torch.tensor([k for k, p in enumerate(pairs) if p[2] == "test"])
    held_out = torch.tensor([i for i, r in enumerate(records) if r.split == "test"])
    return x, s, owner, train, test, held_out


def mlp(d_in: int, d: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(d_in), nn.Linear(d_in, d), nn.GELU(), nn.Linear(d, d))


def infonce(a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor, t: float = 0.05):
    same = (labels[:, None] == labels[None]).float()
    logits = F.normalize(a, dim=-1) @ F.normalize(b, dim=-1).T / t
    return -(same / same.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()


def run(data, steps=1500, d=256, lr=3e-3, batch=64, dense=False, align=1.0, noise=0.0, pq=0,
        pq_at=0.7, seed=0) -> dict[str, float]:  # fmt: skip
    x, s, owner, train, test, held_out = data
    n = x.shape[0]
    torch.manual_seed(seed)
    img, txt = mlp(IMAGE_FEATURE_DIM, d), mlp(s.shape[1], d)
    trunk = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d), nn.LayerNorm(d))
    rows = nn.Linear(d, n, bias=False)  # one output row per image: atomic ids
    modules = [img, txt] if dense else [img, txt, trunk, rows]
    opt = torch.optim.AdamW([p for m in modules for p in m.parameters()], lr, weight_decay=0.1)
    queries, answers = s[train], owner[train]
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        if pq and step == int(pq_at * steps):  # pseudo-queries from the alignment so far
            with torch.no_grad():
                near = F.normalize(img(x[held_out]), dim=-1) @ F.normalize(txt(s[train]), dim=-1).T
                chosen = train[near.topk(pq, dim=1).indices.reshape(-1)]
            queries = torch.cat([queries, s[chosen]])
            answers = torch.cat([answers, held_out.repeat_interleave(pq)])
        pick = torch.randint(0, len(queries), (batch,))
        q, y = queries[pick], answers[pick]
        if dense:
            loss = infonce(txt(q), img(x[y]), y)
        elif step % 2 == 0:  # memorize
            b = torch.randint(0, n, (batch,))
            feats = x[b] + noise * torch.randn_like(x[b]) * x.std(0)
            loss = F.cross_entropy(rows(trunk(img(feats))), b)
        else:  # retrieve, with the projector alignment of the lite backbone
            zq = txt(q)
            loss = F.cross_entropy(rows(trunk(zq)), y)
            if align:
                loss = loss + align * infonce(zq, img(x[y]), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        if dense:
            scores = F.normalize(txt(s[test]), dim=-1) @ F.normalize(img(x), dim=-1).T
            memorization = float("nan")
        else:
            scores = rows(trunk(txt(s[test])))
            own = rows(trunk(img(x))).argmax(1)
            memorization = (own == torch.arange(n)).float().mean().item()
        top = scores.topk(10).indices
        hit = top == owner[test][:, None]
    out = {f"R@{k}": hit[:, :k].any(1).float().mean().item() for k in (1, 5, 10)}
    return {"memorization": memorization, **out}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("variants", nargs="*", default=list(VARIANTS), help=f"of {list(VARIANTS)}")
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--work", type=Path, default=Path("/tmp/grace_proto_pseudo_queries"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    data = features(args.work / "data", args.n)
    for name in args.variants:
        m = run(data, steps=args.steps, **VARIANTS[name])
        print(name, " ".join(f"{k} {v:.3f}" for k, v in m.items()), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
