"""Vocabulary maps: `exact` and `prefix` against naive references, real-tokenizer spot checks, the disk cache.

The official MinED map is checked against the golden map in test_align_fusellm.py.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import pytest

from fusion_jax.align import vocab
from fusion_jax.align.vocab import cache_path, exact_map, prefix_map, vocab_map
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece


@pytest.fixture(scope="module")
def bl(tmp_path_factory):
    return load_tokenizer(train_byte_level(tmp_path_factory.mktemp("bl") / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("sp")))


def _is_byte_piece(tok, i):
    return tok.kind != "byte_level" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok.pieces[i]) is not None


def naive_map(src, tgt, accept):
    """For every source id scan every target id; best = longest accepted bytes, then regular piece, then lowest id."""
    out = []
    for i, b in enumerate(src.token_bytes):
        best = None
        if not src.special[i]:
            for j, c in enumerate(tgt.token_bytes):
                if tgt.special[j] or not c or not accept(b, c):
                    continue
                key = (-len(c), _is_byte_piece(tgt, j), j)
                best = key if best is None or key < best else best
        out.append(-1 if best is None else best[2])
    if src.eos_id is not None and tgt.eos_id is not None:
        out[src.eos_id] = tgt.eos_id  # end of document predicts end of document
    return np.array(out, np.int32)


@pytest.mark.parametrize("direction", ["bl->sp", "sp->bl"])
def test_prefix_and_exact_match_naive(bl, sp, direction):
    src, tgt = (bl, sp) if direction == "bl->sp" else (sp, bl)
    np.testing.assert_array_equal(prefix_map(src, tgt), naive_map(src, tgt, lambda b, c: b.startswith(c)))
    np.testing.assert_array_equal(exact_map(src, tgt), naive_map(src, tgt, lambda b, c: b == c))


def test_self_map_is_identity_on_regular_tokens(bl, sp):
    for tok in (bl, sp):
        m = prefix_map(tok, tok)
        regular = np.flatnonzero(~tok.special)
        # Byte-fallback pieces whose byte also has a regular piece map to that regular piece (what encode produces).
        same_bytes = np.array([tok.token_bytes[m[i]] == tok.token_bytes[i] for i in regular])
        assert same_bytes.all()
        expected = np.array([not _is_byte_piece(tok, i) or m[i] == i for i in regular])
        assert (m[regular][expected] == regular[expected]).all()
        assert m[tok.eos_id] == tok.eos_id
        others = tok.special.copy()
        others[tok.eos_id] = False
        assert (m[others] == -1).all()


def test_cache_roundtrip_and_rebuild(bl, sp, tmp_path, monkeypatch, caplog):
    first = vocab_map(bl, sp, "prefix", cache_dir=tmp_path)
    path = cache_path(bl, sp, "prefix", tmp_path)
    assert path.is_file() and bl.fingerprint[:16] in path.name and sp.fingerprint[:16] in path.name

    def boom(*_):
        raise AssertionError("rebuilt although the cache is valid")

    monkeypatch.setitem(vocab._BUILDERS, "prefix", boom)
    np.testing.assert_array_equal(vocab_map(bl, sp, "prefix", cache_dir=tmp_path), first)
    monkeypatch.undo()

    path.write_bytes(path.read_bytes()[:40])  # truncated by a crash of some other writer
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(vocab_map(bl, sp, "prefix", cache_dir=tmp_path), first)
    assert "unreadable" in caplog.text and "rebuilding" in caplog.text

    # A map stored for other tokenizers under this name (e.g. a hand-copied file) is not trusted.
    other = vocab_map(sp, bl, "prefix", cache_dir=tmp_path)
    cache_path(sp, bl, "prefix", tmp_path).replace(path)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(vocab_map(bl, sp, "prefix", cache_dir=tmp_path), first)
    assert "src_fingerprint, tgt_fingerprint do not match" in caplog.text
    assert not list(tmp_path.rglob("*.partial"))
    assert other.shape == (sp.vocab_size,)


def test_unknown_method(bl, sp):
    with pytest.raises(ValueError, match=r"one of \('prefix', 'exact', 'mined', 'identity'\)"):
        vocab_map(bl, sp, "fuzzy", use_cache=False)


# ------------------------------------------------------------------------------------------ real tokenizers


@pytest.fixture(scope="module")
def llama_neox(shared_dir):
    d = shared_dir / "assets" / "tokenizers"
    return load_tokenizer(d / "llama2-tokenizer.model"), load_tokenizer(d / "gpt-neox-20b-tokenizer.json")


def _piece_id(tok, piece):
    return tok.pieces.index(piece)


def test_real_prefix_map_examples(llama_neox):
    llama, neox = llama_neox
    m = prefix_map(neox, llama)
    cases = {
        "ĠHello": "▁Hello",      # same bytes, different spelling
        "Ċ": "<0x0A>",           # newline: the byte-fallback piece is the only Llama token for it
        "ĊĊ": "<0x0A>",          # a run of newlines starts with one newline
        "Ã©": "é",               # GPT-2 byte-level é = Llama's é (MinED gives 'Ã')
    }
    for src_piece, tgt_piece in cases.items():
        got = llama.pieces[m[_piece_id(neox, src_piece)]]
        assert got == tgt_piece, (src_piece, got)
    assert llama.pieces[m[_piece_id(neox, "<|endoftext|>")]] == "</s>"  # EOS → EOS (MinED: `Context`)
    assert m[_piece_id(neox, "<|padding|>")] == -1  # other specials have no bytes: nothing to predict
    # Every mapped target token is a byte prefix of its source token.
    for i in np.flatnonzero(m >= 0)[::97]:
        assert neox.token_bytes[i].startswith(llama.token_bytes[m[i]])
    exact = exact_map(neox, llama)
    share = (exact >= 0).mean()
    assert 0.3 < share < 0.9  # most GPT-NeoX words exist in Llama-2 by bytes, not all
    assert (prefix_map(neox, llama) >= 0).sum() > (exact >= 0).sum()


def test_identity_map_only_for_the_same_tokenizer(bl, sp):
    np.testing.assert_array_equal(vocab_map(sp, sp, "identity", use_cache=False), np.arange(sp.vocab_size))
    with pytest.raises(ValueError, match="needs the same tokenizer"):
        vocab_map(bl, sp, "identity", use_cache=False)
