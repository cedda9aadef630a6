"""Beam search constrained by an identifier trie, built for retrieval's short decodes.

Why not ``generate(num_beams=...)``: it copies every prompt ``num_beams`` times before the first
forward, so a query pays its prompt ``num_beams`` times, and it walks every beam's whole prefix
through the trie at each step, and it copies the whole cache of every beam at every step. Here
each prompt is run once and stays in the cache once: the beams' tokens are appended side by side
and each beam attends (4D mask) to the prompt, its ancestors and itself, so nothing is copied when
beams are reordered. Each beam keeps its trie node, from which a step reads the few tokens it
allows and the nodes they lead to (``Trie.live_edges``: no vocabulary-wide mask, no search for the
child), and all queries x beams of a batch step in one forward.

The ranking is that of transformers' beam search with ``early_stopping=True`` and a
``TrieLogitsProcessor`` (the reference, which a test holds this to): at each step the best
``2 * num_beams`` continuations of a query are kept, those ending in EOS become finished
hypotheses scored ``sum of log-probs / number of generated tokens (EOS included) **
length_penalty``, and a query is done once ``num_beams`` hypotheses are finished. Decoder-only
backbones whose forward takes a 4D boolean ``attention_mask`` and appends to a ``DynamicCache``
(Llama-family text models, Idefics3/SmolVLM); plain Llama decoders run through
``grace.llama_steps`` instead of their modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from grace.llama_steps import LlamaSteps
from grace.trie import Trie

_NEG = -1.0e9  # transformers' "never pick this" score, kept so rankings match it exactly


@dataclass
class BeamSearchOutput:
    sequences: torch.Tensor
    """``(batch, num_beams, steps)`` generated tokens, EOS then padding; best hypothesis first."""
    scores: torch.Tensor
    """``(batch, num_beams)`` length-normalised sums of log-probabilities, descending."""


def _positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Position ids under left padding (what ``generate`` derives from the mask)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 0)


@torch.no_grad()
def trie_beam_search(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    trie: Trie | None,
    *,
    num_beams: int,
    max_new_tokens: int,
    pad_token_id: int,
    eos_token_id: int | None = None,
    length_penalty: float = 1.0,
    fused_steps: bool = True,
) -> BeamSearchOutput:
    """Beam search over ``trie``'s identifiers for each row of ``inputs`` (processor output).

    ``inputs`` holds ``input_ids`` and ``attention_mask`` (left padded) and any extra model
    inputs of the prompt (``pixel_values``, ...), which are used by the prefill only.
    ``trie=None`` is plain beam search (then ``eos_token_id`` is needed): the baseline that the
    trie's cost is measured against. With ``fused_steps`` a plain Llama decoder runs its beam
    steps through ``LlamaSteps`` (same results, less overhead); other models use their forward.
    A model with ``prompt_embeddings(input_ids, **extra)`` has its featured prompts prefilled
    by the fused steps as well.
    """
    if trie is None and eos_token_id is None:
        raise ValueError("plain beam search (no trie) needs eos_token_id")
    eos = trie.eos_token_id if trie is not None else int(eos_token_id)
    ids = inputs["input_ids"]
    batch, width = ids.shape
    beams, keep = max(int(num_beams), 1), 2 * max(int(num_beams), 1)
    device = ids.device
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    padded = bool((mask == 0).any())
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    position = _positions(mask)
    fused = LlamaSteps.of(model) if fused_steps else None
    embed = getattr(model, "prompt_embeddings", None) if extra else None
    if fused is not None and (not extra or embed is not None):  # prefill fused too
        keys, values = fused.empty_buffers(batch, width + beams * max_new_tokens, ids)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # pads attend to themselves only, so that their (unused) states stay finite
        keep_prompt = (causal & mask.bool()[:, None, :]) | torch.eye(
            width, dtype=torch.bool, device=device
        )
        embeds = embed(ids, **extra) if extra else None
        logits = fused.step(
            ids, position, keep_prompt, keys, values, 0, last_only=True, embeds=embeds
        )
        filled = width
    else:
        out = model(
            input_ids=ids,
            attention_mask=mask if padded else None,
            position_ids=position,
            use_cache=True,
            logits_to_keep=1,
            **extra,
        )
        cache, logits = out.past_key_values, out.logits
        del out
        if fused is not None:
            keys, values, filled = fused.buffers(cache, beams * max_new_tokens)
            del cache
    logits = logits[:, -1, :].float()
    vocab = logits.shape[-1]
    rows = batch * beams
    # The bookkeeping below runs in numpy on arrays of a few hundred entries: a numpy call on
    # them costs ~1 us, a torch op 2-5 us, and a step makes ~50 of them. torch.topk stays: it
    # picks among tied scores as transformers' search does (with identical inputs).
    neg = np.float32(_NEG)
    # Every beam of a query starts as its prompt: one prefilled row, repeated.
    log_probs = np.repeat(torch.log_softmax(logits, dim=-1).cpu().numpy(), beams, axis=0)
    nodes = np.zeros(rows, dtype=np.int64)
    qi = np.arange(batch)[:, None]  # a query's row, for fancy indexing of (batch, beams) arrays
    # The cache keeps one row per query: the prompt once, then at each step the ``beams`` new
    # tokens side by side. ``attend[q, b]`` says what beam b of query q attends to: the prompt,
    # its ancestors' slots and its own slot; beams are never copied, only these rows reordered.
    attend = np.zeros((batch, beams, width + beams * max_new_tokens), dtype=bool)
    attend[:, :, :width] = mask.bool().cpu().numpy()[:, None, :]
    own_slot = np.eye(beams, dtype=bool)
    position = position[:, -1:].expand(batch, beams)

    running_seq = np.full((batch, beams, max_new_tokens), pad_token_id, dtype=np.int64)
    running_score = np.zeros((batch, beams), dtype=np.float32)
    running_score[:, 1:] = neg  # identical beams: only the first one may expand at step 0
    done_seq = running_seq.copy()
    done_score = np.full((batch, beams), neg, dtype=np.float32)
    done = np.zeros((batch, beams), dtype=bool)
    hopeful = np.ones((batch, 1), dtype=bool)
    top_beams = np.arange(keep) < beams

    for step in range(max_new_tokens):
        if step:
            fed = width + beams * (step - 1)  # cache slots filled before this step
            attend[:, :, fed : fed + beams] = own_slot
            keep_kv = torch.from_numpy(attend[:, :, : fed + beams]).to(device)
            position = position + 1
            fed_tokens = torch.from_numpy(running_seq[:, :, step - 1].copy()).to(device)
            if fused is not None:
                logits = fused.step(fed_tokens, position, keep_kv, keys, values, filled)
                filled += beams
            else:
                logits = model(
                    input_ids=fed_tokens,
                    attention_mask=keep_kv[:, None].contiguous(),
                    position_ids=position,
                    past_key_values=cache,
                    use_cache=True,
                ).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1).view(rows, -1).cpu().numpy()
        if trie is not None:
            log_probs, child = _constrain(trie, nodes, log_probs, eos)
        total = (log_probs.reshape(batch, beams, vocab) + running_score[:, :, None]).reshape(
            batch, -1
        )
        cand_score, cand = (t.numpy() for t in torch.topk(torch.from_numpy(total), keep))
        src, tok = np.divmod(cand, vocab)
        cand_seq = running_seq[qi, src]
        cand_seq[:, :, step] = tok
        ended = (tok == eos) | (step + 1 == max_new_tokens)

        # The best unfinished candidates run on.
        live_score = cand_score + ended.astype(np.float32) * neg
        pick = torch.topk(torch.from_numpy(live_score), beams).indices.numpy()
        running_seq = cand_seq[qi, pick]
        running_score = live_score[qi, pick]
        parent = src[qi, pick]

        # Finished candidates among the top ``beams`` join the hypotheses if good enough.
        norm = cand_score / np.float32(float(step + 1) ** length_penalty)
        norm = norm + done.all(axis=1, keepdims=True).astype(np.float32) * neg
        norm = norm + (~hopeful).astype(np.float32) * neg
        just_done = ended & top_beams[None, :]
        norm = norm + (~just_done).astype(np.float32) * neg
        pool = np.concatenate([done_score, norm], axis=1)
        merged = torch.topk(torch.from_numpy(pool), beams).indices.numpy()
        done_seq = np.concatenate([done_seq, cand_seq], axis=1)[qi, merged]
        done_score = pool[qi, merged]
        done = np.concatenate([done, just_done], axis=1)[qi, merged]

        if step:  # reordered by parent: the parent's own slot, fed this step, is an ancestor now
            fed = width + beams * (step - 1)
            attend[:, :, width : fed + beams] = attend[qi, parent, width : fed + beams]
        if trie is not None:
            nodes = child[(qi * beams + parent).ravel(), running_seq[:, :, step].ravel()]

        # Could a running beam still beat the worst kept hypothesis (transformers' heuristic)?
        best_running = running_score[:, :1] / np.float32(float(step + 1) ** length_penalty)
        worst_done = np.where(done, done_score.min(axis=1, keepdims=True), neg)
        hopeful = hopeful & (best_running > worst_done).any(axis=-1, keepdims=True)
        if not hopeful.any() or done.all() or ended.all():
            break
    return BeamSearchOutput(
        torch.from_numpy(done_seq[:, :, : step + 1].copy()).to(device),
        torch.from_numpy(done_score).to(device),
    )


def _constrain(
    trie: Trie, nodes: np.ndarray, log_probs: np.ndarray, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """``log_probs`` with the tokens that ``nodes`` do not allow at -inf, and the node each
    allowed (row, token) leads to: the rules of ``TrieLogitsProcessor``, from the beams' nodes.

    Only the few allowed scores are gathered (``Trie.live_edges``). A row that allows nothing
    (past EOS, or a dead end) may emit EOS only and stays where it is; a row whose allowed
    tokens all score -inf gets them at ``finfo.min / 2``.
    """
    n, vocab = log_probs.shape
    row, tok, child, degree = trie.live_edges(nodes, with_degree=True)
    if trie.top_token >= vocab:
        inside = tok < vocab
        row, tok, child = row[inside], tok[inside], child[inside]
        degree = np.bincount(row, minlength=n)
    if eos < vocab and not degree.all():
        rest = np.flatnonzero(degree == 0)
        row = np.concatenate([row, rest])
        tok = np.concatenate([tok, np.full(rest.size, eos)])
        child = np.concatenate([child, nodes[rest]])
    values = log_probs[row, tok]
    if values.size and values.min() == -np.inf:
        best = np.full(n, -np.inf, dtype=values.dtype)
        np.maximum.at(best, row, values)
        values = np.where(np.isneginf(best[row]), np.finfo(values.dtype).min / 2, values)
    out = np.full_like(log_probs, -np.inf)
    out[row, tok] = values
    to = np.full((n, vocab), trie.dead_end, dtype=np.int64)
    to[row, tok] = child
    return out, to


@torch.no_grad()
def generate_beam_search(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    trie: Trie,
    *,
    num_beams: int,
    max_new_tokens: int,
    pad_token_id: int,
    length_penalty: float = 1.0,
) -> BeamSearchOutput:
    """The reference: ``generate`` with a ``TrieLogitsProcessor``, same output as above.

    Kept to check ``trie_beam_search`` against and to measure what it saves; it prefills every
    prompt ``num_beams`` times.
    """
    from transformers import LogitsProcessorList

    from grace.trie import TrieLogitsProcessor

    beams = max(int(num_beams), 1)
    batch, width = inputs["input_ids"].shape
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        num_beams=beams,
        num_return_sequences=beams,
        do_sample=False,
        early_stopping=True,
        length_penalty=length_penalty,
        logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, width)]),
        output_scores=True,
        return_dict_in_generate=True,
        pad_token_id=pad_token_id,
        eos_token_id=trie.eos_token_id,
    )
    seqs = out.sequences[:, width:].reshape(batch, beams, -1)
    scores = getattr(out, "sequences_scores", None)
    if scores is None:  # one beam is greedy search: no sequence scores
        scores = torch.zeros(batch * beams)
    return BeamSearchOutput(seqs, scores.reshape(batch, beams).float())
