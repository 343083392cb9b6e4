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
from fusion_jax.tokenizers import TokenizationError, load_tokenizer
from tiny_tokenizers import CODE_CORPUS, CORPUS, train_byte_level, train_sentencepiece


@pytest.fixture(scope="module")
def bl(tmp_path_factory):
    return load_tokenizer(train_byte_level(tmp_path_factory.mktemp("bl") / "tokenizer.json"))


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("sp")))


WHITESPACE_RUNS = [" " * n for n in range(24, 1, -1)]  # GPT-NeoX-20B's added tokens 50254–50276, in its order


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A byte-level BPE trained on indented code (so it has ``ĠĠ``… pieces) plus GPT-NeoX-style added non-special
    whitespace-run tokens at the end of its vocabulary: the same bytes under two ids, the added one emitted."""
    path = train_byte_level(tmp_path_factory.mktemp("ws") / "tokenizer.json", corpus=CORPUS + CODE_CORPUS,
                            vocab_size=400, added_tokens=WHITESPACE_RUNS)
    return load_tokenizer(path)


def _is_byte_piece(tok, i):
    return tok.kind != "byte_level" and re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", tok.pieces[i]) is not None


def naive_map(src, tgt, accept):
    """For every source id scan every target id; best = longest accepted bytes, then a non-special added token, then
    a regular piece (not byte fallback), then the lowest id."""
    out = []
    for i, b in enumerate(src.token_bytes):
        best = None
        if not src.special[i]:
            for j, c in enumerate(tgt.token_bytes):
                if tgt.special[j] or not c or not accept(b, c):
                    continue
                key = (-len(c), not tgt.added[j], _is_byte_piece(tgt, j), j)
                best = key if best is None or key < best else best
        out.append(-1 if best is None else best[-1])
    if src.eos_id is not None and tgt.eos_id is not None:
        out[src.eos_id] = tgt.eos_id  # end of document predicts end of document
    return np.array(out, np.int32)


@pytest.mark.parametrize("direction", ["bl->sp", "sp->bl", "ws->sp", "bl->ws", "ws->ws"])
def test_prefix_and_exact_match_naive(bl, sp, ws, direction):
    tokens = {"bl": bl, "sp": sp, "ws": ws}
    src, tgt = (tokens[name] for name in direction.split("->"))
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
    assert not list(tmp_path.rglob("*.partial")) and not list(tmp_path.rglob(".*.tmp"))  # no temp file left
    assert other.shape == (sp.vocab_size,)


def test_cache_of_an_older_format_is_rebuilt(ws, tmp_path, caplog):
    """prefix/exact maps of format 1 chose BPE pieces over added tokens: such a cached map is rebuilt, not used."""
    fresh = vocab_map(ws, ws, "prefix", cache_dir=tmp_path)
    path = cache_path(ws, ws, "prefix", tmp_path)
    stale = np.where(np.isin(np.arange(ws.vocab_size), np.flatnonzero(ws.added)), 0, fresh).astype(np.int32)
    np.savez(path, map=stale, method="prefix", src_fingerprint=ws.fingerprint, tgt_fingerprint=ws.fingerprint,
             version="1")
    with caplog.at_level(logging.WARNING):
        np.testing.assert_array_equal(vocab_map(ws, ws, "prefix", cache_dir=tmp_path), fresh)
    assert "version do not match" in caplog.text


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


# ------------------------------------------------------------------------------------------ a tokenizer onto itself

# Text with what makes several ids share bytes matter: indentation and other whitespace runs (GPT-NeoX's added
# tokens), tabs, newlines, byte-fallback material (emoji, CJK), digits.
SELF_MAP_TEXTS = [
    "def f(x):\n    if x:\n        return [x,  x]\n    return   None\n",
    "class A:\n    def g(self):\n        for i in range(3):\n            if i:\n                print(i)\n",
    "x" + "".join(" " * n + "y" for n in range(1, 40)) + "\n",
    "\ttabs\t\tand\t\t\ttabs\n\n\n  \n   \r\n",
    "café naïve résumé — 中文字符 日本語 😀👍🏽 digits 1234567890 3.14159",
    "The quick brown fox jumps over the lazy dog. <|endoftext|> </s>",
]
_EMITTED: dict[str, set[int]] = {}


def emitted_ids(tok) -> set[int]:
    """The ids ``tok`` emits, found by encoding: every id that ``tok.encode`` returns for SELF_MAP_TEXTS or for the
    text of any single token (and, with a dummy prefix, that text without its leading space, which the prefix puts
    back). So regular pieces and non-special added tokens, and a byte-fallback or model piece only where the encoder
    really produces it (never one shadowed by another id with the same bytes); never a special token, since a
    special's spelling in a document is plain text. Tokens whose bytes are not valid UTF-8 alone (part of a
    character) are reached through the texts only; texts the tokenizer cannot reproduce are skipped."""
    if tok.fingerprint not in _EMITTED:
        texts = list(SELF_MAP_TEXTS)
        for b in tok.token_bytes:
            try:
                text = b.decode("utf-8")
            except UnicodeDecodeError:
                continue
            texts.append(text)
            if tok.dummy_prefix and text.startswith(" "):
                texts.append(text[1:])
        seen: set[int] = set()
        for text in texts:
            if not text:
                continue
            try:
                seen.update(tok.encode(text).ids.tolist())
            except TokenizationError:
                continue
        _EMITTED[tok.fingerprint] = seen
    return _EMITTED[tok.fingerprint]


def _assert_self_map_identity(tok, method):
    m = vocab_map(tok, tok, method, use_cache=False)
    emitted = np.array(sorted(emitted_ids(tok)))
    assert len(emitted) > 0.5 * (~tok.special).sum()
    wrong = emitted[m[emitted] != emitted]
    assert not wrong.size, f"{tok.name} {method}: " + ", ".join(
        f"{tok.pieces[i]!r} (id {i}) → {tok.pieces[m[i]]!r} (id {m[i]})" for i in wrong[:10])


@pytest.mark.parametrize("method", ["prefix", "exact"])
def test_tiny_self_map_is_identity_on_emitted_ids(ws, method):
    runs = [i for i in range(ws.vocab_size) if ws.added[i]]
    assert [ws.token_bytes[i] for i in runs] == [r.encode() for r in WHITESPACE_RUNS]
    shadowed = [i for i in range(ws.vocab_size) if not ws.added[i] and ws.token_bytes[i].strip(b" ") == b""
                and len(ws.token_bytes[i]) >= 2]
    assert shadowed and all(i < min(runs) for i in shadowed)  # BPE pieces with the runs' bytes, at lower ids
    assert set(runs) <= emitted_ids(ws) and not set(shadowed) & emitted_ids(ws)
    _assert_self_map_identity(ws, method)


REAL_TOKENIZERS = ["llama2-tokenizer.model", "mistral-v1-tokenizer.model", "gpt-neox-20b-tokenizer.json",
                   "qwen2-tokenizer.json"]


@pytest.fixture(scope="module", params=REAL_TOKENIZERS)
def real_tok(request, shared_dir):
    path = shared_dir / "assets" / "tokenizers" / request.param
    if not path.is_file():
        pytest.skip(f"missing real tokenizer {path}")
    return load_tokenizer(path)


@pytest.mark.parametrize("method", ["prefix", "exact"])
def test_real_self_map_is_identity_on_emitted_ids(real_tok, method):
    if "neox" in real_tok.name:
        runs = list(range(50254, 50277))  # the 23 whitespace-run added tokens, emitted instead of BPE `ĠĠ`…
        assert set(runs) <= emitted_ids(real_tok)
    _assert_self_map_identity(real_tok, method)
