"""An offline tokenizer for the tiny default backbone, and identifier tokens for any tokenizer.

The default tokenizer is a byte-free BPE trained with `tokenizers` on the image set's captions
plus the identifier texts, so the ``string`` scheme gets real multi-digit merges. Special-token ids
are fixed and ``<pad>`` is deliberately non-zero: transformers' beam search treats a pad id of 0 as
missing and fills finished beams with EOS.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

SPECIAL_TOKENS = ("<unk>", "<pad>", "<s>", "</s>", "<image>")
DIGITS_LINE = " ".join("0123456789")


def train_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 2000,
    extra_special_tokens: Sequence[str] = (),
) -> PreTrainedTokenizerFast:
    """Train a BPE tokenizer offline; special ids: <unk> 0, <pad> 1, <s> 2, </s> 3, <image> 4."""
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *extra_special_tokens],
        show_progress=False,
    )

    def corpus() -> Iterable[str]:
        yield DIGITS_LINE  # every digit is a token on its own, whatever the captions hold
        yield from texts

    tok.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        padding_side="left",
    )


def add_identifier_tokens(tokenizer: PreTrainedTokenizerBase, tokens: Iterable[str]) -> int:
    """Add whole-identifier tokens (structured levels, atomic ids); returns how many were new.

    ``lstrip`` lets ``"0_12 1_3"`` tokenize to two tokens rather than four with the spaces.
    """
    vocab = tokenizer.get_vocab()
    new = [t for t in dict.fromkeys(tokens) if t not in vocab]
    if not new:
        return 0
    return tokenizer.add_tokens([AddedToken(t, lstrip=True, normalized=False) for t in new])
