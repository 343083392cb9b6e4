"""Tiny tokenizers trained inside the tests (no shared assets needed): byte-level BPE and SentencePiece."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there; the world is big",
    "numbers 0123456789 and tabs\tand newlines\n\nend",
    "café naïve résumé — déjà vu",
    "fusion of large language models by knowledge distillation",
] * 40


# Indented source with runs of spaces, so that a BPE trained on it has whitespace-run pieces (``ĠĠ``, ``ĠĠĠĠ``, …).
CODE_CORPUS = [
    "def f(x):\n    if x:\n        return [x,  x]\n    return  None\n",
    "class A:\n    def g(self):\n        for i in range(3):\n            print(i,   i)\n",
] * 40


def train_byte_level(path: Path, normalizer=None, corpus: Sequence[str] = CORPUS, vocab_size: int = 300,
                     added_tokens: Sequence[str] = ()) -> Path:
    """A GPT-2-style byte-level BPE; ``added_tokens`` are added after training as non-special tokens at the end of the
    vocabulary (GPT-NeoX-20B's whitespace runs are such tokens)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    if added_tokens:
        tok.add_tokens([AddedToken(t, normalized=True, special=False) for t in added_tokens])
    tok.save(str(path))
    return path


def train_sentencepiece(dirpath: Path, byte_fallback: bool = True, vocab_size: int = 320,
                        user_defined_symbols: Sequence[str] = ()) -> Path:
    import sentencepiece as spm

    dirpath.mkdir(parents=True, exist_ok=True)
    corpus = dirpath / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    prefix = dirpath / "tok"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=byte_fallback, character_coverage=1.0, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        minloglevel=2, user_defined_symbols=list(user_defined_symbols),
    )
    return prefix.with_suffix(".model")


