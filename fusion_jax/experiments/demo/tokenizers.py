"""Demo tokenizers, trained at run time with the HF ``tokenizers`` library (no downloads).

Each trainer writes a directory with ``tokenizer.json`` and ``tokenizer_config.json`` (``tokenizer_class``
``PreTrainedTokenizerFast``, the BOS/EOS tokens) that both :func:`fusion_jax.tokenizers.load_tokenizer`
and ``transformers.AutoTokenizer.from_pretrained`` load:

* :func:`train_byte_level_bpe`: GPT-2/GPT-NeoX-style byte-level BPE (``Ġ``), the full 256-byte alphabet,
  ``<|endoftext|>`` = id 0 (BOS and EOS); optionally one token per digit. ``load_tokenizer`` kind
  ``"byte_level"``, no dummy prefix.
* :func:`train_sentencepiece_bpe`: Llama-2-style BPE (``▁`` for spaces, a dummy-prefix ``▁``, byte
  fallback): ``<unk>`` = 0, ``<s>`` = 1 (BOS), ``</s>`` = 2 (EOS), ``<0x00>``…``<0xFF>`` = 3…258, then the
  learned pieces. ``load_tokenizer`` kind ``"metaspace"`` with ``dummy_prefix=True``.

Both reproduce any UTF-8 text exactly, except that the SentencePiece style, like Llama-2, reads a literal
``▁`` (U+2581) in the text as a space (the standard library has none outside ``site-packages``).

Training is deterministic (same texts and arguments → identical ``tokenizer.json``) and the directory is
written atomically: into ``<out_dir>.partial``, then renamed over ``out_dir``.
"""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterable

from fusion_jax.errors import ConfigError
from fusion_jax.files import commit_directory

__all__ = [
    "BYTE_LEVEL_EOS",
    "SP_SPECIALS",
    "SP_BYTE_PIECES",
    "train_byte_level_bpe",
    "train_sentencepiece_bpe",
    "min_vocab_size",
    "sp_alphabet",
]

BYTE_LEVEL_EOS = "<|endoftext|>"
SP_SPECIALS = ("<unk>", "<s>", "</s>")  # ids 0, 1, 2; BOS <s>, EOS </s>
SP_BYTE_PIECES = tuple(f"<0x{b:02X}>" for b in range(256))  # ids 3..258
SP_SPACE = "\u2581"  # "▁"
# Characters the SentencePiece-style model learns as pieces; rarer ones go through byte fallback.
SP_MAX_ALPHABET = 128


def min_vocab_size(style: str) -> int:
    """Smallest vocabulary a trainer accepts: ``"byte_level"`` 257 (EOS + 256 bytes), ``"sentencepiece"``
    260 (3 specials + 256 byte pieces + ``▁``)."""
    return {"byte_level": 1 + 256, "sentencepiece": len(SP_SPECIALS) + 256 + 1}[style]


def _check_vocab_size(vocab_size: int, style: str, what: str) -> None:
    minimum = min_vocab_size(style)
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise ConfigError(f"vocab_size={vocab_size!r} is too small for {what}: the minimum is {minimum}")


def train_byte_level_bpe(
    texts: Iterable[str], out_dir: str | Path, vocab_size: int, split_digits: bool = False
) -> Path:
    """Train a GPT-2-style byte-level BPE of exactly ``vocab_size`` ids (fewer only if the texts run out of
    pairs to merge) and write ``out_dir/tokenizer.json`` + ``tokenizer_config.json``; returns ``out_dir``.

    ``<|endoftext|>`` is id 0 and the EOS/BOS; ids 1..256 are the byte alphabet. ``split_digits``: every
    digit is its own pre-token, so numbers are spelled digit by digit. Raises ValueError (naming the
    minimum, 257) for a smaller ``vocab_size``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    _check_vocab_size(vocab_size, "byte_level", "a byte-level BPE (1 special + 256 bytes)")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok = Tokenizer(models.BPE())
    digits = pre_tokenizers.Digits(individual_digits=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([digits, byte_level]) if split_digits else byte_level
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[BYTE_LEVEL_EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BYTE_LEVEL_EOS,
        "eos_token": BYTE_LEVEL_EOS,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    return _write_tokenizer_dir(Path(out_dir), tok.to_str(pretty=True), config)


def train_sentencepiece_bpe(texts: Iterable[str], out_dir: str | Path, vocab_size: int) -> Path:
    """Train a Llama-2-style BPE with byte fallback of exactly ``vocab_size`` ids (specials and byte pieces
    included; fewer only if the texts run out of pairs) and write ``out_dir/tokenizer.json`` +
    ``tokenizer_config.json``; returns ``out_dir``.

    Layout: ``<unk> <s> </s>`` = 0..2, ``<0x00>``…``<0xFF>`` = 3..258 (plain vocabulary entries of the BPE
    model, as in Llama-2), then the learned pieces: ``▁`` and other characters (at most
    ``SP_MAX_ALPHABET`` in all, the most frequent), then merges.
    The tokenizer prepends ``▁`` and turns spaces into ``▁`` (normalizer), has no pre-tokenizer, encodes
    unknown characters as their UTF-8 bytes, and with special tokens on adds ``<s>`` in front. Raises
    ValueError (naming the minimum, 260) for a smaller ``vocab_size``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    _check_vocab_size(vocab_size, "sentencepiece", "a SentencePiece-style BPE (3 specials + 256 byte pieces + \"▁\")")
    texts = list(texts)
    learned = vocab_size - len(SP_BYTE_PIECES)  # the trainer's budget: specials + alphabet + merges
    alphabet = sp_alphabet(texts, max(1, min(SP_MAX_ALPHABET, (learned - len(SP_SPECIALS)) // 2)))
    tok = Tokenizer(models.BPE(unk_token=SP_SPECIALS[0], byte_fallback=True))
    tok.normalizer = normalizers.Sequence([normalizers.Prepend(SP_SPACE), normalizers.Replace(" ", SP_SPACE)])
    # Training only: words are "▁*" + a run without "▁" (or a trailing run of "▁"), so indentation can
    # merge with the word after it but no merge ever spans a non-"▁" → "▁" boundary. Encoding without a
    # pre-tokenizer (as Llama-2's tokenizer.json does) therefore gives the same tokens.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(f"{SP_SPACE}*[^{SP_SPACE}]+|{SP_SPACE}+"), behavior="isolated")
    trainer = trainers.BpeTrainer(
        vocab_size=learned, special_tokens=list(SP_SPECIALS), show_progress=False,
        initial_alphabet=alphabet, limit_alphabet=len(alphabet),
    )
    tok.train_from_iterator(texts, trainer=trainer)

    cfg = json.loads(tok.to_str())
    cfg["model"]["vocab"] = _sp_vocab(cfg["model"]["vocab"])
    cfg["pre_tokenizer"] = None
    cfg["decoder"] = json.loads(decoders.Sequence([
        decoders.Replace(SP_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0),
    ]).__getstate__())
    bos = SP_SPECIALS[1]
    cfg["post_processor"] = json.loads(processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, 1)],
    ).__getstate__())
    added = {a["content"]: a["id"] for a in cfg["added_tokens"]}
    if added != {p: i for i, p in enumerate(SP_SPECIALS)}:
        raise AssertionError(f"unexpected added tokens after training: {added}")
    tok = Tokenizer.from_str(json.dumps(cfg))  # validates the rewritten file
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": SP_SPECIALS[0],
        "bos_token": SP_SPECIALS[1],
        "eos_token": SP_SPECIALS[2],
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    return _write_tokenizer_dir(Path(out_dir), tok.to_str(pretty=True), config)


def sp_alphabet(texts: list[str], size: int) -> list[str]:
    """``▁`` and the ``size - 1`` most frequent other characters of the texts, ties broken by character.

    The trainer's own ``limit_alphabet`` breaks ties between equally rare characters in hash-map order,
    which changes from process to process; passing exactly these as ``initial_alphabet`` (with
    ``limit_alphabet=size``) keeps training deterministic.
    """
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(text)
    counts.pop(" ", None)
    counts.pop(SP_SPACE, None)
    # "▁" always: through byte fallback a space would come out as the three bytes of "▁", not as b" ".
    return [SP_SPACE, *(c for c, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[: size - 1])]


def _sp_vocab(trained: dict[str, int]) -> dict[str, int]:
    """Specials, then the 256 byte pieces, then the trained pieces in their trained order (merges name
    pieces by string, so they stay valid)."""
    rest = [p for p, _ in sorted(trained.items(), key=lambda kv: kv[1]) if p not in SP_SPECIALS]
    clash = sorted(set(rest) & set(SP_BYTE_PIECES))
    if clash:  # the texts spell "<0xNN>" often enough to learn it; it would decode as one byte
        raise ValueError(f"the training texts made learned pieces that collide with byte pieces: {clash}")
    order = [*SP_SPECIALS, *SP_BYTE_PIECES, *rest]
    return {p: i for i, p in enumerate(order)}


def _write_tokenizer_dir(out_dir: Path, tokenizer_json: str, config: dict) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` into ``<out_dir>.partial`` (a leftover one is
    removed first), then replace ``out_dir`` with it. ``out_dir`` is never half-written; an existing one
    is removed just before the rename."""
    partial = out_dir.with_name(out_dir.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    (partial / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
    (partial / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    commit_directory(partial, out_dir)
    return out_dir
