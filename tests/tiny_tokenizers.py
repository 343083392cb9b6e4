"""Tiny tokenizers trained inside the tests (no shared assets needed): byte-level BPE and SentencePiece."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there; the world is big",
    "numbers 0123456789 and tabs\tand newlines\n\nend",
    "café naïve résumé — déjà vu",
    "fusion of large language models by knowledge distillation",
] * 40


def train_byte_level(path: Path, normalizer=None) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if normalizer is not None:
        tok.normalizer = normalizer
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.save(str(path))
    return path


def train_sentencepiece(dirpath: Path, byte_fallback: bool = True, vocab_size: int = 320) -> Path:
    import sentencepiece as spm

    dirpath.mkdir(parents=True, exist_ok=True)
    corpus = dirpath / "corpus.txt"
    corpus.write_text("\n".join(CORPUS), encoding="utf-8")
    prefix = dirpath / "tok"
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(prefix), model_type="bpe", vocab_size=vocab_size,
        byte_fallback=byte_fallback, character_coverage=1.0, hard_vocab_limit=False,
        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
        minloglevel=2,
    )
    return prefix.with_suffix(".model")


