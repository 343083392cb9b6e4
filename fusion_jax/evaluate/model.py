"""A model loaded for evaluation or generation: its params on the mesh, its tokenizer (checked against the one it
was saved with) and, when asked for, its BOS token."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from jax.sharding import Mesh

from fusion_jax.config.model import ModelConfig
from fusion_jax.convert import checkpoint
from fusion_jax.errors import ConfigError
from fusion_jax.tokenizers import Tokenizer, check_vocab_size, load_tokenizer, token_from_config

BOS_PIECES = ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>")


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    path: str                       # the checkpoint, for messages and reports
    cfg: ModelConfig
    params: Any                     # sharded over `mesh` by `rules`
    tokenizer: Tokenizer
    bos_id: int | None              # prepended to every text when the caller asked for a BOS; else None
    mesh: Mesh
    rules: dict[str, tuple[str, ...]]


def load_model(path: str, tokenizer: str, mesh: Mesh, rules: dict[str, tuple[str, ...]], *, param_dtype: str,
               compute_dtype: str, bos: bool = False, allow_tokenizer_mismatch: bool = False) -> LoadedModel:
    """The checkpoint at `path` (fusion_jax or Hugging Face) on `mesh`, with its tokenizer (`tokenizer`, default the
    checkpoint's own). Clear errors, before the weights are read, for a missing checkpoint, a tokenizer other than
    the one it was saved with (unless allowed), and `bos` with a tokenizer that has none."""
    checkpoint.kind(path)
    tok_path = tokenizer or path
    tok = load_tokenizer(tok_path)
    checkpoint.check_tokenizer(path, tok, tok_path, allow_mismatch=allow_tokenizer_mismatch)
    bos_id = None
    if bos:
        bos_id = bos_token_id(tok_path, tok)
        if bos_id is None:
            raise ConfigError(f"tokenizer {tok.name!r} ({tok_path}) has no BOS token; set bos=false")
    model_cfg, params = checkpoint.load(path, mesh, rules, param_dtype=param_dtype, compute_dtype=compute_dtype)
    check_vocab_size(tok, model_cfg.vocab_size, path)
    return LoadedModel(str(path), model_cfg, params, tok, bos_id, mesh, dict(rules))


def _tokenizer_file(path: Path) -> Path:
    if path.is_dir():
        for c in [path / "tokenizer.json", path / "tokenizer.model", *sorted(path.glob("*.model"))]:
            if c.is_file():
                return c
    return path


def bos_token_id(path: str | os.PathLike, tok: Tokenizer) -> int | None:
    """The BOS id of the tokenizer loaded from `path`: tokenizer_config.json's bos_token, else SentencePiece's
    bos_id, else a special token spelled like one of BOS_PIECES; None if it has none."""
    file = _tokenizer_file(Path(path))
    bos = token_from_config(file, "bos_token", tok.pieces)
    if bos is not None:
        return bos
    by_piece = {p: i for i, p in enumerate(tok.pieces) if p}
    if tok.kind == "sentencepiece":
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString(file.read_bytes())
        bos = int(proto.trainer_spec.bos_id)
        return bos if 0 <= bos < tok.vocab_size else None
    return next((by_piece[p] for p in BOS_PIECES if p in by_piece and tok.special[by_piece[p]]), None)
