"""Tokenizer adapter: exact token bytes, byte_end encodings, verification errors, fingerprints.

The core suite trains tiny tokenizers in tmp dirs (no shared assets needed); the ``shared_dir`` tests
run the real Llama-2 / Mistral (SentencePiece, byte fallback) and GPT-NeoX / Qwen2 (byte-level BPE).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fusion_jax.errors import ConfigError
from fusion_jax.tokenizers import Encoding, TokenizationError, VocabSizeError, bytes_to_unicode, check_vocab_size, load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

SAMPLES = [
    "hello world",
    "Hello  world\n\n  indented\tTab",
    "café 😀 中文 123",
    "  leading spaces",
    "trailing spaces   ",
    "x",
    " ",
    "\n",
    "ünïcödé ﬁ ligature stays",
    "literal <|endoftext|> in a document",
]


def assert_reproduces(tok, text: str) -> Encoding:
    """Shape/dtype contract plus: the byte spans tile the text and each token's bytes are its span."""
    enc = tok.encode(text)
    data = text.encode("utf-8")
    assert enc.ids.dtype == np.int32 and enc.byte_end.dtype == np.int32
    assert enc.ids.shape == enc.byte_end.shape
    if not data:
        assert enc.ids.size == 0
        return enc
    assert np.all(np.diff(enc.byte_end) >= 0)
    assert enc.byte_end[0] >= 0 and enc.byte_end[-1] == len(data)
    starts = np.concatenate([[0], enc.byte_end[:-1]])
    for k, (i, s, e) in enumerate(zip(enc.ids, starts, enc.byte_end)):
        tb = tok.token_bytes[i]
        span = data[s:e]
        if k == 0 and tok.dummy_prefix and len(tb) == len(span) + 1:
            assert tb == b" " + span  # the dummy prefix space is not in the text
        else:
            assert tb == span, (k, i, tb, span)
    return enc


# ---------------------------------------------------------------------------------------------- tiny ones


@pytest.fixture(scope="module")
def bl_path(tmp_path_factory) -> Path:
    return train_byte_level(tmp_path_factory.mktemp("bl") / "tokenizer.json")


@pytest.fixture(scope="module")
def sp_path(tmp_path_factory) -> Path:
    return train_sentencepiece(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def bl(bl_path):
    return load_tokenizer(bl_path)


@pytest.fixture(scope="module")
def sp(sp_path):
    return load_tokenizer(sp_path)


def test_bytes_to_unicode_is_gpt2_map():
    m = bytes_to_unicode()
    assert len(m) == 256 and len(set(m.values())) == 256
    assert m[ord(" ")] == "Ġ" and m[ord("\n")] == "Ċ" and m[ord("a")] == "a"
    assert "".join(m[b] for b in "é".encode()) == "Ã©"


def test_byte_level_token_bytes(bl, bl_path):
    from tokenizers import Tokenizer as HFTok

    assert bl.kind == "byte_level" and not bl.dummy_prefix
    assert bl.vocab_size == len(bl.token_bytes) == bl.special.shape[0]
    hf = HFTok.from_file(str(bl_path))
    eot_id = hf.token_to_id("<|endoftext|>")
    assert bl.special[eot_id] and bl.token_bytes[eot_id] == b""
    assert bl.token_bytes[hf.token_to_id("Ġ")] == b" "
    assert bl.token_bytes[hf.token_to_id("Ċ")] == b"\n"
    assert bl.special.sum() == 1
    # every single byte is a token (initial alphabet)
    assert {b for b in bl.token_bytes if len(b) == 1} == {bytes([i]) for i in range(256)}


def test_sentencepiece_token_bytes(sp, sp_path):
    import sentencepiece as spm

    proc = spm.SentencePieceProcessor(model_file=str(sp_path))
    assert sp.kind == "sentencepiece" and sp.dummy_prefix
    assert sp.vocab_size == proc.get_piece_size()
    for name in ["<unk>", "<s>", "</s>"]:
        i = proc.piece_to_id(name)
        assert sp.special[i] and sp.token_bytes[i] == b""
    assert sp.token_bytes[proc.piece_to_id("<0x0A>")] == b"\n"
    assert sp.token_bytes[proc.piece_to_id("<0xFF>")] == b"\xff"
    assert sp.token_bytes[proc.piece_to_id("▁the")] == b" the"
    assert sp.special.sum() == 3


@pytest.mark.parametrize("text", SAMPLES)
@pytest.mark.parametrize("which", ["bl", "sp"])
def test_tiny_tokenizers_reproduce_text(request, which, text):
    tok = request.getfixturevalue(which)
    enc = assert_reproduces(tok, text)
    raw = tok.decode_bytes(enc.ids)
    assert raw == (b" " + text.encode() if tok.dummy_prefix and raw != text.encode() else text.encode())


def test_dummy_prefix_is_dropped_from_first_span(sp):
    enc = sp.encode("the")
    assert sp.token_bytes[enc.ids[0]].startswith(b" ")
    assert enc.byte_end[-1] == 3
    enc = sp.encode(" the")  # sentencepiece still prepends: "▁▁the"; spans stay relative to the text
    assert enc.byte_end[-1] == 4 and sp.decode_bytes(enc.ids) == b"  the"
    enc = sp.encode("\n")  # first token is a bare "▁" → empty span
    assert sp.token_bytes[enc.ids[0]] == b" " and enc.byte_end[0] == 0 and enc.byte_end[-1] == 1


def test_bytes_input_and_empty_document(bl, sp):
    for tok in (bl, sp):
        a, b = tok.encode("café"), tok.encode("café".encode())
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.byte_end, b.byte_end)
        for empty in ("", b""):
            enc = tok.encode(empty)
            assert enc.ids.shape == (0,) and enc.byte_end.shape == (0,)
            assert enc.ids.dtype == np.int32 and enc.byte_end.dtype == np.int32


@pytest.mark.parametrize(
    "data, offset", [(b"ab\xffcd", 2), (b"caf\xc3", 3), (b"\xe4\xb8", 0), (b"ok \xed\xa0\x80", 3)]
)
def test_invalid_utf8_names_byte_offset(bl, sp, data, offset):
    for tok in (bl, sp):
        with pytest.raises(TokenizationError, match=rf"not valid UTF-8: byte offset {offset}\b"):
            tok.encode(data)


def test_lone_surrogate_in_str_names_byte_offset(bl):
    with pytest.raises(TokenizationError, match=r"byte offset 5\b.*surrogate"):
        bl.encode("café\ud800x")  # the surrogate is char 4 but byte 5 ("é" is 2 bytes)
    with pytest.raises(TokenizationError, match=r"byte offset 2\b"):
        bl.encode("ab\udcff")


def test_special_tokens_own_empty_spans(bl):
    eot = next(i for i in range(bl.vocab_size) if bl.special[i])
    # a backend that wraps documents in special tokens (e.g. BOS/EOS inserted in the middle of a stream)
    wrapped = dataclasses.replace(bl, _encode_ids=lambda t: [eot, *bl._encode_ids(t), eot])
    text = "hello world"
    enc = wrapped.encode(text)
    assert enc.ids[0] == eot and enc.ids[-1] == eot
    assert enc.byte_end[0] == 0 and enc.byte_end[-1] == enc.byte_end[-2] == len(text)
    assert np.array_equal(enc.byte_end[1:-1], bl.encode(text).byte_end)


def test_special_token_text_is_plain_text(bl):
    enc = assert_reproduces(bl, "a<|endoftext|>b")
    assert not bl.special[enc.ids].any()


def test_mismatch_names_position_and_token(tmp_path):
    from tokenizers import normalizers

    path = train_byte_level(tmp_path / "nfkc.json", normalizer=normalizers.NFKC())
    tok = load_tokenizer(path)
    assert_reproduces(tok, "plain ascii is fine")
    with pytest.raises(TokenizationError, match=r"byte offset 3\b.*token #\d+, id \d+") as e:
        tok.encode("ab ﬁne")  # NFKC turns U+FB01 into "fi"
    assert "\\xef\\xac\\x81" in str(e.value)


def test_unknown_token_is_a_mismatch(tmp_path):
    tok = load_tokenizer(train_sentencepiece(tmp_path / "nofb", byte_fallback=False, vocab_size=80))
    assert_reproduces(tok, "the dog")
    with pytest.raises(TokenizationError, match=r"byte offset 4\b.*<special id 0>"):
        tok.encode("the 😀 dog")  # no byte fallback → <unk>, which owns no bytes


def test_eos_from_model_or_tokenizer_config(tmp_path, bl_path, bl, sp):
    assert sp.pieces[sp.eos_id] == "</s>"  # the SentencePiece model's eos_id
    assert bl.pieces[bl.eos_id] == "<|endoftext|>"  # a special token spelled like an EOS
    d = tmp_path / "with_config"
    d.mkdir()
    (d / "tokenizer.json").write_bytes(bl_path.read_bytes())
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "the"}}))
    tok = load_tokenizer(d)
    assert tok.pieces[tok.eos_id] == "the" and tok.fingerprint != bl.fingerprint


@pytest.mark.parametrize("text", ["Hello world", "café 日本語\n", ""])
def test_encode_with_eos_appends_an_empty_span_at_the_end(bl, sp, text):
    for tok in (bl, sp):
        plain, enc = tok.encode(text), tok.encode(text, eos=True)
        end = plain.byte_end[-1] if len(plain.byte_end) else 0
        assert end == len(text.encode())
        np.testing.assert_array_equal(enc.ids, np.append(plain.ids, np.int32(tok.eos_id)).astype(np.int32))
        np.testing.assert_array_equal(enc.byte_end, np.append(plain.byte_end, np.int32(end)).astype(np.int32))
        assert enc.ids.dtype == enc.byte_end.dtype == np.int32
        assert tok.with_eos(plain).ids.tolist() == enc.ids.tolist()


def test_encode_with_eos_needs_an_eos_token(bl):
    tok = dataclasses.replace(bl, eos_id=None)
    assert len(tok.encode("Hello").ids) == len(bl.encode("Hello").ids)  # eos=False does not need one
    with pytest.raises(ConfigError, match="has no EOS token"):
        tok.encode("Hello", eos=True)


DEEPSEEK_SPECIALS = ["<\uff5cbegin\u2581of\u2581sentence\uff5c>", "<\uff5cend\u2581of\u2581sentence\uff5c>",
                     "<\uff5c\u2581pad\u2581\uff5c>"]


def deepseek_v3_like(bl_path: Path, out: Path) -> Path:
    """A tokenizer.json shaped like DeepSeek-V3's, from the tiny byte-level BPE: its specials at ids 0–2 of
    ``model.vocab`` *and* in ``added_tokens`` (their ``｜``/``▁`` are no GPT-2 byte-level characters), a digit
    ``Split`` before ``ByteLevel`` in a pre-tokenizer ``Sequence``, and a non-special added token (``<think>``) that is
    in ``model.vocab`` too."""
    cfg = json.loads(bl_path.read_text().replace("<|endoftext|>", "<|unused|>"))  # EOS: DeepSeek's own
    n = len(DEEPSEEK_SPECIALS)
    shifted = {piece: i + n for piece, i in cfg["model"]["vocab"].items()}
    think = len(shifted) + n
    cfg["model"]["vocab"] = {**{p: i for i, p in enumerate(DEEPSEEK_SPECIALS)}, **shifted, "<think>": think}
    flags = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    cfg["added_tokens"] = (
        [{"id": i, "content": p, **flags, "special": True} for i, p in enumerate(DEEPSEEK_SPECIALS)]
        + [{**a, "id": a["id"] + n} for a in cfg["added_tokens"]]
        + [{"id": think, "content": "<think>", **flags, "special": False}]
    )
    cfg["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "\\p{N}{1,3}"}, "behavior": "Isolated", "invert": False},
        {**cfg["pre_tokenizer"], "use_regex": True},
    ]}
    out.write_text(json.dumps(cfg, ensure_ascii=False), encoding="utf-8")
    return out


def test_added_marks_tokens_matched_before_the_model(tmp_path, bl, sp):
    """``Tokenizer.added``: non-special added tokens (HF) and user-defined pieces (SentencePiece), which the backend
    cuts out of the text before its model runs; nothing else."""
    assert not bl.added.any() and not sp.added.any()
    tok = load_tokenizer(train_sentencepiece(tmp_path / "uds", user_defined_symbols=["<tab>", "\t\t"]))
    ids = [i for i in range(tok.vocab_size) if tok.added[i]]
    assert [tok.token_bytes[i] for i in ids] == [b"<tab>", b"\t\t"] and not tok.special[ids].any()
    enc = assert_reproduces(tok, "a<tab>b\t\tc")
    assert set(ids) <= set(enc.ids.tolist())
    hf = load_tokenizer(train_byte_level(tmp_path / "ws.json", added_tokens=["  ", "   "]))
    assert [hf.token_bytes[i] for i in np.flatnonzero(hf.added)] == [b"  ", b"   "]
    assert hf.encode("a   b").ids.tolist()[1] == np.flatnonzero(hf.added)[1]


def test_specials_also_in_the_bpe_vocab_load(tmp_path, bl_path, bl):
    """DeepSeek-V3 shape: added/special tokens are marked before model pieces are converted to bytes, so a special
    spelled with characters that have no byte-level meaning loads (as in the ``tokenizers`` library)."""
    from tokenizers import Tokenizer as HFTok

    path = deepseek_v3_like(bl_path, tmp_path / "tokenizer.json")
    hf = HFTok.from_file(str(path))
    hf.encode_special_tokens = True  # as load_tokenizer: special spellings in a document are text
    assert [hf.token_to_id(p) for p in DEEPSEEK_SPECIALS] == [0, 1, 2]
    tok = load_tokenizer(path)
    n = len(DEEPSEEK_SPECIALS)
    assert tok.vocab_size == bl.vocab_size + n + 1 and tok.kind == "byte_level"
    assert tok.pieces[:n] == DEEPSEEK_SPECIALS and tok.special[:n].all()
    assert tok.token_bytes[:n] == [b""] * n and not tok.added[:n].any()
    assert tok.eos_id == 1  # spelled like an EOS (`<｜end▁of▁sentence｜>`)
    # every other id keeps the bytes of the tokenizer it was built from (its ids shifted by the specials)
    assert tok.token_bytes[n:n + bl.vocab_size] == bl.token_bytes
    np.testing.assert_array_equal(tok.special[n:n + bl.vocab_size], bl.special)
    think = tok.vocab_size - 1
    assert tok.token_bytes[think] == b"<think>" and tok.added[think] and not tok.special[think]
    texts = [*SAMPLES, "".join(DEEPSEEK_SPECIALS) + " after 12345 digits", "a <think> b<think>c"]
    for text in texts:
        enc = assert_reproduces(tok, text)
        assert enc.ids.tolist() == hf.encode(text, add_special_tokens=False).ids
    assert tok.encode("<think>").ids.tolist() == [think]
    assert not tok.special[tok.encode(DEEPSEEK_SPECIALS[0]).ids].any()  # a special's spelling in text is text


@pytest.mark.parametrize("name, content", [("bad.json", b'{"model": '), ("bad.model", b"not a protobuf"),
                                           ("other.json", b'{"hello": 1}')])
def test_unreadable_tokenizer_file_names_the_file(tmp_path, name, content):
    from fusion_jax.tokenizers import TokenizerFileError

    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(TokenizerFileError, match=rf"{name}: cannot be read as a"):
        load_tokenizer(path)


def test_load_directory_prefers_json(tmp_path, bl_path, sp_path, bl, sp):
    both = tmp_path / "both"
    both.mkdir()
    (both / "tokenizer.json").write_bytes(bl_path.read_bytes())
    (both / "tokenizer.model").write_bytes(sp_path.read_bytes())
    assert load_tokenizer(both).fingerprint == bl.fingerprint
    only = tmp_path / "only"
    only.mkdir()
    (only / "spiece.model").write_bytes(sp_path.read_bytes())
    assert load_tokenizer(only).fingerprint == sp.fingerprint
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "empty")


def test_fingerprint_stable_and_sensitive(tmp_path, bl_path, sp_path, bl, sp):
    assert load_tokenizer(bl_path).fingerprint == bl.fingerprint
    assert load_tokenizer(sp_path).fingerprint == sp.fingerprint
    assert bl.fingerprint != sp.fingerprint and len(bl.fingerprint) == 64
    # another process with another hash seed gives the same digests
    code = (
        "import sys; from fusion_jax.tokenizers import load_tokenizer as L; "
        "print(L(sys.argv[1]).fingerprint, L(sys.argv[2]).fingerprint)"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, str(bl_path), str(sp_path)], env=env, capture_output=True, text=True,
        check=True, cwd=Path(__file__).resolve().parents[1],
    ).stdout.split()
    assert out == [bl.fingerprint, sp.fingerprint]

    # change one vocab entry of the byte-level tokenizer → different fingerprint
    cfg = json.loads(bl_path.read_text())
    vocab = cfg["model"]["vocab"]
    victim = max(vocab, key=vocab.get)
    vocab["zzzz" if "zzzz" not in vocab else "qqqq"] = vocab.pop(victim)
    cfg["model"]["merges"] = [m for m in cfg["model"]["merges"]
                             if (m if isinstance(m, str) else "".join(m)).replace(" ", "") != victim]
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(cfg))
    assert load_tokenizer(changed).fingerprint != bl.fingerprint

    # flip a piece of the SentencePiece model → different fingerprint
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(sp_path.read_bytes())
    proto.pieces[-1].piece = "▁zzzzq"
    changed_sp = tmp_path / "changed.model"
    changed_sp.write_bytes(proto.SerializeToString())
    assert load_tokenizer(changed_sp).fingerprint != sp.fingerprint


def test_check_vocab_size(bl):
    V = bl.vocab_size
    check_vocab_size(bl, V, "target")
    check_vocab_size(bl, V + 100, "target")  # padded embedding (Qwen2-style): fine
    with pytest.raises(VocabSizeError, match=rf"target.*{V} ids.*vocab size is {V - 1}\b"):
        check_vocab_size(bl, V - 1, "target")


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=40))
@example("\u2581x")
def test_tiny_property(bl, sp, text):
    for tok in (bl, sp):
        first = _expected_failure_offset(tok, text)
        if first is not None:
            with pytest.raises(TokenizationError, match=rf"byte offset {first}\b"):
                tok.encode(text)
        else:
            assert_reproduces(tok, text)


# ---------------------------------------------------------------------------------------------- real ones

REAL = ["llama2-tokenizer.model", "mistral-v1-tokenizer.model", "gpt-neox-20b-tokenizer.json", "qwen2-tokenizer.json"]
_REAL_CACHE: dict[str, object] = {}


@pytest.fixture(scope="module", params=REAL)
def real(request, shared_dir):
    name = request.param
    if name not in _REAL_CACHE:
        path = shared_dir / "assets" / "tokenizers" / name
        if not path.is_file():
            pytest.skip(f"missing real tokenizer {path}")
        _REAL_CACHE[name] = load_tokenizer(path)
    return _REAL_CACHE[name]


REAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Para one.\n\nPara two.\n",
    "\tindented\twith\ttabs and    multiple   spaces  ",
    "café naïve résumé",
    "emoji 😀👍🏽 and family 👨‍👩‍👧",
    "中文字符和日本語のテキスト",
    "digits 1234567890 and 3.14159",
    "def f(x):\n    return x ** 2\n",
    " leading space",
    "<s> </s> <|endoftext|> <|im_start|>",
    "\r\n windows line endings\r\n",
]


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_real_reproduce_typical_text(real, text):
    assert_reproduces(real, text)


def test_real_known_tokens(real):
    tb = real.token_bytes
    if real.kind == "sentencepiece":  # Llama-2 and Mistral share the special/byte layout
        assert real.vocab_size == 32000 and real.dummy_prefix
        assert [tb[i] for i in (0, 1, 2)] == [b"", b"", b""] and real.special[:3].all()
        assert tb[3] == b"\x00" and tb[3 + 0x0A] == b"\n" and tb[3 + 0xFF] == b"\xff"
        enc = real.encode("Hello")
        assert len(enc.ids) == 1 and tb[enc.ids[0]] == b" Hello" and enc.byte_end.tolist() == [5]
    else:
        assert real.kind == "byte_level" and not real.dummy_prefix
        enc = real.encode(" hello\n")
        assert real.decode_bytes(enc.ids) == b" hello\n"
    check_vocab_size(real, real.vocab_size, real.name)
    eos = {"sentencepiece": "</s>", "byte_level": "<|endoftext|>" if "neox" in real.name else "<|im_end|>"}
    if real.kind == "byte_level" and "qwen" in real.name:
        assert real.pieces[real.eos_id] in ("<|endoftext|>", "<|im_end|>")
    else:
        assert real.pieces[real.eos_id] == eos[real.kind] and real.special[real.eos_id]


def test_real_vocab_sizes(shared_dir):
    tdir = shared_dir / "assets" / "tokenizers"
    qwen = load_tokenizer(tdir / "qwen2-tokenizer.json")
    assert qwen.vocab_size == 151936
    check_vocab_size(qwen, 151936, "qwen2")
    neox = load_tokenizer(tdir / "gpt-neox-20b-tokenizer.json")
    assert neox.vocab_size == 50281
    check_vocab_size(neox, 50432, "gpt-neox-20b")  # the model's padded embedding
    with pytest.raises(VocabSizeError, match=r"50281.*50277"):
        check_vocab_size(neox, 50277, "gpt-neox-20b")
    # whitespace-run added tokens carry their bytes
    assert neox.token_bytes[50276] == b"  " and not neox.special[50276]
    assert np.flatnonzero(neox.added).tolist() == list(range(50254, 50277))  # split out before the BPE runs
    assert neox.special[0] and neox.token_bytes[0] == b""


def _expected_failure_offset(tok, text: str) -> int | None:
    """Byte offset where a real tokenizer genuinely cannot reproduce ``text`` (None if it can).

    * GPT-NeoX-20B's tokenizer.json has an NFC normalizer: non-NFC text ("e" + U+0301, decomposed
      Hangul, ...) comes back composed, so the first byte that NFC changes is unreproducible.
    * SentencePiece (Llama-2, Mistral) uses U+2581 "▁" as its escaped space: a literal "▁" in the text
      is tokenized exactly like " ", so the first "▁" is unreproducible.
    Qwen2 (no normalizer) reproduces any text.
    """
    data = text.encode()
    if "neox" in tok.name and unicodedata.normalize("NFC", text) != text:
        nfc = unicodedata.normalize("NFC", text).encode()
        return next(i for i in range(min(len(data), len(nfc)) + 1) if data[i:i + 1] != nfc[i:i + 1])
    if tok.kind == "sentencepiece" and "\u2581" in text:
        return data.index("\u2581".encode())
    return None


@settings(max_examples=50, deadline=None)
@given(text=st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=60))
@example(text="\u2581")
@example(text=" a\u2581b")
@example(text="cafe\u0301 ok")
@example(text="\x00\x01\x7f\u200b\ufeff\U0010ffff")
def test_real_property(real, text):
    """Random Unicode reproduces exactly, or raises TokenizationError at the documented position."""
    first = _expected_failure_offset(real, text)
    if first is not None:
        with pytest.raises(TokenizationError, match=rf"byte offset {first}\b"):
            real.encode(text)
        return
    assert_reproduces(real, text)
