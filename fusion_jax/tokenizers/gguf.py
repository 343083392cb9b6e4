"""The tokenizer a GGUF file (llama.cpp's format) carries, rebuilt as a ``tokenizer.json`` our adapter reads.

A GGUF has no ``tokenizer.json``: it stores the vocabulary under llama.cpp's metadata keys
(``tokenizer.ggml.model``, ``.tokens``, ``.token_type``, ``.scores``, ``.merges``, ``.pre``, the special ids).
Two vocabulary kinds are rebuilt, each to behave as llama.cpp (and the original tokenizer) does:

* ``gpt2``: byte-level BPE from the tokens and merges; ``tokenizer.ggml.pre`` picks the pre-tokenizer split
  (GPT-2's regex, digits split one by one first for StarCoder/SmolLM, Llama-3's or Qwen2's regex).
* ``llama``: SentencePiece-style BPE whose merges are recovered from the piece scores (best first), with byte
  fallback (``<0xNN>`` pieces) and ``▁`` for spaces; the dummy prefix (``tokenizer.ggml.add_space_prefix``,
  on by default) is prepended to the text always, as SentencePiece and llama.cpp do (a text that starts with a
  space gets ``▁▁``; transformers' GGUF loader uses ``Metaspace(prepend_scheme="first")``, which does not).

Tokens of type CONTROL or UNKNOWN become special added tokens, USER_DEFINED ones non-special added tokens
(matched whole in the text, as llama.cpp does). ``tokenizer_config.json`` names bos/eos/unk/pad and the
add-BOS/EOS flags, so that :func:`fusion_jax.tokenizers.load_tokenizer` finds ``eos_id``.
Reads the metadata with the ``gguf`` package (numpy only); builds with the ``tokenizers`` library.

``load_tokenizer(x.gguf)`` (and ``token_from_config``) go through :func:`rebuilt`, which keeps the rebuilt tokenizer and
its ``tokenizer_config.json`` per (path, size, mtime) in the process: rebuilding a 49k vocabulary takes seconds.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from fusion_jax.errors import CheckpointError
from fusion_jax.files import atomic_write_json, atomic_write_text
from fusion_jax.tokenizers import Tokenizer, bytes_to_unicode, load_tokenizer

__all__ = ["GGUFVocab", "build_tokenizer", "is_gguf", "load_gguf_tokenizer", "read_vocab", "rebuilt",
           "tokenizer_config", "write_tokenizer"]

MAGIC = b"GGUF"

# gguf.TokenType values (kept here so that the builders need no gguf import).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# tokenizer.ggml.pre → (split regex, digits isolated first, ignore_merges), as llama.cpp's llama-vocab.cpp reads them.
PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    **{name: (_GPT2_SPLIT, False, False) for name in ("gpt-2", "gpt2", "default", "mpt", "olmo", "jais", "phi-2")},
    **{name: (_GPT2_SPLIT, True, False) for name in ("starcoder", "refact", "command-r", "smollm", "codeshell",
                                                     "exaone", "minerva-7b")},
    **{name: (_LLAMA3_SPLIT, False, True) for name in ("llama3", "llama-v3", "llama-bpe", "falcon3")},
    "smaug-bpe": (_LLAMA3_SPLIT, False, False),
    **{name: (_QWEN2_SPLIT, False, False) for name in ("qwen2", "deepseek-r1-qwen", "megrez")},
}
MODELS = ("gpt2", "llama")


@dataclass(frozen=True)
class GGUFVocab:
    """The tokenizer metadata of one GGUF file (llama.cpp's keys, ``tokenizer.ggml.*``).

    tokens: piece per id (V); types: gguf.TokenType per id (V; NORMAL when the file has none); scores: float per
    id (V) or None; merges: ``"left right"`` strings or None; *_id: special ids or None.
    """

    path: str
    model: str
    pre: str | None
    tokens: list[str]
    types: list[int]
    scores: list[float] | None
    merges: list[str] | None
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None


def is_gguf(path: str | os.PathLike) -> bool:
    """A regular file that starts with the GGUF magic."""
    p = Path(path)
    if not p.is_file():
        return False
    with open(p, "rb") as f:
        return f.read(4) == MAGIC


def _open_reader(path: Path):
    import gguf

    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file; give the path of a .gguf model file")
    try:
        return gguf.GGUFReader(str(path))
    except Exception as e:  # a wrong magic, a truncated header
        raise CheckpointError(f"{path}: cannot be read as a GGUF file ({type(e).__name__}: {e}); give an intact "
                              ".gguf file (llama.cpp's format)") from e


def read_vocab(gguf_path: str | Path) -> GGUFVocab:
    """The ``tokenizer.ggml.*`` metadata of a GGUF file; CheckpointError when it has no tokenizer we rebuild."""
    path = Path(gguf_path)
    fields = _open_reader(path).fields

    def get(key: str, default=None):
        field = fields.get(key)
        return default if field is None else field.contents()

    model, tokens = get("tokenizer.ggml.model"), get("tokenizer.ggml.tokens")
    if model is None or tokens is None:
        raise CheckpointError(f"{path}: the GGUF carries no tokenizer (no tokenizer.ggml.model / .tokens); give the "
                              "tokenizer separately or a GGUF converted with its vocabulary")
    if model not in MODELS:
        raise CheckpointError(f"{path}: tokenizer.ggml.model {model!r} is not supported; supported: "
                              f"{', '.join(MODELS)} (byte-level BPE and SentencePiece-style vocabularies)")
    types = get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
    scores = get("tokenizer.ggml.scores")
    for key, values in (("token_type", types), ("scores", scores)):
        if values is not None and len(values) != len(tokens):
            raise CheckpointError(f"{path}: tokenizer.ggml.{key} has {len(values)} entries for {len(tokens)} tokens; "
                                  "the file is damaged, convert the model again")
    return GGUFVocab(
        path=str(path), model=model, pre=get("tokenizer.ggml.pre"), tokens=list(tokens), types=[int(t) for t in types],
        scores=None if scores is None else [float(s) for s in scores], merges=get("tokenizer.ggml.merges"),
        bos_id=get("tokenizer.ggml.bos_token_id"), eos_id=get("tokenizer.ggml.eos_token_id"),
        unk_id=get("tokenizer.ggml.unknown_token_id"), pad_id=get("tokenizer.ggml.padding_token_id"),
        add_bos=bool(get("tokenizer.ggml.add_bos_token", model == "llama")),
        add_eos=bool(get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(get("tokenizer.ggml.add_space_prefix", model == "llama")),
        chat_template=get("tokenizer.chat_template"),
    )


def _vocab_dict(v: GGUFVocab, spell) -> dict[str, int]:
    """piece → id, first id wins for a repeated piece; ``spell`` respells NORMAL/BYTE/UNUSED pieces."""
    vocab: dict[str, int] = {}
    for i, (tok, typ) in enumerate(zip(v.tokens, v.types)):
        vocab.setdefault(tok if typ in (CONTROL, USER_DEFINED, UNKNOWN) else spell(tok), i)
    return vocab


def _byte_level(v: GGUFVocab):
    """gpt2-type vocabulary → byte-level BPE with the pre-tokenizer ``tokenizer.ggml.pre`` names."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    if v.pre is not None and v.pre not in PRE_TOKENIZERS:
        raise CheckpointError(f"{v.path}: tokenizer.ggml.pre {v.pre!r} (the pre-tokenizer) is not supported; "
                              f"supported: {', '.join(sorted(PRE_TOKENIZERS))}")
    if not v.merges:
        raise CheckpointError(f"{v.path}: a gpt2-type vocabulary without tokenizer.ggml.merges; convert the model "
                              "again with its merges")
    split, digits, ignore_merges = PRE_TOKENIZERS[v.pre or "gpt-2"]
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())

    def spell(tok: str) -> str:
        return tok if set(tok) <= alphabet else "".join(spelling[b] for b in tok.encode("utf-8"))

    merges = [tuple(m.split(" ", 1)) for m in v.merges]
    tok = HFTokenizer(models.BPE(vocab=_vocab_dict(v, spell), merges=merges, ignore_merges=ignore_merges))
    steps = [pre_tokenizers.Digits(individual_digits=True)] if digits else []
    if split == _GPT2_SPLIT:
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    else:
        steps += [pre_tokenizers.Split(Regex(split), behavior="isolated"),
                  pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    tok.pre_tokenizer = pre_tokenizers.Sequence(steps) if len(steps) > 1 else steps[0]
    tok.decoder = decoders.ByteLevel()
    return tok


def score_merges(v: GGUFVocab) -> list[tuple[str, str]]:
    """SentencePiece-BPE merges recovered from the scores: every split of a NORMAL piece into two pieces of the
    vocabulary, best merged-piece score first (ties: longer left, then longer right part first; as transformers'
    ``generate_merges``)."""
    if v.scores is None:
        raise CheckpointError(f"{v.path}: a llama-type (SentencePiece) vocabulary without tokenizer.ggml.scores; "
                              "convert the model again with its scores")
    ids = {t: i for i, t in reversed(list(enumerate(v.tokens)))}
    merges = []
    for piece, typ, score in zip(v.tokens, v.types, v.scores):
        if typ != NORMAL:
            continue
        local = [(piece[:k], piece[k:]) for k in range(1, len(piece)) if piece[:k] in ids and piece[k:] in ids]
        local.sort(key=lambda m: (ids[m[0]], ids[m[1]]))
        merges += [(left, right, score) for left, right in local]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _sentencepiece(v: GGUFVocab):
    """llama-type vocabulary → BPE with byte fallback; ``▁`` for spaces, the dummy prefix always prepended."""
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, normalizers

    merges = [tuple(m.split(" ", 1)) for m in v.merges] if v.merges else score_merges(v)
    unk = v.tokens[v.unk_id] if v.unk_id is not None and 0 <= v.unk_id < len(v.tokens) else None
    tok = HFTokenizer(models.BPE(vocab=_vocab_dict(v, lambda t: t), merges=merges, unk_token=unk, fuse_unk=True,
                                byte_fallback=True))
    replace = normalizers.Replace(" ", "\u2581")
    tok.normalizer = (normalizers.Sequence([normalizers.Prepend("\u2581"), replace]) if v.add_space_prefix
                      else replace)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if v.add_space_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _add_specials(tok, v: GGUFVocab) -> None:
    """CONTROL/UNKNOWN tokens → special added tokens, USER_DEFINED → non-special added tokens (first id wins);
    a TemplateProcessing post-processor adds BOS/EOS where the file asks (for HF users; our adapter adds none)."""
    from tokenizers import AddedToken, processors

    seen: set[str] = set()
    special, user = [], []
    for t, typ in zip(v.tokens, v.types):
        if typ in (CONTROL, UNKNOWN, USER_DEFINED) and t not in seen:
            seen.add(t)
            (user if typ == USER_DEFINED else special).append(
                AddedToken(t, special=typ != USER_DEFINED, normalized=False))
    tok.add_special_tokens(special)
    tok.add_tokens(user)
    ends = [(flag, i) for flag, i in ((v.add_bos, v.bos_id), (v.add_eos, v.eos_id)) if flag and i is not None]
    if ends:
        bos = [v.tokens[v.bos_id]] if v.add_bos and v.bos_id is not None else []
        eos = [v.tokens[v.eos_id]] if v.add_eos and v.eos_id is not None else []
        tok.post_processor = processors.TemplateProcessing(
            single=" ".join([*bos, "$A", *eos]), pair=" ".join([*bos, "$A", *eos, *bos, "$B:1", *eos]),
            special_tokens=sorted({(v.tokens[i], i) for _, i in ends}))


def build_tokenizer(v: GGUFVocab):
    """The ``tokenizers.Tokenizer`` the vocabulary describes (``gpt2`` → byte-level BPE, ``llama`` → SentencePiece
    style), special and user-defined tokens added."""
    tok = _byte_level(v) if v.model == "gpt2" else _sentencepiece(v)
    _add_specials(tok, v)
    return tok


def tokenizer_config(v: GGUFVocab) -> dict:
    """``tokenizer_config.json``: the special tokens by content, the add-BOS/EOS flags, the chat template."""
    def content(i: int | None) -> str | None:
        return v.tokens[i] if i is not None and 0 <= i < len(v.tokens) else None

    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": content(v.bos_id),
           "eos_token": content(v.eos_id), "unk_token": content(v.unk_id), "pad_token": content(v.pad_id),
           "add_bos_token": v.add_bos, "add_eos_token": v.add_eos, "clean_up_tokenization_spaces": False}
    if v.chat_template:
        cfg["chat_template"] = v.chat_template
    return {k: val for k, val in cfg.items() if val is not None}


def _write(v: GGUFVocab, out_dir: str | Path) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "tokenizer.json"
    atomic_write_text(path, build_tokenizer(v).to_str(pretty=True))
    atomic_write_json(out / "tokenizer_config.json", tokenizer_config(v))
    return path


def write_tokenizer(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write ``tokenizer.json`` and ``tokenizer_config.json`` rebuilt from a GGUF file into ``out_dir`` (created);
    returns the ``tokenizer.json`` path. CheckpointError for a file without a tokenizer we rebuild."""
    return _write(read_vocab(gguf_path), out_dir)


def rebuilt(gguf_path: str | Path) -> tuple[Tokenizer, dict]:
    """(our adapter's Tokenizer named after the file, its ``tokenizer_config.json`` dict) for a GGUF file's tokenizer,
    remembered per (path, size, mtime) in this process. CheckpointError for a file without a tokenizer we rebuild."""
    p = Path(gguf_path).absolute()
    st = p.stat()
    return _rebuilt(str(p), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _rebuilt(path: str, size: int, mtime_ns: int) -> tuple[Tokenizer, dict]:
    v = read_vocab(path)
    with tempfile.TemporaryDirectory(prefix="gguf_tokenizer_") as tmp:
        tok = load_tokenizer(_write(v, tmp))
    return dataclasses.replace(tok, name=Path(path).stem), tokenizer_config(v)


def load_gguf_tokenizer(gguf_path: str | Path) -> Tokenizer:
    """Our adapter's :class:`~fusion_jax.tokenizers.Tokenizer` for a GGUF file's tokenizer, named after the file."""
    return rebuilt(gguf_path)[0]
