"""GGUF (llama.cpp) models in: weights, config and logits against transformers' own GGUF loader.

Every GGUF here is written in the test (tests/tiny_gguf.py) with `gguf.GGUFWriter` from a tiny random transformers model, the way
llama.cpp's convert_hf_to_gguf.py writes it (its tensor names, the q/k row permutation for llama, GPT-NeoX's
[q; k; v] order, 1-D tensors in F32), so nothing is downloaded.
"""

import dataclasses

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("accelerate")  # transformers' GGUF loader needs it

from gguf import GGMLQuantizationType as Q  # noqa: E402

from fusion_jax import convert, models  # noqa: E402
from fusion_jax.cli.convert import parse, run  # noqa: E402
from fusion_jax.convert import CheckpointError, UnsupportedModelError  # noqa: E402
from fusion_jax.convert.architectures import architecture  # noqa: E402
from fusion_jax.convert.gguf import GGUFCheckpoint  # noqa: E402
from tiny_gguf import llama_cpp_tensors, metadata, write_gguf  # noqa: E402

# hidden and intermediate sizes are multiples of 256: the row length k-quants (Q4_K) need.
LLAMA_LIKE = dict(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4)
CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE, num_key_value_heads=2, rope_theta=50000.0,
                                              rms_norm_eps=1e-5, max_position_embeddings=128),
    "llama_tied": lambda: transformers.LlamaConfig(**LLAMA_LIKE, num_key_value_heads=1, tie_word_embeddings=True),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE, num_key_value_heads=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**LLAMA_LIKE, rotary_pct=0.5),
    "mpt": lambda: transformers.MptConfig(vocab_size=64, d_model=256, n_layers=2, n_heads=4,
                                          attn_config={"clip_qkv": 0.5}),
}
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 9))


def hf_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(CONFIGS[kind]()).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS).long()).logits.float().numpy()


def our_logits(path) -> np.ndarray:
    cfg, params = convert.load(path, compute_dtype="float32")
    return np.asarray(models.apply(cfg, params, TOKENS.astype(np.int32)))


def assert_logits_close(ours, ref):
    """≤ 1e-4 relative to the logit scale."""
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4 * max(1.0, float(np.abs(ref).max())))


def transformers_gguf(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                             dtype=torch.float32).eval()


# ------------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind,qtype", [("llama", Q.F32), ("llama", Q.F16), ("llama", Q.Q8_0), ("llama", Q.Q4_1),
                                        ("llama", Q.Q4_K), ("llama_tied", Q.Q8_0), ("qwen2", Q.F32),
                                        ("qwen2", Q.Q4_1)])
def test_logits_equal_transformers_gguf_loader(tmp_path, kind, qtype):
    path = write_gguf(tmp_path / "m.gguf", hf_model(kind), kind, qtype)
    ref = transformers_gguf(path)
    assert_logits_close(our_logits(path), torch_logits(ref))


@pytest.mark.parametrize("kind", ["llama", "llama_tied", "qwen2"])
def test_config_equals_transformers(tmp_path, kind):
    model = hf_model(kind)
    path = write_gguf(tmp_path / "m.gguf", model, kind)
    ours, theirs = GGUFCheckpoint(path).config, transformers.AutoConfig.from_pretrained(tmp_path, gguf_file=path.name)
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings", "model_type"):
        assert ours[key] == pytest.approx(getattr(theirs, key)), key
    assert ours["rope_parameters"]["rope_theta"] == pytest.approx(theirs.rope_parameters["rope_theta"])
    # and the ModelConfig is the one the original Hugging Face config gives (head_dim None means hidden / heads)
    want = architecture(model.config.model_type).config_from_hf(model.config.to_dict(), param_dtype="float32")
    got = convert.checkpoint.model_config(path)
    assert dataclasses.replace(got, head_dim=got.dim_per_head) == dataclasses.replace(want, head_dim=want.dim_per_head)


@pytest.mark.parametrize("kind", ["llama", "gpt_neox", "mpt"])
def test_f32_logits_equal_the_original_model(tmp_path, kind):
    """Unquantized, the GGUF is the original model: this checks the layout changes without transformers' loader
    (which reads no GGUF of GPT-NeoX or MPT)."""
    model = hf_model(kind)
    path = write_gguf(tmp_path / "m.gguf", model, kind)
    assert_logits_close(our_logits(path), torch_logits(model))


@pytest.mark.parametrize("to", ["fusion_jax", "hf"])
def test_convert_cli_gives_the_same_logits(tmp_path, to):
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama"), "llama", Q.Q4_1)
    out = tmp_path / "out"
    assert run(parse([str(path), str(out), "--to", to])) == str(out)
    direct = our_logits(path)
    np.testing.assert_allclose(our_logits(out), direct, rtol=0, atol=1e-5)
    if to == "hf":  # transformers reads our export: the dequantized model
        exported = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
        assert_logits_close(torch_logits(exported), torch_logits(transformers_gguf(path)))
    assert convert.source_info(path)[0] == "llama"


def test_unsupported_quant_type_is_one_error(tmp_path):
    model = hf_model("llama")
    tensors = llama_cpp_tensors(model, "llama")
    # The same model with one tensor in a type gguf cannot dequantize (I32).
    w = gguf.GGUFWriter(str(tmp_path / "bad.gguf"), "llama")
    for key, (value, t) in metadata(model, "llama").items():
        {"u32": w.add_uint32, "f32": w.add_float32}[t](f"llama.{key}", value)
    w.add_uint32("llama.vocab_size", 64)
    for name, t in tensors.items():
        w.add_tensor(name, t.astype(np.int32) if name == "blk.1.attn_v.weight" else t)
    w.write_header_to_file(), w.write_kv_data_to_file(), w.write_tensors_to_file(), w.close()
    with pytest.raises(CheckpointError, match=r"blk\.1\.attn_v\.weight \(I32\).*supported types: .*Q4_K"):
        convert.load(tmp_path / "bad.gguf")


def test_unknown_architecture_is_one_error(tmp_path):
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama"), "llama", arch="bert")
    with pytest.raises(UnsupportedModelError, match=r"GGUF architecture 'bert' is not supported; supported: llama"):
        convert.load(path)


def test_unexpected_tensor_and_not_gguf(tmp_path):
    extra = ("blk.0.attn_sinks.weight", np.zeros(4, np.float32))
    path = write_gguf(tmp_path / "m.gguf", hf_model("llama"), "llama", extra_tensor=extra)
    with pytest.raises(CheckpointError, match=r"do(es)? not have \(1\): blk\.0\.attn_sinks\.weight"):
        convert.load(path)
    (tmp_path / "x.gguf").write_bytes(b"not a gguf")
    with pytest.raises(CheckpointError, match="not a GGUF model"):
        convert.load(tmp_path / "x.gguf")
