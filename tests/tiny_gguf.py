"""Tiny GGUF files written in tests with gguf.GGUFWriter, as llama.cpp's convert_hf_to_gguf.py writes them: a model's
tensors under llama.cpp's names and layouts (the q/k row permutation for llama, GPT-NeoX's [q; k; v] order, 1-D
tensors in F32) and a tokenizer's ``tokenizer.ggml.*`` keys (a byte-level BPE → ``gpt2`` type, a SentencePiece BPE →
``llama`` type). Nothing is downloaded; the model writers take a transformers model (torch)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from fusion_jax.tokenizers.gguf import CONTROL, NORMAL
from tiny_tokenizers import CODE_CORPUS, CORPUS, train_byte_level, train_sentencepiece

GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "gpt_neox": "gptneox", "mpt": "mpt"}


def write_tokenizer_gguf(path: Path, model: str, tokens, types, **kw) -> Path:
    """A GGUF with a tokenizer and a minimal llama header (no tensors), as llama.cpp's convert writes the keys."""
    w = gguf.GGUFWriter(str(path), "llama")
    for add, value in ((w.add_context_length, 64), (w.add_block_count, 1), (w.add_embedding_length, 8),
                       (w.add_feed_forward_length, 16), (w.add_head_count, 2), (w.add_head_count_kv, 2),
                       (w.add_layer_norm_rms_eps, 1e-5), (w.add_rope_dimension_count, 4),
                       (w.add_vocab_size, len(tokens))):
        add(value)
    add_tokenizer(w, Vocab(model, tokens, types, **kw))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@dataclasses.dataclass
class Vocab:
    """A tokenizer as llama.cpp's convert writes it into a GGUF (``tokenizer.ggml.*``)."""

    model: str
    tokens: list
    types: list
    merges: list | None = None
    scores: list | None = None
    pre: str | None = None
    bos: int | None = None
    eos: int | None = None
    unk: int | None = None
    pad: int | None = None
    add_space_prefix: bool | None = None


def add_tokenizer(w, v: Vocab) -> None:
    """The ``tokenizer.ggml.*`` keys of `v` into the GGUFWriter `w`."""
    w.add_tokenizer_model(v.model)
    if v.pre is not None:
        w.add_tokenizer_pre(v.pre)
    w.add_token_list(v.tokens)
    w.add_token_types(v.types)
    for add, value in ((w.add_token_merges, v.merges), (w.add_token_scores, v.scores), (w.add_bos_token_id, v.bos),
                       (w.add_eos_token_id, v.eos), (w.add_unk_token_id, v.unk), (w.add_pad_token_id, v.pad),
                       (w.add_add_space_prefix, v.add_space_prefix)):
        if value is not None:
            add(value)


def gpt2_vocab(tmp_path: Path, pre: str = "gpt-2", digits: bool = False, vocab_size: int = 400):
    """(Vocab, original tokenizers.Tokenizer): a byte-level BPE trained here, as llama.cpp writes it."""
    from tokenizers import Tokenizer, pre_tokenizers

    orig = tmp_path / "bpe.json"
    train_byte_level(orig, corpus=CORPUS + CODE_CORPUS, vocab_size=vocab_size)
    tok = Tokenizer.from_file(str(orig))
    if digits:  # SmolLM/StarCoder: every digit its own pre-token, then the GPT-2 split
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.encode_special_tokens = True  # as our adapter: a special token's spelling in a document is text
    cfg = json.loads(tok.to_str())
    vocab = tok.get_vocab(with_added_tokens=True)
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in cfg["added_tokens"] if a["special"]}
    types = [CONTROL if t in specials else NORMAL for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in cfg["model"]["merges"]]
    eos = vocab["<|endoftext|>"]
    return Vocab("gpt2", tokens, types, merges=merges, pre=pre, bos=eos, eos=eos), tok


def gpt2_gguf(tmp_path: Path, pre: str = "gpt-2", digits: bool = False):
    """(gguf path, original tokenizers.Tokenizer): a byte-level BPE trained here, written as llama.cpp does."""
    v, tok = gpt2_vocab(tmp_path, pre, digits)
    return write_tokenizer_gguf(tmp_path / "bpe.gguf", **dataclasses.asdict(v)), tok


def llama_gguf(tmp_path: Path):
    """(gguf path, SentencePieceProcessor): a SentencePiece BPE with byte fallback, as llama.cpp writes it."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(train_sentencepiece(tmp_path / "sp")))
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i)
             else NORMAL for i in range(n)]
    path = write_tokenizer_gguf(tmp_path / "sp.gguf", "llama", tokens, types,
                                scores=[sp.get_score(i) for i in range(n)], bos=sp.bos_id(), eos=sp.eos_id(),
                                unk=sp.unk_id(), add_space_prefix=True)
    return path, sp


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py LlamaModel.permute (HF half-split rows → interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def q4_k_blocks(rows: int, cols: int, rng) -> np.ndarray:
    """Random Q4_K data for a [rows, cols] tensor (gguf cannot quantize to Q4_K): random nibbles and 6-bit scales,
    with small f16 super-block scales (d, dmin) so that the weights stay small."""
    raw = rng.integers(0, 256, (rows, cols // 256, 144), dtype=np.uint8)
    raw[..., 0:4] = np.array([2e-4, 2e-4], np.float16).view(np.uint8)
    return raw.reshape(rows, -1)


def gguf_tensor(name: str, w: np.ndarray, qtype: Q, rng):
    """(data, raw_dtype) of one tensor as GGUFWriter.add_tensor takes it; 1-D tensors stay F32 as in llama.cpp."""
    if w.ndim == 1 or qtype == Q.F32:
        return w.astype(np.float32), None
    if qtype == Q.F16:
        return w.astype(np.float16), None
    if qtype == Q.Q4_K:
        return q4_k_blocks(*w.shape, rng), Q.Q4_K
    return quantize(w.astype(np.float32), qtype), qtype


def llama_cpp_tensors(model, kind: str) -> dict[str, np.ndarray]:
    """The model's tensors under llama.cpp's names and layouts (HF order: [out, in])."""
    cfg = model.config
    arch = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}[GGUF_ARCH[kind.removesuffix("_tied")]]
    table = gguf.get_tensor_name_map(arch, cfg.num_hidden_layers)
    out = {}
    for name, t in model.state_dict().items():
        if name.endswith(("rotary_emb.inv_freq", "attention.bias", "masked_bias")):
            continue
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        base, _, suffix = name.rpartition(".")
        w = t.numpy().copy()
        if kind in ("llama", "llama_tied"):
            if ".q_proj." in name:
                w = permute(w, cfg.num_attention_heads)
            elif ".k_proj." in name:
                w = permute(w, cfg.num_key_value_heads)
        if kind == "gpt_neox" and ".query_key_value." in name:  # per-head [q k v] → [q; k; v]
            n = cfg.num_attention_heads
            w = w.reshape(n, 3, -1, *w.shape[1:]).swapaxes(0, 1).reshape(w.shape)
        out[f"{table.get_name(base)}.{suffix}"] = w
    return out


def metadata(model, kind: str) -> dict:
    c = model.config
    if kind == "mpt":
        return {"context_length": (c.max_seq_len, "u32"), "embedding_length": (c.d_model, "u32"),
                "block_count": (c.n_layers, "u32"), "feed_forward_length": (4 * c.d_model, "u32"),
                "attention.head_count": (c.n_heads, "u32"), "attention.layer_norm_epsilon": (c.layer_norm_epsilon, "f32"),
                "attention.max_alibi_bias": (c.attn_config.alibi_bias_max, "f32"),
                "attention.clamp_kqv": (c.attn_config.clip_qkv, "f32")}
    m = {"context_length": (c.max_position_embeddings, "u32"), "embedding_length": (c.hidden_size, "u32"),
         "block_count": (c.num_hidden_layers, "u32"), "feed_forward_length": (c.intermediate_size, "u32"),
         "attention.head_count": (c.num_attention_heads, "u32"),
         "rope.freq_base": (c.rope_parameters["rope_theta"], "f32")}
    head_dim = c.hidden_size // c.num_attention_heads
    if kind == "gpt_neox":
        m["attention.layer_norm_epsilon"] = (c.layer_norm_eps, "f32")
        m["rope.dimension_count"] = (int(c.rope_parameters.get("partial_rotary_factor", 1.0) * head_dim), "u32")
        m["use_parallel_residual"] = (c.use_parallel_residual, "bool")
    else:
        m["attention.head_count_kv"] = (c.num_key_value_heads, "u32")
        m["attention.layer_norm_rms_epsilon"] = (c.rms_norm_eps, "f32")
        m["rope.dimension_count"] = (head_dim, "u32")
    return m


def write_gguf(path, model, kind: str, qtype: Q = Q.F32, arch: str | None = None, extra_tensor=None,
               vocab: Vocab | None = None):
    """`model` as llama.cpp writes it; the vocabulary size only from the token list (as many files do). `vocab`: its
    tokenizer (default: a token list ``t0``, ``t1``… that is no tokenizer we rebuild)."""
    arch = arch or GGUF_ARCH[kind.removesuffix("_tied")]
    rng = np.random.default_rng(1)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"tiny {kind}")
    add = {"u32": w.add_uint32, "f32": w.add_float32, "bool": w.add_bool}
    for key, (value, t) in metadata(model, kind.removesuffix("_tied")).items():
        add[t](f"{arch}.{key}", value)
    if vocab is None:
        w.add_tokenizer_model("gpt2")
        w.add_token_list([f"t{i}" for i in range(model.config.vocab_size)])
    else:
        add_tokenizer(w, vocab)
    for name, t in llama_cpp_tensors(model, kind).items():
        data, raw = gguf_tensor(name, t, qtype, rng)
        w.add_tensor(name, data, raw_dtype=raw)
    if extra_tensor is not None:
        w.add_tensor(*extra_tensor)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
