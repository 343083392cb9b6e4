"""The tokenizer rebuilt from a GGUF file's metadata (fusion_jax.tokenizers.gguf).

Tiny GGUF files are written (tests/tiny_gguf.py) with gguf.GGUFWriter, carrying the vocabulary of a tokenizer trained in the test
(a byte-level BPE → ``gpt2`` type, a SentencePiece BPE → ``llama`` type) the way llama.cpp's convert script writes
them; the rebuilt tokenizer must give the original tokenizer's ids and transformers' GGUF loader's ids.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import pytest

from fusion_jax.errors import CheckpointError
from fusion_jax.tokenizers import load_tokenizer
from fusion_jax.tokenizers.gguf import NORMAL, load_gguf_tokenizer, read_vocab, write_tokenizer
from tiny_gguf import gpt2_gguf as _gpt2_gguf, llama_gguf as _llama_gguf, write_tokenizer_gguf as _write_gguf

TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "def f(x):\n    if x:\n        return [x,  x]\n    return  None\n",
    "tabs\tand\t\tnewlines\n\n\nend   ",
    "café naïve résumé — déjà vu; 日本語 🎉 ﬁ",
    "numbers 0123456789, 3.14159 and 1,000,000",
    "it's we'll they've I'M",
    "literal </s> and <|endoftext|> in a document",
    "x" + " " * 17 + "y",
    "\r\n\u00a0\u2003mixed whitespace",
]
LEADING = ["  leading spaces", " x"]  # SentencePiece prepends "▁" even here; transformers' Metaspace does not


def _transformers(path: Path):
    pytest.importorskip("torch")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)


def _ref_ids(ref, text: str) -> list[int]:
    return ref(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@pytest.mark.parametrize("pre,digits", [("gpt-2", False), ("smollm", True)])
def test_gpt2_vocab_matches_original_and_transformers(tmp_path, pre, digits):
    path, orig = _gpt2_gguf(tmp_path, pre, digits)
    ours = load_tokenizer(write_tokenizer(path, tmp_path / "out").parent)
    assert ours.kind == "byte_level" and ours.vocab_size == orig.get_vocab_size()
    assert ours.eos_id == orig.token_to_id("<|endoftext|>") and ours.special[ours.eos_id]
    ref = _transformers(path)
    for text in TEXTS + LEADING:
        ids = ours.encode(text).ids.tolist()
        assert ids == orig.encode(text, add_special_tokens=False).ids, text
        # transformers ignores tokenizer.ggml.pre "smollm" (digits one by one) and applies the digit merges
        if not (digits and any(c.isdigit() for c in text)):
            assert ids == _ref_ids(ref, text), text
    assert ref.eos_token_id == ours.eos_id


def test_llama_vocab_matches_sentencepiece_and_transformers(tmp_path):
    path, sp = _llama_gguf(tmp_path)
    ours = load_tokenizer(write_tokenizer(path, tmp_path / "out").parent)
    assert ours.kind == "metaspace" and ours.dummy_prefix and ours.vocab_size == sp.get_piece_size()
    assert ours.eos_id == sp.eos_id() and ours.special[ours.eos_id]
    ref = _transformers(path)
    for text in TEXTS + LEADING:
        ids = ours.encode(text).ids.tolist()
        assert ids == sp.encode(text), text
        if text not in LEADING:
            assert ids == _ref_ids(ref, text), text
    assert "日" not in ours.pieces  # unseen characters go through byte fallback, as SentencePiece does
    assert ref.eos_token_id == ours.eos_id


def test_special_tokens_are_whole_in_the_rebuilt_file(tmp_path):
    """The tokenizer.json itself (what HF users load) keeps control tokens whole, as transformers and llama.cpp do;
    for a llama-type vocabulary the text after a control token gets the dummy prefix again, as in llama.cpp
    (transformers' Metaspace prepends it only at the start)."""
    from tokenizers import Tokenizer

    path, orig = _gpt2_gguf(tmp_path)
    tok = Tokenizer.from_file(str(write_tokenizer(path, tmp_path / "bpe_out")))
    text = "<|endoftext|>hello world<|endoftext|>"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == _transformers(path)(text, add_special_tokens=False)["input_ids"]
    eos = orig.token_to_id("<|endoftext|>")
    assert ids == [eos, *orig.encode("hello world").ids, eos]

    path, sp = _llama_gguf(tmp_path)
    tok = Tokenizer.from_file(str(write_tokenizer(path, tmp_path / "sp_out")))
    assert tok.encode("<s>hello</s>", add_special_tokens=False).ids == [sp.bos_id(), *sp.encode("hello"), sp.eos_id()]
    assert tok.encode("hi").ids == [sp.bos_id(), *sp.encode("hi")]  # llama type: add_bos_token defaults on
    cfg = json.loads((tmp_path / "sp_out" / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["unk_token"]) == ("<s>", "</s>", "<unk>")


def test_load_gguf_tokenizer_and_fingerprint(tmp_path):
    path, _ = _gpt2_gguf(tmp_path)
    tok = load_gguf_tokenizer(path)
    assert tok.name == "bpe"
    assert tok.fingerprint == load_tokenizer(write_tokenizer(path, tmp_path / "out")).fingerprint


def test_errors_name_the_problem(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(CheckpointError, match="cannot be read as a GGUF"):
        read_vocab(bad)
    with pytest.raises(CheckpointError, match="no such GGUF"):
        read_vocab(tmp_path / "missing.gguf")
    w = gguf.GGUFWriter(str(tmp_path / "none.gguf"), "llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(CheckpointError, match="carries no tokenizer"):
        read_vocab(tmp_path / "none.gguf")
    path = _write_gguf(tmp_path / "bert.gguf", "bert", ["a"], [NORMAL])
    with pytest.raises(CheckpointError, match="'bert' is not supported; supported: gpt2, llama"):
        read_vocab(path)
    path = _write_gguf(tmp_path / "pre.gguf", "gpt2", ["a", "b", "ab"], [NORMAL] * 3, merges=["a b"], pre="martian")
    with pytest.raises(CheckpointError, match="tokenizer.ggml.pre 'martian'"):
        write_tokenizer(path, tmp_path / "out")
