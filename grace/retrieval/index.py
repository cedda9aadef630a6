"""Identifiers as token sequences of one tokenizer, and the trie that constrains decoding to them.

The bridge between an ``IdentifierMap`` (strings) and generation (token ids): built once per
(map, tokenizer), it gives the trie for ``generate`` and resolves a generated sequence to its image.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from grace.data.records import ImageRecord
from grace.errors import InvalidInputError, Problem
from grace.identifiers import IdentifierMap
from grace.models.tokenization import add_identifier_tokens, train_tokenizer
from grace.retrieval.trie import Trie


@dataclass
class IdentifierIndex:
    """The live identifiers of a map as token sequences of one tokenizer, with their trie.

    Row ``n`` holds ``identifiers[n]``, the key of its image and its tokens (without EOS);
    ``position`` maps an identifier to its row. Build it with :meth:`build`.
    """

    identifiers: list[str]
    keys: list[str]
    sequences: list[tuple[int, ...]]
    trie: Trie
    eos_token_id: int
    _by_sequence: dict[tuple[int, ...], int] = field(init=False, repr=False)
    position: dict[str, int] = field(init=False, repr=False)  # identifier -> its row

    def __post_init__(self) -> None:
        self._by_sequence = {s: n for n, s in enumerate(self.sequences)}
        self.position = {i: n for n, i in enumerate(self.identifiers)}

    @classmethod
    def build(cls, id_map: IdentifierMap, tokenizer: PreTrainedTokenizerBase) -> IdentifierIndex:
        """Tokenize every live identifier; refuse two identifiers that tokenize alike."""
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer needs an EOS token to end identifiers")
        pairs = id_map.identifiers()
        texts = [id_map.token_text(i) for i, _ in pairs]
        encoded = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        sequences = [tuple(s) for s in encoded]
        owner: dict[tuple[int, ...], int] = {}
        problems = []
        for n, seq in enumerate(sequences):
            if not seq:
                problems.append(Problem("identifiers", "id-tokenizes", f"{pairs[n][0]!r} is empty"))
            elif seq in owner:
                other = pairs[owner[seq]][0]
                problems.append(
                    Problem(
                        "identifiers",
                        "id-tokens-unique",
                        f"{pairs[n][0]!r} and {other!r} tokenize to the same tokens",
                    )
                )
            else:
                owner[seq] = n
        if problems:
            raise InvalidInputError(problems)
        trie = Trie(sequences, eos_token_id=tokenizer.eos_token_id)
        return cls(
            identifiers=[i for i, _ in pairs],
            keys=[k for _, k in pairs],
            sequences=sequences,
            trie=trie,
            eos_token_id=tokenizer.eos_token_id,
        )

    def resolve(self, token_ids: Sequence[int]) -> tuple[str, str] | None:
        """(identifier, key) of a generated sequence, cut at its first EOS; None if invalid."""
        seq = []
        for t in token_ids:
            if t == self.eos_token_id:
                break
            seq.append(int(t))
        n = self._by_sequence.get(tuple(seq))
        return None if n is None else (self.identifiers[n], self.keys[n])


def default_tokenizer(
    id_map: IdentifierMap, records: Sequence[ImageRecord], vocab_size: int = 2000
) -> PreTrainedTokenizerBase:
    """The tiny backbone's tokenizer: BPE over captions and identifier texts, plus id tokens."""
    texts = [c for r in records for c in r.captions]
    texts += [id_map.token_text(i) for i, _ in id_map.identifiers()]
    tok = train_tokenizer(texts, vocab_size=vocab_size)
    add_identifier_tokens(tok, id_map.new_tokens())
    return tok


def identifier_stats(
    id_map: IdentifierMap, records: Sequence[ImageRecord] | None = None
) -> dict[str, Any]:
    """Counts of an identifier map; with the image set, token lengths and the trie's size too."""
    per_image = [len(v) for v in id_map.ids.values()]
    stats: dict[str, Any] = {
        "scheme": id_map.scheme,
        "params": id_map.params,
        "images": len(id_map),
        "identifiers": sum(per_image),
        "identifiers_per_image_max": max(per_image, default=0),
        "retired_images": len(id_map.retired),
        "new_vocabulary_tokens": len(id_map.new_tokens()),
    }
    if records is not None:
        index = IdentifierIndex.build(id_map, default_tokenizer(id_map, records))
        lengths = np.array([len(s) for s in index.sequences]) if index.sequences else np.zeros(1)
        stats.update(
            tokens_per_id_mean=round(float(lengths.mean()), 2),
            tokens_per_id_max=int(lengths.max()),
            trie_nodes=index.trie.num_nodes,
            trie_bytes=index.trie.nbytes,
        )
    return stats
