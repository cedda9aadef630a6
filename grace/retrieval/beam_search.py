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
``grace.retrieval.fused_llama`` instead of their modules.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from transformers import PreTrainedModel

from grace.retrieval.fused_llama import LlamaSteps
from grace.retrieval.trie import Trie

_NEG = -1.0e9  # transformers' "never pick this" score, kept so rankings match it exactly


@dataclass
class BeamSearchOutput:
    """The finished hypotheses of each query, best first."""

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
    beams = max(int(num_beams), 1)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(inputs["input_ids"])
    decoder, logits = _prefill(model, inputs, mask, beams, max_new_tokens, fused_steps)
    device = inputs["input_ids"].device
    state = BeamState.start(logits, mask, beams, max_new_tokens, pad_token_id, device)
    for step in range(max_new_tokens):
        state.step = step
        log_probs = state.log_probs if step == 0 else _step(state, decoder)
        if _select(state, log_probs, trie, eos, length_penalty, max_new_tokens):
            break
    return _finish(state)


class _Decoder:
    """The model's side of the search: the prompts' cache and one forward per beam step.

    With fused steps (``LlamaSteps``) the cache is a pair of preallocated key/value buffers
    of which ``filled`` slots are taken; otherwise it is the model's own ``DynamicCache``.
    """

    def __init__(self, model: PreTrainedModel, fused: LlamaSteps | None, cache=None):
        self.model, self.fused, self.cache = model, fused, cache
        self.keys = self.values = None
        self.filled = 0

    def __call__(
        self, tokens: torch.Tensor, position: torch.Tensor, keep_kv: torch.Tensor
    ) -> torch.Tensor:
        """Logits of ``tokens`` (one per beam), each attending to its ``keep_kv`` slots."""
        if self.fused is not None:
            logits = self.fused.step(tokens, position, keep_kv, self.keys, self.values, self.filled)
            self.filled += tokens.shape[1]
            return logits
        return self.model(
            input_ids=tokens,
            attention_mask=keep_kv[:, None].contiguous(),
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
        ).logits


def _prefill(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    mask: torch.Tensor,
    beams: int,
    max_new_tokens: int,
    fused_steps: bool,
) -> tuple[_Decoder, torch.Tensor]:
    """Run each prompt once; the decoder holding its cache and the prompts' last logits."""
    ids = inputs["input_ids"]
    batch, width = ids.shape
    device = ids.device
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    position = _positions(mask)
    fused = LlamaSteps.of(model) if fused_steps else None
    embed = getattr(model, "prompt_embeddings", None) if extra else None
    decoder = _Decoder(model, fused)
    if fused is not None and (not extra or embed is not None):  # prefill fused too
        decoder.keys, decoder.values = fused.empty_buffers(
            batch, width + beams * max_new_tokens, ids
        )
        causal = torch.ones(width, width, dtype=torch.bool, device=device).tril()
        # pads attend to themselves only, so that their (unused) states stay finite
        keep_prompt = (causal & mask.bool()[:, None, :]) | torch.eye(
            width, dtype=torch.bool, device=device
        )
        embeds = embed(ids, **extra) if extra else None
        keys, values = decoder.keys, decoder.values
        logits = fused.step(
            ids, position, keep_prompt, keys, values, 0, last_only=True, embeds=embeds
        )
        decoder.filled = width
        return decoder, logits[:, -1, :].float()
    out = model(
        input_ids=ids,
        attention_mask=mask if bool((mask == 0).any()) else None,
        position_ids=position,
        use_cache=True,
        logits_to_keep=1,
        **extra,
    )
    logits = out.logits
    if fused is not None:  # the model's cache copied into the fused steps' buffers
        decoder.keys, decoder.values, decoder.filled = fused.buffers(
            out.past_key_values, beams * max_new_tokens
        )
    else:
        decoder.cache = out.past_key_values
    del out
    return decoder, logits[:, -1, :].float()


@dataclass
class BeamState:
    """Where the search of ``batch`` queries x ``beams`` beams stands between steps.

    The bookkeeping runs in numpy: on arrays of a few hundred entries a numpy call costs less
    than a torch op, and a step makes dozens of them (measured in ``docs/experiments.md``).
    ``torch.topk`` stays: it picks among tied scores as transformers' search does (with
    identical inputs).

    The cache keeps one row per query: the prompt once, then at each step the ``beams`` new
    tokens side by side. ``attend[q, b]`` says what beam b of query q attends to: the prompt,
    its ancestors' slots and its own slot; beams are never copied, only these rows reordered.
    """

    width: int
    """Prompt length (cache slots before the first generated token)."""
    beams: int
    log_probs: np.ndarray
    """``(batch * beams, vocab)`` the step's next-token log-probabilities."""
    nodes: np.ndarray
    """``(batch * beams,)`` each beam's trie node."""
    attend: np.ndarray
    """``(batch, beams, cache slots)`` the slots each beam attends to."""
    position: torch.Tensor
    """``(batch, beams)`` position id of the token each beam feeds next."""
    running_seq: np.ndarray
    """``(batch, beams, max_new_tokens)`` the unfinished beams' tokens, padded."""
    running_score: np.ndarray
    """``(batch, beams)`` their sums of log-probabilities."""
    done_seq: np.ndarray
    """``(batch, beams, max_new_tokens)`` the finished hypotheses kept so far."""
    done_score: np.ndarray
    """``(batch, beams)`` their length-normalised scores."""
    done: np.ndarray
    """``(batch, beams)`` which of the kept hypotheses are real (not placeholders)."""
    hopeful: np.ndarray
    """``(batch, 1)`` whether a running beam may still beat the worst kept hypothesis."""
    qi: np.ndarray
    """``(batch, 1)`` a query's row, for fancy indexing of ``(batch, beams)`` arrays."""
    device: torch.device
    step: int = 0

    @classmethod
    def start(
        cls,
        logits: torch.Tensor,
        mask: torch.Tensor,
        beams: int,
        max_new_tokens: int,
        pad_token_id: int,
        device: torch.device,
    ) -> BeamState:
        """Every beam of a query starts as its prompt: one prefilled row, repeated."""
        batch, width = mask.shape
        neg = np.float32(_NEG)
        attend = np.zeros((batch, beams, width + beams * max_new_tokens), dtype=bool)
        attend[:, :, :width] = mask.bool().cpu().numpy()[:, None, :]
        running_seq = np.full((batch, beams, max_new_tokens), pad_token_id, dtype=np.int64)
        running_score = np.zeros((batch, beams), dtype=np.float32)
        running_score[:, 1:] = neg  # identical beams: only the first one may expand at step 0
        return cls(
            width=width,
            beams=beams,
            log_probs=np.repeat(torch.log_softmax(logits, dim=-1).cpu().numpy(), beams, axis=0),
            nodes=np.zeros(batch * beams, dtype=np.int64),
            attend=attend,
            position=_positions(mask)[:, -1:].expand(batch, beams),
            running_seq=running_seq,
            running_score=running_score,
            done_seq=running_seq.copy(),
            done_score=np.full((batch, beams), neg, dtype=np.float32),
            done=np.zeros((batch, beams), dtype=bool),
            hopeful=np.ones((batch, 1), dtype=bool),
            qi=np.arange(batch)[:, None],
            device=device,
        )


def _step(state: BeamState, decoder: _Decoder) -> np.ndarray:
    """Feed each running beam's last token; the next tokens' log-probabilities."""
    step, beams = state.step, state.beams
    fed = state.width + beams * (step - 1)  # cache slots filled before this step
    state.attend[:, :, fed : fed + beams] = np.eye(beams, dtype=bool)  # each beam's own slot
    keep_kv = torch.from_numpy(state.attend[:, :, : fed + beams]).to(state.device)
    state.position = state.position + 1
    fed_tokens = torch.from_numpy(state.running_seq[:, :, step - 1].copy()).to(state.device)
    logits = decoder(fed_tokens, state.position, keep_kv)
    rows = state.nodes.shape[0]
    return torch.log_softmax(logits.float(), dim=-1).view(rows, -1).cpu().numpy()


def _select(
    state: BeamState,
    log_probs: np.ndarray,
    trie: Trie | None,
    eos: int,
    length_penalty: float,
    max_new_tokens: int,
) -> bool:
    """Keep each query's best beams and finished hypotheses; whether the search is over.

    At each step the best ``2 * beams`` continuations of a query are candidates: the best
    unfinished ones run on, and those among the top ``beams`` that end in EOS (or at the last
    step) join the hypotheses if they score high enough.
    """
    step, beams, qi = state.step, state.beams, state.qi
    batch, vocab = state.running_score.shape[0], log_probs.shape[-1]
    neg = np.float32(_NEG)
    if trie is not None:
        log_probs, child = _constrain(trie, state.nodes, log_probs, eos)
    total = (log_probs.reshape(batch, beams, vocab) + state.running_score[:, :, None]).reshape(
        batch, -1
    )
    cand_score, cand = (t.numpy() for t in torch.topk(torch.from_numpy(total), 2 * beams))
    src, tok = np.divmod(cand, vocab)
    cand_seq = state.running_seq[qi, src]
    cand_seq[:, :, step] = tok
    ended = (tok == eos) | (step + 1 == max_new_tokens)

    # The best unfinished candidates run on.
    live_score = cand_score + ended.astype(np.float32) * neg
    pick = torch.topk(torch.from_numpy(live_score), beams).indices.numpy()
    state.running_seq = cand_seq[qi, pick]
    state.running_score = live_score[qi, pick]
    parent = src[qi, pick]

    # Finished candidates among the top ``beams`` join the hypotheses if good enough.
    norm = cand_score / np.float32(float(step + 1) ** length_penalty)
    norm = norm + state.done.all(axis=1, keepdims=True).astype(np.float32) * neg
    norm = norm + (~state.hopeful).astype(np.float32) * neg
    just_done = ended & (np.arange(2 * beams) < beams)[None, :]
    norm = norm + (~just_done).astype(np.float32) * neg
    pool = np.concatenate([state.done_score, norm], axis=1)
    merged = torch.topk(torch.from_numpy(pool), beams).indices.numpy()
    state.done_seq = np.concatenate([state.done_seq, cand_seq], axis=1)[qi, merged]
    state.done_score = pool[qi, merged]
    state.done = np.concatenate([state.done, just_done], axis=1)[qi, merged]

    if step:  # reordered by parent: the parent's own slot, fed this step, is an ancestor now
        slots = slice(state.width, state.width + beams * step)
        state.attend[:, :, slots] = state.attend[qi, parent, slots]
    if trie is not None:
        state.nodes = child[(qi * beams + parent).ravel(), state.running_seq[:, :, step].ravel()]

    # Could a running beam still beat the worst kept hypothesis (transformers' heuristic)?
    best_running = state.running_score[:, :1] / np.float32(float(step + 1) ** length_penalty)
    worst_done = np.where(state.done, state.done_score.min(axis=1, keepdims=True), neg)
    state.hopeful = state.hopeful & (best_running > worst_done).any(axis=-1, keepdims=True)
    return not state.hopeful.any() or state.done.all() or ended.all()


def _finish(state: BeamState) -> BeamSearchOutput:
    """The kept hypotheses, cut to the tokens generated."""
    return BeamSearchOutput(
        torch.from_numpy(state.done_seq[:, :, : state.step + 1].copy()).to(state.device),
        torch.from_numpy(state.done_score).to(state.device),
    )


def _constrain(
    trie: Trie, nodes: np.ndarray, log_probs: np.ndarray, eos: int
) -> tuple[np.ndarray, np.ndarray]:
    """Apply the rules of ``TrieLogitsProcessor`` from the beams' trie nodes.

    Returns ``log_probs`` with the tokens that ``nodes`` do not allow at -inf, and the node
    each allowed (row, token) leads to. Only the few allowed scores are gathered
    (``Trie.live_edges``). A row that allows nothing (past EOS, or a dead end) may emit EOS
    only and stays where it is; a row whose allowed tokens all score -inf gets them at
    ``finfo.min / 2``.
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

    from grace.retrieval.trie import TrieLogitsProcessor

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
