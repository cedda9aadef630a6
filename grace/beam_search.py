"""Beam search constrained by an identifier trie, built for retrieval's short decodes.

Why not ``generate(num_beams=...)``: it copies every prompt ``num_beams`` times before the first
forward, so a query pays its prompt ``num_beams`` times, and it walks every beam's whole prefix
through the trie at each step, and it copies the whole cache of every beam at every step. Here
each prompt is run once and stays in the cache once: the beams' tokens are appended side by side
and each beam attends (4D mask) to the prompt, its ancestors and itself, so nothing is copied when
beams are reordered. Each beam keeps its trie node, and all queries x beams of a batch step in one
forward.

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
from grace.trie import Trie, constrain_scores

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
    if fused is not None and not extra:  # a text prompt: prefill through the fused layers too
        keys, values = fused.empty_buffers(batch, width + beams * max_new_tokens, ids)
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # pads attend to themselves only, so that their (unused) states stay finite
        keep_prompt = (causal & mask.bool()[:, None, :]) | torch.eye(
            width, dtype=torch.bool, device=device
        )
        logits = fused.step(ids, position, keep_prompt, keys, values, 0, last_only=True)
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
    # Every beam of a query starts as its prompt: one prefilled row, repeated.
    log_probs = torch.log_softmax(logits, dim=-1).repeat_interleave(beams, dim=0)
    nodes = np.zeros(batch * beams, dtype=np.int64)
    flat_base = (torch.arange(batch, device=device) * beams)[:, None]
    # The cache keeps one row per query: the prompt once, then at each step the ``beams`` new
    # tokens side by side. A beam attends to the prompt, its ancestors' slots and its own slot;
    # beams are never copied, only ``ancestors`` is reordered.
    prompt_keep = mask.bool()[:, None, :].expand(batch, beams, width)
    ancestors = torch.zeros(batch, beams, beams * max_new_tokens, dtype=torch.bool, device=device)
    own_slot = torch.eye(beams, dtype=torch.bool, device=device).expand(batch, beams, beams)
    position = position[:, -1:].expand(batch, beams)
    beam_range = torch.arange(beams, device=device)[None, :]
    batch_range = torch.arange(batch, device=device)[:, None]

    running_seq = torch.full((batch, beams, max_new_tokens), pad_token_id, device=device)
    running_score = torch.zeros(batch, beams, device=device)
    running_score[:, 1:] = _NEG  # identical beams: only the first one may expand at step 0
    done_seq = running_seq.clone()
    done_score = torch.full((batch, beams), _NEG, device=device)
    done = torch.zeros(batch, beams, dtype=torch.bool, device=device)
    hopeful = torch.ones(batch, 1, dtype=torch.bool, device=device)
    top_beams = torch.arange(keep, device=device) < beams

    for step in range(max_new_tokens):
        if step:
            fed = beams * (step - 1)  # slots filled before this step
            keep_kv = torch.cat([prompt_keep, ancestors[:, :, :fed], own_slot], dim=2)
            position = position + 1
            fed_tokens = running_seq[:, :, step - 1]
            if fused is not None:
                logits = fused.step(fed_tokens, position, keep_kv, keys, values, filled)
                filled += beams
            else:
                logits = model(
                    input_ids=fed_tokens,
                    attention_mask=keep_kv[:, None],
                    position_ids=position,
                    past_key_values=cache,
                    use_cache=True,
                ).logits
            log_probs = torch.log_softmax(logits.float(), dim=-1).view(batch * beams, -1)
        if trie is not None:
            log_probs = constrain_scores(log_probs, trie.node_mask(nodes, vocab), eos)
        total = (log_probs.view(batch, beams, vocab) + running_score[:, :, None]).view(batch, -1)
        cand_score, cand = torch.topk(total, keep)
        src, tok = cand // vocab, cand % vocab
        cand_seq = torch.take_along_dim(running_seq, src[:, :, None], dim=1)
        cand_seq[:, :, step] = tok
        ended = (tok == eos) | (step + 1 == max_new_tokens)

        # The best unfinished candidates run on.
        live_score = cand_score + ended.float() * _NEG
        pick = torch.topk(live_score, beams).indices
        running_seq = torch.take_along_dim(cand_seq, pick[:, :, None], dim=1)
        running_score = torch.take_along_dim(live_score, pick, dim=1)
        parent = torch.take_along_dim(src, pick, dim=1)

        # Finished candidates among the top ``beams`` join the hypotheses if good enough.
        norm = cand_score / float(step + 1) ** length_penalty
        norm = norm + done.all(dim=1, keepdim=True).float() * _NEG
        norm = norm + (~hopeful).float() * _NEG
        just_done = ended & top_beams[None, :]
        norm = norm + (~just_done).float() * _NEG
        merged = torch.topk(torch.cat([done_score, norm], dim=1), beams).indices
        done_seq = torch.take_along_dim(torch.cat([done_seq, cand_seq], 1), merged[:, :, None], 1)
        done_score = torch.take_along_dim(torch.cat([done_score, norm], dim=1), merged, dim=1)
        done = torch.take_along_dim(torch.cat([done, just_done], dim=1), merged, dim=1)

        rows = (flat_base + parent).reshape(-1)
        if step:  # the parent's token, fed this step, is now an ancestor
            ancestors = torch.take_along_dim(ancestors, parent[:, :, None], dim=1)
            ancestors[batch_range, beam_range, beams * (step - 1) + parent] = True
        if trie is not None:
            tokens = running_seq[:, :, step].reshape(-1).cpu().numpy()
            nodes = trie.advance(nodes[rows.cpu().numpy()], tokens)

        # Could a running beam still beat the worst kept hypothesis (transformers' heuristic)?
        best_running = running_score[:, :1] / float(step + 1) ** length_penalty
        worst_done = torch.where(done, done_score.min(dim=1, keepdim=True).values, _NEG)
        hopeful = hopeful & (best_running > worst_done).any(dim=-1, keepdim=True)
        if not hopeful.any() or done.all() or ended.all():
            break
    return BeamSearchOutput(done_seq[:, :, : step + 1], done_score)


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
