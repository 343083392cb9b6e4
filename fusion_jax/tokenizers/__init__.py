"""Tokenizer adapter: exact UTF-8 bytes per token id, byte-offset encodings, stable fingerprints.

Every tokenizer the fusion pipeline touches (targets and teachers) goes through this module, so that
the later stages can reason about *bytes* rather than about each library's string conventions:

* ``Tokenizer.token_bytes[i]`` is the exact UTF-8 byte string token ``i`` stands for in the text
  (SentencePiece ``▁`` → ``b" "``, ``<0xNN>`` byte-fallback pieces → that single byte, GPT-2 byte-level
  ``Ġ``/``Ċ``/``Ã©`` → the bytes they encode). Special/control/unknown tokens map to ``b""`` and are
  flagged in ``Tokenizer.special``.
* ``Tokenizer.encode(text)`` returns ``Encoding(ids int32[n], byte_end int32[n])``:
  ``byte_end[i]`` is the end offset, in ``text.encode("utf-8")``, of token ``i``; token ``i`` owns the
  contiguous span ``[byte_end[i-1], byte_end[i])`` (``byte_end[-1] == 0``), special tokens own empty
  spans. The spans are *derived from token bytes* and then verified: the tokens' bytes must concatenate
  to the text, otherwise :class:`TokenizationError` names the first differing byte offset and token.
* ``Tokenizer.fingerprint`` is a sha256 hex digest that is stable across runs and processes.

Backends: a HF ``tokenizer.json`` (loaded with the ``tokenizers`` library; byte-level BPE such as
GPT-NeoX/Qwen2, or SentencePiece-style ``Metaspace``/byte-fallback files), a SentencePiece ``.model``
(loaded with the ``sentencepiece`` library), or a GGUF model file, whose tokenizer is rebuilt from its metadata
as a ``tokenizer.json`` (:mod:`fusion_jax.tokenizers.gguf`).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Sequence

import numpy as np

from fusion_jax.errors import ConfigError, InputError
from fusion_jax.files import read_json

__all__ = [
    "Encoding",
    "Tokenizer",
    "TokenizationError",
    "TokenizerFileError",
    "VocabSizeError",
    "bytes_to_unicode",
    "check_vocab_size",
    "load_tokenizer",
]

# End-of-document spellings, for tokenizer.json files that come without a tokenizer_config.json.
EOS_PIECES: tuple[str, ...] = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|im_end|>", "<|eot_id|>",
                              "<｜end▁of▁sentence｜>")
_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SP_SPACE = "\u2581"  # "▁"


class TokenizationError(InputError):
    """The text cannot be tokenized so that the tokens' bytes reproduce it (or is not valid UTF-8)."""


class TokenizerFileError(InputError):
    """A file that cannot be read as a tokenizer."""


class VocabSizeError(InputError):
    """A tokenizer produces ids outside a model's embedding table."""


class Encoding(NamedTuple):
    """One tokenized document.

    ids:      int32[n]  token ids.
    byte_end: int32[n]  end offset of each token in the UTF-8 text; non-decreasing, last == len(bytes).
    """

    ids: np.ndarray
    byte_end: np.ndarray


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-unicode-char map (``0x20`` → ``Ġ``, ``0x0A`` → ``Ċ``)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    try:
        return bytes(_UNICODE_TO_BYTE[c] for c in token)
    except KeyError as e:
        raise ValueError(f"token {token!r} is not a byte-level (GPT-2) token: char {e.args[0]!r} has no byte") from None


def _sp_piece_bytes(piece: str) -> bytes:
    m = _BYTE_PIECE.match(piece)
    if m:
        return bytes([int(m.group(1), 16)])
    return piece.replace(_SP_SPACE, " ").encode("utf-8")


@dataclass(frozen=True, eq=False)
class Tokenizer:
    """A tokenizer seen as bytes.

    name:          file stem, for messages.
    kind:          ``"sentencepiece"``, ``"byte_level"`` or ``"metaspace"`` (how pieces map to bytes).
    vocab_size:    number of ids V (max id + 1, added tokens included).
    token_bytes:   list[bytes] of length V, exact UTF-8 bytes per id (``b""`` for special tokens).
    special:       bool[V], True for special/control/unknown tokens (and unused ids).
    added:         bool[V], True for the non-special tokens the backend matches in the raw text *before* its model
                   runs (HF ``added_tokens`` with ``special: false``, SentencePiece user-defined pieces): for their
                   bytes the tokenizer emits them, never a model piece with the same bytes (GPT-NeoX-20B's
                   whitespace runs ``'  '``…``' '×24`` at ids 50254–50276 shadow the BPE pieces ``ĠĠ``…).
    eos_id:        the end-of-document token (SentencePiece ``eos_id``; for ``tokenizer.json`` the ``eos_token`` of a
                   ``tokenizer_config.json`` beside it, else a special token spelled like one of ``EOS_PIECES``),
                   or None. Vocabulary maps send the source's EOS to the target's.
    pieces:        list[str] of length V, the raw vocabulary string per id as the library spells it
                   (``▁Hello``, ``<0x0A>``, ``ĠHello``, ``Ċ``, ``</s>``; ``""`` for ids with no token). Only the
                   FuseLLM compatibility mode compares these; everything else works on ``token_bytes``.
    dummy_prefix:  the backend prepends a space (SentencePiece ``add_dummy_prefix``) to the text.
    fingerprint:   sha256 hex over the id→bytes table, special flags, the raw pieces and the behaviour
                   descriptor (normalizer, pre-tokenizer, model type, merges / piece scores).

    Dummy-prefix rule: SentencePiece (``add_dummy_prefix``) tokenizes ``" " + text``, so "Hello" becomes
    ``▁Hello`` with bytes ``b" Hello"``. Byte spans are relative to the *text*: when the tokens' bytes
    equal ``b" " + text``, that leading space is not in the text and is dropped from the first token's
    span (a first token that is just ``▁`` then owns an empty span). HF ``Metaspace`` does not prepend
    when the text already starts with a space; the rule covers both since it only drops the space when
    the concatenation is exactly one space longer than the text.
    """

    name: str
    kind: str
    vocab_size: int
    token_bytes: list[bytes] = field(repr=False)
    special: np.ndarray = field(repr=False)
    added: np.ndarray = field(repr=False)
    pieces: list[str] = field(repr=False)
    eos_id: int | None
    dummy_prefix: bool
    fingerprint: str
    _encode_ids: Callable[[str], Sequence[int]] = field(repr=False)

    def encode(self, text: str | bytes, eos: bool = False) -> Encoding:
        """Tokenize one document (no BOS added) → ``Encoding(ids int32[n], byte_end int32[n])``.

        ``text`` may be ``str`` or UTF-8 ``bytes``. Raises :class:`TokenizationError` if the bytes are not
        valid UTF-8 (naming the byte offset) or if the tokens' bytes do not reproduce the text (naming the
        first differing byte offset and the token there). Empty text → empty arrays. ``eos``: append
        ``eos_id`` (see :meth:`with_eos`; ConfigError when the tokenizer has none).
        """
        enc = self._encode(text)
        return self.with_eos(enc) if eos else enc

    def with_eos(self, enc: Encoding) -> Encoding:
        """``enc`` with ``eos_id`` appended, owning the empty span at its end (``byte_end`` repeats the last
        offset, 0 for an empty encoding: the text's byte length for a whole-document encoding).

        Raises ConfigError when the tokenizer has no EOS token.
        """
        if self.eos_id is None:
            raise ConfigError(f"tokenizer {self.name!r} has no EOS token to append; set append_eos=false or give a "
                              "tokenizer with one")
        end = enc.byte_end[-1] if len(enc.byte_end) else 0
        return Encoding(np.append(enc.ids, np.int32(self.eos_id)).astype(np.int32),
                        np.append(enc.byte_end, np.int32(end)).astype(np.int32))

    def _encode(self, text: str | bytes) -> Encoding:
        text, data = _as_text(text)
        if not text:
            return Encoding(np.zeros(0, np.int32), np.zeros(0, np.int32))
        ids = np.asarray(self._encode_ids(text), dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise TokenizationError(f"{self.name}: backend returned id outside [0, {self.vocab_size})")
        chunks = [self.token_bytes[i] for i in ids]
        joined = b"".join(chunks)
        shift = 0
        if joined != data:
            if self.dummy_prefix and joined[:1] == b" " and joined[1:] == data:
                shift = 1
            else:
                self._raise_mismatch(ids, chunks, joined, data)
        lengths = np.fromiter((len(p) for p in chunks), dtype=np.int64, count=len(chunks))
        byte_end = np.maximum(np.cumsum(lengths) - shift, 0)
        return Encoding(ids.astype(np.int32), byte_end.astype(np.int32))

    def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
        """Raw concatenation of ``token_bytes`` for ``ids`` (int[n]); special tokens contribute nothing.

        With a dummy prefix this starts with the prefix space (``decode_bytes(encode("Hi").ids) ==
        b" Hi"`` for Llama-2); slice the text with ``byte_end`` to get exact spans.
        """
        return b"".join(self.token_bytes[int(i)] for i in np.asarray(ids).reshape(-1))

    def piece(self, token_id: int) -> str:
        """Human-readable form of a token for messages: its bytes (repr) and special flag."""
        b = self.token_bytes[token_id]
        return f"<special id {token_id}>" if self.special[token_id] else repr(b)

    def _raise_mismatch(self, ids, chunks, joined: bytes, data: bytes) -> None:
        def common_prefix(got: bytes) -> int:
            n = min(len(got), len(data))
            return next((i for i in range(n) if got[i] != data[i]), n)

        # Compare against the text, with the dummy prefix dropped if that lines up better.
        got, shift = joined, 0
        if self.dummy_prefix and joined[:1] == b" " and common_prefix(joined[1:]) >= common_prefix(joined):
            got, shift = joined[1:], 1
        pos = common_prefix(got)
        # Token whose bytes cover position pos (+shift) of the joined stream.
        cum, tok_idx = 0, len(ids) - 1
        for j, p in enumerate(chunks):
            if cum + len(p) > pos + shift or (len(p) == 0 and cum == pos + shift):
                tok_idx = j
                break
            cum += len(p)
        tid = int(ids[tok_idx]) if len(ids) else -1
        tok = self.piece(tid) if tid >= 0 else "<none>"
        raise TokenizationError(
            f"{self.name}: tokens do not reproduce the text at byte offset {pos}: text has "
            f"{data[pos:pos + 8]!r}, tokens give {got[pos:pos + 8]!r} (token #{tok_idx}, id {tid} = {tok}); "
            "the tokenizer normalizes or cannot represent this input"
        )


def _as_text(text: str | bytes) -> tuple[str, bytes]:
    if isinstance(text, (bytes, bytearray, memoryview)):
        data = bytes(text)
        try:
            return data.decode("utf-8"), data
        except UnicodeDecodeError as e:
            raise TokenizationError(
                f"text is not valid UTF-8: byte offset {e.start} ({data[e.start:e.start + 4]!r}): {e.reason}"
            ) from None
    try:
        return text, text.encode("utf-8")
    except UnicodeEncodeError as e:
        off = len(text[: e.start].encode("utf-8", "surrogatepass"))
        raise TokenizationError(
            f"text is not valid UTF-8: byte offset {off} holds an unpaired surrogate {text[e.start]!r}"
        ) from None


def _fingerprint(token_bytes: list[bytes], special: np.ndarray, pieces: list[str], descriptor: object) -> str:
    h = hashlib.sha256()
    h.update(b"fusion_jax.tokenizer.v2\0")
    h.update(json.dumps(descriptor, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode())
    h.update(len(token_bytes).to_bytes(8, "little"))
    for i, (b, s, p) in enumerate(zip(token_bytes, special, pieces)):  # ids are already sorted
        q = p.encode("utf-8", "surrogatepass")
        h.update(i.to_bytes(4, "little") + bool(s).to_bytes(1, "little") + len(b).to_bytes(4, "little") + b)
        h.update(len(q).to_bytes(4, "little") + q)
    return h.hexdigest()


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a ``tokenizer.json``, a SentencePiece ``.model``, a directory with either, or a GGUF file (recognised by
    its magic; the tokenizer rebuilt from its metadata, named after the file, remembered per path, size and mtime).

    In a directory ``tokenizer.json`` is preferred over ``tokenizer.model`` (or another ``*.model``).
    """
    path = Path(path)
    if path.is_dir():
        cands = [path / "tokenizer.json", path / "tokenizer.model", *sorted(path.glob("*.model"))]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise FileNotFoundError(f"{path}: no tokenizer.json or SentencePiece .model in this directory")
        path = found
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file")
    from fusion_jax.tokenizers import gguf  # (it imports this module)

    if gguf.is_gguf(path):
        return gguf.load_gguf_tokenizer(path)  # a CheckpointError names the file and what it lacks
    try:
        return _load_hf(path) if path.suffix == ".json" else _load_sentencepiece(path)
    except Exception as e:
        kind = "a tokenizer.json" if path.suffix == ".json" else "a SentencePiece .model"
        raise TokenizerFileError(f"{path}: cannot be read as {kind}: {type(e).__name__}: {e}") from e


def _load_sentencepiece(path: Path) -> Tokenizer:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    raw = path.read_bytes()
    proto = pb.ModelProto()
    proto.ParseFromString(raw)
    sp = spm.SentencePieceProcessor(model_proto=raw)
    V = sp.get_piece_size()
    token_bytes, special = [], np.zeros(V, bool)
    for i in range(V):
        if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
            special[i] = True
            token_bytes.append(b"")
        else:
            token_bytes.append(_sp_piece_bytes(sp.id_to_piece(i)))
    added = np.array([p.type == pb.ModelProto.SentencePiece.USER_DEFINED for p in proto.pieces], bool)
    ns = proto.normalizer_spec
    dummy = bool(ns.add_dummy_prefix) and not proto.trainer_spec.treat_whitespace_as_suffix
    descriptor = {
        "backend": "sentencepiece",
        "model_type": int(proto.trainer_spec.model_type),
        "normalizer": {
            "name": ns.name,
            "charsmap_sha256": hashlib.sha256(ns.precompiled_charsmap).hexdigest(),
            "add_dummy_prefix": bool(ns.add_dummy_prefix),
            "remove_extra_whitespaces": bool(ns.remove_extra_whitespaces),
            "escape_whitespaces": bool(ns.escape_whitespaces),
        },
        "scores_sha256": hashlib.sha256(
            b"".join(repr((p.piece, float(p.score), int(p.type))).encode() for p in proto.pieces)
        ).hexdigest(),
    }

    def encode_ids(text: str) -> list[int]:
        return sp.encode(text, add_bos=False, add_eos=False)

    pieces = [sp.id_to_piece(i) for i in range(V)]
    eos = int(proto.trainer_spec.eos_id)
    eos_id = eos if 0 <= eos < V else None
    descriptor["eos_id"] = eos_id
    return Tokenizer(
        name=path.stem, kind="sentencepiece", vocab_size=V, token_bytes=token_bytes, special=special, added=added,
        pieces=pieces, eos_id=eos_id, dummy_prefix=dummy, fingerprint=_fingerprint(token_bytes, special, pieces, descriptor),
        _encode_ids=encode_ids,
    )


def _mentions(cfg: object, type_name: str) -> bool:
    """Whether a tokenizer.json component (possibly a Sequence) contains a component of this type."""
    if isinstance(cfg, dict):
        return cfg.get("type") == type_name or any(_mentions(v, type_name) for v in cfg.values())
    if isinstance(cfg, list):
        return any(_mentions(v, type_name) for v in cfg)
    return False


def _metaspace_dummy_prefix(cfg: dict) -> bool:
    def walk(c):
        if isinstance(c, dict):
            if c.get("type") == "Metaspace":
                scheme = c.get("prepend_scheme", "always" if c.get("add_prefix_space", True) else "never")
                if scheme != "never":
                    return True
            if c.get("type") == "Prepend" and c.get("prepend") == _SP_SPACE:
                return True
            return any(walk(v) for v in c.values())
        if isinstance(c, list):
            return any(walk(v) for v in c)
        return False

    return walk(cfg.get("normalizer")) or walk(cfg.get("pre_tokenizer"))


def _load_hf(path: Path) -> Tokenizer:
    import tokenizers

    cfg = json.loads(path.read_text(encoding="utf-8"))
    tok = tokenizers.Tokenizer.from_str(json.dumps(cfg))
    # Special-token strings that occur in a document are tokenized as plain text, so that the tokens
    # always reproduce the text (special tokens are inserted by the pipeline, never found in text).
    tok.encode_special_tokens = True
    model = cfg.get("model", {})
    vocab: dict[str, int] = model.get("vocab") or {}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...]
        vocab = {p: i for i, (p, _) in enumerate(vocab)}
    added = cfg.get("added_tokens") or []
    V = max([*vocab.values(), *(a["id"] for a in added), -1]) + 1

    if _mentions(cfg.get("pre_tokenizer"), "ByteLevel") or _mentions(cfg.get("decoder"), "ByteLevel"):
        kind, to_bytes, dummy = "byte_level", _byte_level_bytes, False
    else:
        kind, to_bytes, dummy = "metaspace", _sp_piece_bytes, _metaspace_dummy_prefix(cfg)

    token_bytes: list[bytes] = [b""] * V
    special = np.ones(V, bool)  # ids with no token at all stay special (never produced)
    is_added = np.zeros(V, bool)
    # Added tokens first: an id that is also in the model vocab (DeepSeek-V3 lists `<｜begin▁of▁sentence｜>` there)
    # is the added token, whose content is raw text, not a model piece to convert (as the library's `id_to_token`).
    for a in added:
        i = a["id"]
        if a.get("special"):
            token_bytes[i], special[i] = b"", True
        else:
            token_bytes[i], special[i], is_added[i] = a["content"].encode("utf-8"), False, True
    added_ids = {a["id"] for a in added}
    unk = model.get("unk_token")
    for piece, i in vocab.items():
        if i in added_ids:
            continue
        token_bytes[i], special[i] = to_bytes(piece), False
        if piece == unk:
            token_bytes[i], special[i] = b"", True

    descriptor = {
        "backend": "tokenizers",
        "kind": kind,
        "normalizer": cfg.get("normalizer"),
        "pre_tokenizer": cfg.get("pre_tokenizer"),
        "model_type": model.get("type"),
        "byte_fallback": bool(model.get("byte_fallback")),
        "merges_sha256": hashlib.sha256(
            json.dumps(model.get("merges") or [], ensure_ascii=True).encode()
        ).hexdigest(),
        "added": [[a["id"], a["content"], bool(a.get("special"))] for a in sorted(added, key=lambda a: a["id"])],
    }

    def encode_ids(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False).ids

    name = path.parent.name if path.name == "tokenizer.json" else path.stem
    # As the library spells them (added tokens take precedence over the model vocab, as in `id_to_token`).
    pieces = [tok.id_to_token(i) or "" for i in range(V)]
    eos_id = _hf_eos_id(path, pieces, special)
    descriptor["eos_id"] = eos_id
    return Tokenizer(
        name=name, kind=kind, vocab_size=V, token_bytes=token_bytes, special=special, added=is_added,
        pieces=pieces, eos_id=eos_id, dummy_prefix=dummy, fingerprint=_fingerprint(token_bytes, special, pieces, descriptor),
        _encode_ids=encode_ids,
    )


def _tokenizer_config(tokenizer_file: Path) -> dict | None:
    """The ``tokenizer_config.json`` beside the tokenizer file, or the one rebuilt from a GGUF file's metadata."""
    from fusion_jax.tokenizers import gguf

    if gguf.is_gguf(tokenizer_file):
        return gguf.rebuilt(tokenizer_file)[1]
    config = tokenizer_file.parent / "tokenizer_config.json"
    if not config.is_file():
        return None
    data = read_json(config, TokenizerFileError,
                     fix="repair or delete this tokenizer_config.json (it only names the special tokens)")
    if not isinstance(data, dict):
        raise TokenizerFileError(f"{config}: a JSON {type(data).__name__}, not an object; repair or delete this "
                                 "tokenizer_config.json")
    return data


def token_from_config(tokenizer_file: Path, key: str, pieces: list[str]) -> int | None:
    """The id of ``key`` (e.g. ``eos_token``, ``bos_token``) in a ``tokenizer_config.json`` beside the tokenizer file
    (for a GGUF file: in its metadata, ``tokenizer.ggml.bos_token_id`` …, through the rebuilt config)."""
    data = _tokenizer_config(Path(tokenizer_file))
    if data is None:
        return None
    value = data.get(key)
    value = value.get("content") if isinstance(value, dict) else value
    if not isinstance(value, str):
        return None
    return next((i for i, p in enumerate(pieces) if p == value), None)


def _hf_eos_id(path: Path, pieces: list[str], special: np.ndarray) -> int | None:
    eos = token_from_config(path, "eos_token", pieces)
    if eos is not None:
        return eos
    by_piece = {p: i for i, p in enumerate(pieces) if p}
    return next((by_piece[p] for p in EOS_PIECES if p in by_piece and special[by_piece[p]]), None)


def check_vocab_size(tokenizer: Tokenizer, model_vocab_size: int, name: str) -> None:
    """Raise :class:`VocabSizeError` if ``tokenizer`` can produce ids ≥ ``model_vocab_size``.

    A model whose embedding is padded past the tokenizer (Qwen2: 151,646 real tokens, 151,936 rows) is
    fine; a tokenizer with more ids than the model has rows would index out of the embedding.
    """
    if tokenizer.vocab_size > model_vocab_size:
        raise VocabSizeError(
            f"{name}: tokenizer {tokenizer.name!r} has {tokenizer.vocab_size} ids but the model's vocab size "
            f"is {model_vocab_size}; ids {model_vocab_size}..{tokenizer.vocab_size - 1} would be out of range"
        )
