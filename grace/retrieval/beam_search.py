"""Beam search constrained by an identifier trie, built for retrieval's short decodes.

Why not ``generate(num_beams=...)``: it copies every prompt ``num_beams`` times before the first
forward, so a query pays its prompt ``num_beams`` times, and it walks every beam's whole prefix
through the trie at each step, and it copies the whole cache of every beam at every step. Here
each prompt is run once and stays in the cache once: the beams' tokens are appended side by side
and each beam attends (4D mask) to the prompt, its ancestors and itself, so nothing is copied when
beams are reordered. Each beam keeps its trie node, from which a step reads the few tokens it
allows and the nodes they lead to (``Trie.live_edges``: no vocabulary-wide mask, no search for the
child), and all queries x beams of a batch step in one forward.

Each step is a softmax over a beam's trie node's children only (a hierarchical softmax along
the identifier tree, what the lite backbone trains): the hidden state of each beam is multiplied
with the output rows of its node's children, so a step costs beams x children x hidden and
nothing of the vocabulary's size is computed or allocated, however many identifiers there are
(BENCHMARKS.md#query-cost-by-catalog-size). A node without children (a dead end) may emit EOS
only, with probability one.

The ranking is that of transformers' beam search with ``early_stopping=True`` and a
``TrieLogitsProcessor(renormalize=True)`` (the dense reference, which a test holds this to: full
logits, mask, renormalize over the allowed children): at each step the best ``2 * num_beams``
continuations of a query are kept, those ending in EOS become finished hypotheses scored
``sum of log-probs / number of generated tokens (EOS included) ** length_penalty``, and a query
is done once ``num_beams`` hypotheses are finished. Decoder-only backbones whose forward takes a
4D boolean ``attention_mask`` and appends to a ``DynamicCache`` (Llama-family text models,
Idefics3/SmolVLM); plain Llama decoders run through ``grace.retrieval.fused_llama`` instead of
their modules, and return hidden states rather than logits.
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
    decoder, scores = _prefill(model, inputs, mask, beams, max_new_tokens, fused_steps)
    device = inputs["input_ids"].device
    state = BeamState.start(mask, beams, max_new_tokens, pad_token_id, device)
    for step in range(max_new_tokens):
        state.step = step
        if step:
            scores = _step(state, decoder)
        if _select(state, scores, trie, eos, length_penalty, max_new_tokens):
            break
    return _finish(state)


class _Scores:
    """A step's next-token scores: hidden states scored against output rows, or logits.

    Fused steps give hidden states; a node's children are then scored by gathering their
    output rows (the model's ``output_rows``, else rows of its output embeddings). A model run
    through its own forward gives logits, of which the children's are read.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        hidden: torch.Tensor | None = None,
        logits: torch.Tensor | None = None,
    ):
        self.model, self.hidden, self.logits = model, hidden, logits

    @property
    def vocab(self) -> int | None:
        """Tokens the logits cover, or ``None`` (output rows score any token)."""
        return None if self.logits is None else self.logits.shape[-1]

    def of_edges(self, row: np.ndarray, tok: np.ndarray) -> torch.Tensor:
        """``(edges,)`` the logit of token ``tok[i]`` for row ``row[i]``."""
        r = torch.from_numpy(row).to(self._device)
        t = torch.from_numpy(tok.astype(np.int64)).to(self._device)
        if self.logits is not None:
            return self.logits[r, t].float()
        tokens, inverse = torch.unique(t, return_inverse=True)
        if tokens.numel() * self.hidden.shape[0] <= 2 * t.numel():
            # Rows share their children (every query at an atomic root, digits of numeric ids):
            # score each distinct token once with a matmul instead of copying a row per edge.
            rows = _output_rows(self.model, tokens)
            return (self.hidden.to(rows.dtype) @ rows.T)[r, inverse].float()
        rows = _output_rows(self.model, t)
        return (rows * self.hidden[r].to(rows.dtype)).sum(-1).float()

    def full(self) -> torch.Tensor:
        """``(rows, vocab)`` logits over every token: plain beam search only."""
        if self.logits is not None:
            return self.logits.float()
        full = getattr(self.model, "full_logits", None)
        if full is not None:
            return full(self.hidden).float()
        return self.model.get_output_embeddings()(self.hidden).float()

    @property
    def _device(self) -> torch.device:
        return (self.logits if self.logits is not None else self.hidden).device


def _output_rows(model: PreTrainedModel, tokens: torch.Tensor) -> torch.Tensor:
    """Output rows of ``tokens``: the model's ``output_rows`` or its output embeddings' rows."""
    rows = getattr(model, "output_rows", None)
    if rows is not None:
        return rows(tokens)
    return model.get_output_embeddings().weight[tokens]


def _token_embeddings(model: PreTrainedModel):
    """The model's ``token_embeddings`` (identifier rows of their own), if it has them."""
    return getattr(model, "token_embeddings", None)


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
    ) -> _Scores:
        """Scores after ``tokens`` (one per beam), each attending to its ``keep_kv`` slots."""
        if self.fused is not None:
            embed = _token_embeddings(self.model)
            hidden = self.fused.step(
                tokens,
                position,
                keep_kv,
                self.keys,
                self.values,
                self.filled,
                embeds=None if embed is None else embed(tokens),
                hidden=True,
            )
            self.filled += tokens.shape[1]
            return _Scores(self.model, hidden=hidden.reshape(-1, hidden.shape[-1]))
        logits = self.model(
            input_ids=tokens,
            attention_mask=keep_kv[:, None].contiguous(),
            position_ids=position,
            past_key_values=self.cache,
            use_cache=True,
        ).logits
        return _Scores(self.model, logits=logits.reshape(-1, logits.shape[-1]))


def _prefill(
    model: PreTrainedModel,
    inputs: dict[str, torch.Tensor],
    mask: torch.Tensor,
    beams: int,
    max_new_tokens: int,
    fused_steps: bool,
) -> tuple[_Decoder, _Scores]:
    """Run each prompt once; the decoder holding its cache and the prompts' last scores."""
    ids = inputs["input_ids"]
    batch, width = ids.shape
    device = ids.device
    extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
    position = _positions(mask)
    fused = LlamaSteps.of(model) if fused_steps else None
    embed = getattr(model, "prompt_embeddings", None)  # identifier tokens and features
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
        embeds = embed(ids, **extra) if embed is not None else None
        keys, values = decoder.keys, decoder.values
        hidden = fused.step(
            ids, position, keep_prompt, keys, values, 0, last_only=True, embeds=embeds, hidden=True
        )
        decoder.filled = width
        return decoder, _Scores(model, hidden=hidden[:, -1, :])
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
    return decoder, _Scores(model, logits=logits[:, -1, :])


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
        mask: torch.Tensor,
        beams: int,
        max_new_tokens: int,
        pad_token_id: int,
        device: torch.device,
    ) -> BeamState:
        """Every beam of a query starts as its prompt: at step 0 one row expands (the prefill's)."""
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


def _step(state: BeamState, decoder: _Decoder) -> _Scores:
    """Feed each running beam's last token; the scores of what may follow."""
    step, beams = state.step, state.beams
    fed = state.width + beams * (step - 1)  # cache slots filled before this step
    state.attend[:, :, fed : fed + beams] = np.eye(beams, dtype=bool)  # each beam's own slot
    keep_kv = torch.from_numpy(state.attend[:, :, : fed + beams]).to(state.device)
    state.position = state.position + 1
    fed_tokens = torch.from_numpy(state.running_seq[:, :, step - 1].copy()).to(state.device)
    return decoder(fed_tokens, state.position, keep_kv)


def _select(
    state: BeamState,
    scores: _Scores,
    trie: Trie | None,
    eos: int,
    length_penalty: float,
    max_new_tokens: int,
) -> bool:
    """Keep each query's best beams and finished hypotheses; whether the search is over.

    At each step the best ``2 * beams`` continuations of a query are candidates: the best
    unfinished ones run on, and those among the top ``beams`` that end in EOS (or at the last
    step) join the hypotheses if they score high enough. At step 0 every beam of a query is
    its prompt, so only that one row (``scores`` has one per query) is expanded.
    """
    step, beams, qi = state.step, state.beams, state.qi
    batch = state.running_score.shape[0]
    rows = 1 if step == 0 else beams  # expanded rows per query
    neg = np.float32(_NEG)
    nodes = state.nodes.reshape(batch, beams)[:, :rows].ravel()
    if trie is not None:
        log_probs, tokens, child = _children(trie, nodes, scores, eos, 2 * beams if not step else 2)
    else:
        log_probs, tokens, child = torch.log_softmax(scores.full(), -1).cpu().numpy(), None, None
    width = log_probs.shape[-1]
    running = state.running_score[:, :rows]
    total = (log_probs.reshape(batch, rows, width) + running[:, :, None]).reshape(batch, -1)
    cand_score, cand = (t.numpy() for t in torch.topk(torch.from_numpy(total), 2 * beams))
    src, slot = np.divmod(cand, width)
    tok = slot if tokens is None else tokens[qi * rows + src, slot]
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
    if child is not None:
        state.nodes = child[(qi * rows + parent).ravel(), slot[qi, pick].ravel()]

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


def _children(
    trie: Trie, nodes: np.ndarray, scores: _Scores, eos: int, min_width: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's children with their log-probabilities, normalized over the children alone.

    Returns ``(rows, K)`` log-probabilities, tokens and the nodes they lead to, ``K`` the
    widest row's fan-out (at least ``min_width``); padding scores ``-inf`` and is EOS into a
    dead end. Only the children's scores are computed (``Trie.live_edges``). A row without
    children (past EOS, or a dead end) may emit EOS only, with log-probability 0, and stays
    where it is.
    """
    n = nodes.shape[0]
    row, tok, child, degree = trie.live_edges(nodes, with_degree=True)
    vocab = scores.vocab
    if vocab is not None and trie.top_token >= vocab:  # tokens the logits cannot score
        inside = tok < vocab
        row, tok, child = row[inside], tok[inside], child[inside]
        degree = np.bincount(row, minlength=n)
    if not degree.all():
        rest = np.flatnonzero(degree == 0)
        order = np.argsort(np.concatenate([row, rest]), kind="stable")
        row = np.concatenate([row, rest])[order]
        tok = np.concatenate([tok, np.full(rest.size, eos, dtype=tok.dtype)])[order]
        child = np.concatenate([child, nodes[rest]])[order]
        degree = np.maximum(degree, 1)
    width = max(int(degree.max(initial=0)), min_width)
    slot = np.arange(row.size) - np.repeat(np.cumsum(degree) - degree, degree)
    logits = torch.full((n, width), float("-inf"))
    logits[torch.from_numpy(row), torch.from_numpy(slot)] = scores.of_edges(row, tok).cpu()
    tokens = np.full((n, width), eos, dtype=np.int64)
    tokens[row, slot] = tok
    to = np.full((n, width), trie.dead_end, dtype=np.int64)
    to[row, slot] = child
    return torch.log_softmax(logits, -1).numpy(), tokens, to


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
    """The dense reference: ``generate`` with a renormalizing ``TrieLogitsProcessor``.

    Full logits, the trie's mask, and the allowed children renormalized: the scores
    ``trie_beam_search`` computes from the children's rows alone, which a test holds it to.
    Also what its savings are measured against; it prefills every prompt ``num_beams`` times.
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
        logits_processor=LogitsProcessorList([TrieLogitsProcessor(trie, width, renormalize=True)]),
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
