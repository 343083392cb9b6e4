"""Hugging Face ⇄ fusion_jax conversion: round trips against transformers, sharded files, errors, dtypes, meshes.

Every HF model here is a tiny random transformers (PyTorch) model built in the test, so nothing is downloaded.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import jax  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from fusion_jax import convert, models  # noqa: E402
from fusion_jax.convert import CheckpointError, UnsupportedModelError  # noqa: E402
from fusion_jax.cli.convert import parse, run as main  # noqa: E402
from fusion_jax.errors import RunDirError  # noqa: E402
from fusion_jax.mesh import MeshConfig, make_mesh  # noqa: E402

LLAMA_LIKE = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)
HF_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**LLAMA_LIKE, num_key_value_heads=2),
    "mistral": lambda: transformers.MistralConfig(**LLAMA_LIKE, num_key_value_heads=1),
    "qwen2": lambda: transformers.Qwen2Config(**LLAMA_LIKE, num_key_value_heads=2),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(**LLAMA_LIKE),
    "mpt": lambda: transformers.MptConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4),
    # Variants that exercise the rest of the config maps: Llama-3.1 RoPE scaling + tied embeddings; sequential
    # residual, rotary_pct 0.5 and linear RoPE scaling; clip_qkv with a non-power-of-two head count (ALiBi slopes).
    "llama3_tied": lambda: transformers.LlamaConfig(
        **LLAMA_LIKE, num_key_value_heads=2, tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 16},
    ),
    "gpt_neox_sequential": lambda: transformers.GPTNeoXConfig(
        **LLAMA_LIKE, use_parallel_residual=False, rotary_pct=0.5, rope_scaling={"rope_type": "linear", "factor": 2.0}
    ),
    "mpt_clip": lambda: transformers.MptConfig(vocab_size=64, d_model=48, n_layers=2, n_heads=6, attn_config={"clip_qkv": 0.5}),
}
TOKENS = np.random.default_rng(0).integers(0, 64, (2, 9))


def torch_logits(model, tokens=TOKENS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(np.asarray(tokens)).long()).logits.float().numpy()


def our_logits(cfg, params, tokens=TOKENS) -> np.ndarray:
    return np.asarray(models.apply(cfg, params, np.asarray(tokens, np.int32)))


def from_pretrained(path):
    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def convert_cli(*argv) -> str:
    return main(parse([str(a) for a in argv]))


class HFModel:
    def __init__(self, kind: str, path, model):
        self.kind, self.path, self.model = kind, path, model
        self.logits = torch_logits(model)

    def copy(self, dst):
        """A private copy of the HF directory, to damage."""
        shutil.copytree(self.path, dst)
        return dst


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """kind → HFModel, each built and saved once: random weights plus noise so norms and biases are not 1 / 0."""
    cache = {}

    def get(kind: str) -> HFModel:
        if kind not in cache:
            torch.manual_seed(len(cache))
            model = transformers.AutoModelForCausalLM.from_config(HF_CONFIGS[kind]()).float().eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.1 * torch.randn_like(p))
            path = tmp_path_factory.mktemp(f"hf_{kind}")
            model.save_pretrained(path)
            cache[kind] = HFModel(kind, path, model)
        return cache[kind]

    return get


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for name in sa:
        torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=0, msg=f"{name} differs")


# 1. Round trips ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(HF_CONFIGS))
def test_round_trip(hf_model, tmp_path, kind):
    src = hf_model(kind)
    ours, back = tmp_path / "ours", tmp_path / "back"
    assert convert_cli(src.path, ours) == str(ours)
    assert (ours / "fusion_jax.json").exists() and (ours / "params").is_dir()
    assert not os.path.exists(f"{ours}.partial")

    cfg, params = convert.load(ours, compute_dtype="float32")
    np.testing.assert_allclose(our_logits(cfg, params), src.logits, rtol=0, atol=1e-4)
    cfg_hf, params_hf = convert.load(src.path, compute_dtype="float32")  # straight from the HF directory
    assert cfg_hf == cfg
    np.testing.assert_allclose(our_logits(cfg_hf, params_hf), src.logits, rtol=0, atol=1e-4)

    convert_cli(ours, back, "--to", "hf")
    assert json.loads((back / "config.json").read_text())["model_type"] == src.model.config.model_type
    model = from_pretrained(back)
    assert type(model) is type(src.model)
    assert_same_weights(model, src.model)
    np.testing.assert_allclose(torch_logits(model), src.logits, rtol=0, atol=1e-5)


def test_hf_to_hf_directly(hf_model, tmp_path):
    src = hf_model("gpt_neox")
    convert_cli(src.path, tmp_path / "out", "--to", "hf")
    np.testing.assert_allclose(torch_logits(from_pretrained(tmp_path / "out")), src.logits, rtol=0, atol=1e-5)


# 2. Sharded safetensors ---------------------------------------------------------------------------------------------


def shard_files(path):
    return sorted(p.name for p in path.iterdir() if p.suffix == ".safetensors")


def test_sharded_hf_index_in_and_out(hf_model, tmp_path):
    src = hf_model("llama")
    sharded = tmp_path / "sharded"
    src.model.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(shard_files(sharded)) > 1

    cfg, params = convert.load(sharded, compute_dtype="float32")
    np.testing.assert_allclose(our_logits(cfg, params), src.logits, rtol=0, atol=1e-4)

    out = tmp_path / "out"
    hf_config = json.loads((sharded / "config.json").read_text())
    convert.save_hf(out, cfg, params, model_type="llama", hf_config=hf_config, max_shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = shard_files(out)
    assert len(files) > 1 and set(index["weight_map"].values()) == set(files)
    expected = json.loads((sharded / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(index["weight_map"]) == set(expected)
    total = 0
    for name in files:
        tensors = load_file(out / name)
        assert all(index["weight_map"][t] == name for t in tensors)
        size = sum(a.nbytes for a in tensors.values())
        assert size <= 20_000 or len(tensors) == 1
        total += size
    assert index["metadata"]["total_size"] == total

    model = from_pretrained(out)
    assert_same_weights(model, src.model)
    np.testing.assert_allclose(torch_logits(model), src.logits, rtol=0, atol=1e-5)


# 3. Tokenizer files -------------------------------------------------------------------------------------------------


def test_tokenizer_files_are_copied(hf_model, tmp_path):
    from tokenizers import Tokenizer, models as tok_models, pre_tokenizers

    src = hf_model("llama").copy(tmp_path / "src")
    tok = Tokenizer(tok_models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(src / "tokenizer.json"))
    (src / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    (src / "special_tokens_map.json").write_text(json.dumps({"unk_token": "[UNK]"}))

    convert_cli(src, tmp_path / "ours")
    convert_cli(tmp_path / "ours", tmp_path / "back", "--to", "hf")
    for out in ("ours", "back"):
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
            assert (tmp_path / out / name).read_bytes() == (src / name).read_bytes(), f"{out}/{name}"
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "back"))
    assert loaded("hello world")["input_ids"] == [1, 2]


def test_tokenizer_fingerprint_is_stored_with_the_model(hf_model, tmp_path):
    """Issue 12, item 10: the tokenizer a model is saved with is recorded (fusion_jax.json / fusion_jax_export.json),
    so that a run or an evaluation given another tokenizer is refused."""
    from tiny_tokenizers import CODE_CORPUS, train_byte_level

    from fusion_jax.tokenizers import load_tokenizer

    src = hf_model("llama").copy(tmp_path / "src")
    train_byte_level(src / "tokenizer.json")
    fingerprint = load_tokenizer(src).fingerprint
    convert_cli(src, tmp_path / "ours")
    convert_cli(tmp_path / "ours", tmp_path / "back", "--to", "hf")
    assert json.loads((tmp_path / "ours" / "fusion_jax.json").read_text())["tokenizer"]["fingerprint"] == fingerprint
    marker = json.loads((tmp_path / "back" / "fusion_jax_export.json").read_text())
    assert marker["format"] == "fusion_jax.hf_export" and marker["tokenizer"]["fingerprint"] == fingerprint
    other = tmp_path / "other"
    other.mkdir()
    train_byte_level(other / "tokenizer.json", corpus=CODE_CORPUS)
    for model in ("ours", "back"):
        convert.check_tokenizer(tmp_path / model, tokenizer_path=src)
        with pytest.raises(CheckpointError, match=f"tokenizer={other} .* is not the tokenizer {tmp_path / model} was "
                                                  "saved with"):
            convert.check_tokenizer(tmp_path / model, tokenizer_path=other)


# 4. Bad input -------------------------------------------------------------------------------------------------------


def edit_config(path, **changes):
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


def assert_nothing_written(out):
    assert not os.path.exists(out) and not os.path.exists(f"{out}.partial")


def test_unsupported_model_type(hf_model, tmp_path):
    src = hf_model("llama").copy(tmp_path / "src")
    edit_config(src, model_type="bert")
    with pytest.raises(UnsupportedModelError) as e:
        convert_cli(src, tmp_path / "out")
    msg = str(e.value)
    assert "'bert'" in msg and "gpt_neox, llama, mistral, mpt, qwen2" in msg
    assert_nothing_written(tmp_path / "out")


def test_unsupported_mpt_variant(hf_model, tmp_path):
    src = hf_model("mpt").copy(tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    edit_config(src, attn_config={**config["attn_config"], "alibi": False})
    with pytest.raises(UnsupportedModelError, match="MPT variant is not supported.*alibi=false"):
        convert_cli(src, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def rewrite_weights(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor(hf_model, tmp_path):
    src = hf_model("llama").copy(tmp_path / "src")
    rewrite_weights(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensors \(1\): model\.layers\.1\.mlp\.up_proj\.weight$"):
        convert_cli(src, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")


def test_unexpected_tensor(hf_model, tmp_path):
    src = hf_model("qwen2").copy(tmp_path / "src")
    rewrite_weights(src, lambda t: t.update({"model.layers.0.self_attn.o_proj.bias": np.zeros(32, np.float32)}))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\): model\.layers\.0\.self_attn\.o_proj\.bias$"):
        convert_cli(src, tmp_path / "out")


def test_shape_mismatch(hf_model, tmp_path):
    src = hf_model("llama").copy(tmp_path / "src")
    edit_config(src, intermediate_size=40)
    with pytest.raises(CheckpointError) as e:
        convert.load(src)
    msg = str(e.value)
    for name, shape, implied in [
        ("model.layers.0.mlp.gate_proj.weight", [48, 32], [40, 32]),
        ("model.layers.1.mlp.down_proj.weight", [32, 48], [32, 40]),
    ]:
        assert f"{name} has shape {shape} but config.json implies {implied}" in msg


def test_non_float_tensor(hf_model, tmp_path):
    src = hf_model("llama").copy(tmp_path / "src")
    rewrite_weights(src, lambda t: t.update({"model.norm.weight": np.ones(32, np.int32)}))
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype I32"):
        convert.load(src)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="empty is not a model checkpoint: expected fusion_jax.json"):
        convert_cli(tmp_path / "empty", tmp_path / "out")
    with pytest.raises(CheckpointError, match="nowhere does not exist$"):
        convert.load(tmp_path / "nowhere")
    assert_nothing_written(tmp_path / "out")


def test_pytorch_bin_only(hf_model, tmp_path):
    src = hf_model("llama")
    d = tmp_path / "bin"
    d.mkdir()
    shutil.copy(src.path / "config.json", d)
    torch.save(src.model.state_dict(), d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match=r"PyTorch \.bin weights only; re-save it as safetensors"):
        convert_cli(d, tmp_path / "out")


def test_existing_output_is_kept_unless_overwrite(hf_model, tmp_path):
    src = hf_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(RunDirError, match=r"out: already exists \(not a model directory written by fusion_jax\).*"
                                          r"pass overwrite \(--set overwrite=true\)"):
        convert_cli(src.path, out)
    # overwrite replaces only what convert wrote: never a directory of someone else's files (issue 12, item 9)
    with pytest.raises(RunDirError, match="out: exists and is not a model directory written by fusion_jax .*refusing"):
        convert_cli(src.path, out, "--set", "overwrite=true")
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "precious"
    assert not os.path.exists(f"{out}.partial")

    (out / "keep.txt").unlink()  # an empty directory holds nothing to lose
    convert_cli(src.path, out, "--set", "overwrite=true")
    assert (out / "fusion_jax.json").exists()
    cfg, params = convert.load(out, compute_dtype="float32")
    np.testing.assert_allclose(our_logits(cfg, params), src.logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("to", ["fusion_jax", "hf"])
def test_overwrite_replaces_our_own_output_of_either_kind(hf_model, tmp_path, to):
    src = hf_model("llama")
    out = tmp_path / "out"
    convert_cli(src.path, out, "--to", to)
    marker = "fusion_jax.json" if to == "fusion_jax" else "fusion_jax_export.json"
    assert (out / marker).is_file()
    (out / "stale.txt").write_text("left by the earlier conversion")
    convert_cli(src.path, out, "--to", "hf" if to == "fusion_jax" else "fusion_jax", "--set", "overwrite=true")
    assert not (out / "stale.txt").exists() and not (out / marker).exists()


def test_overwrite_never_touches_the_source(hf_model, tmp_path):
    """OUT equal to SRC, a parent of SRC (the source and its siblings would be deleted: issue 12, item 9), or a
    directory inside SRC: refused before anything is read or written, even with overwrite."""
    parent = tmp_path / "models"
    src = hf_model("llama").copy(parent / "src")
    (parent / "sibling.txt").write_text("another model")
    convert_cli(src, parent / "fj")  # a fusion_jax dir of ours: parent/fj
    (parent / "fusion_jax.json").write_text((parent / "fj" / "fusion_jax.json").read_text())  # parent looks like ours
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    for out, problem in [(src, "is the input .*src itself"), (parent, "contains the input .*would delete the input"),
                         (src / "fj", "lies inside the input"), (tmp_path / "models" / ".." / "models", "contains")]:
        for to in ("fusion_jax", "hf"):
            with pytest.raises(RunDirError, match=problem):
                convert_cli(src, out, "--to", to, "--set", "overwrite=true")
    with pytest.raises(RunDirError, match="is the input .* itself"):  # the same directory, spelled another way
        convert_cli(parent / "fj", f"{parent}/./fj", "--set", "overwrite=true")
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
    assert_same_weights(from_pretrained(src), hf_model("llama").model)


def test_crash_mid_hf_write_leaves_only_partial(hf_model, tmp_path, monkeypatch):
    src = hf_model("llama")
    out = tmp_path / "out"
    real = convert.hf.write_hf_dir

    def crash(tmp, *args, **kwargs):
        (tmp / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
        raise OSError("disk full")

    monkeypatch.setattr(convert.hf, "write_hf_dir", crash)
    with pytest.raises(OSError, match="disk full"):
        convert_cli(src.path, out, "--to", "hf")
    assert not out.exists()
    assert (tmp_path / "out.partial" / "model-00001-of-00002.safetensors").exists()
    with pytest.raises(CheckpointError, match=r"out does not exist \(.*out\.partial exists: an earlier write crashed"):
        convert.load(out)

    monkeypatch.setattr(convert.hf, "write_hf_dir", real)
    convert_cli(src.path, out, "--to", "hf")
    assert not os.path.exists(f"{out}.partial")
    assert "model-00001-of-00002.safetensors" not in os.listdir(out)
    np.testing.assert_allclose(torch_logits(from_pretrained(out)), src.logits, rtol=0, atol=1e-5)


def test_crash_after_params_written_is_incomplete(hf_model, tmp_path, monkeypatch):
    src = hf_model("llama")
    out = tmp_path / "out"
    real = convert.checkpoint._copy_tokenizer

    def crash(*args):
        raise KeyboardInterrupt  # the params are on disk; fusion_jax.json is not

    monkeypatch.setattr(convert.checkpoint, "_copy_tokenizer", crash)
    with pytest.raises(KeyboardInterrupt):
        convert_cli(src.path, out)
    partial = tmp_path / "out.partial"
    assert not out.exists() and (partial / "params").is_dir() and not (partial / "fusion_jax.json").exists()
    with pytest.raises(CheckpointError, match="out does not exist .*out.partial exists"):
        convert_cli(out, tmp_path / "again")
    with pytest.raises(CheckpointError, match=r"out\.partial is an incomplete fusion_jax checkpoint \(no fusion_jax\.json\)"):
        convert.load(partial)

    monkeypatch.setattr(convert.checkpoint, "_copy_tokenizer", real)
    convert_cli(src.path, out)
    assert not partial.exists()
    cfg, params = convert.load(out, compute_dtype="float32")
    np.testing.assert_allclose(our_logits(cfg, params), src.logits, rtol=0, atol=1e-4)


# 5. Param dtype -----------------------------------------------------------------------------------------------------


def safetensors_dtypes(path) -> set[str]:
    dtypes = set()
    for name in shard_files(path):
        with safe_open(path / name, "np") as f:
            dtypes |= {f.get_slice(k).get_dtype() for k in f.keys()}
    return dtypes


def test_param_dtype_bfloat16(hf_model, tmp_path):
    src = hf_model("llama")
    convert_cli(src.path, tmp_path / "bf16", "--set", "param_dtype=bfloat16")
    cfg, params = convert.load(tmp_path / "bf16")
    assert cfg.param_dtype == "bfloat16"
    assert {x.dtype for x in jax.tree.leaves(params)} == {jax.numpy.dtype("bfloat16")}

    convert_cli(tmp_path / "bf16", tmp_path / "hf", "--to", "hf")
    assert safetensors_dtypes(tmp_path / "hf") == {"BF16"}
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    # The export holds exactly the original weights rounded to bfloat16.
    rounded = transformers.AutoModelForCausalLM.from_config(src.model.config).float().eval()
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in src.model.state_dict().items()})
    exported = from_pretrained(tmp_path / "hf")
    assert_same_weights(exported, rounded)
    np.testing.assert_allclose(torch_logits(exported), torch_logits(rounded), rtol=0, atol=1e-5)


def test_param_dtype_defaults_to_the_source_dtype(hf_model, tmp_path):
    src = hf_model("gpt_neox")
    src.model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16_src")
    src.model.float()
    assert safetensors_dtypes(tmp_path / "bf16_src") == {"BF16"}
    cfg, params = convert.load(tmp_path / "bf16_src")
    assert cfg.param_dtype == "bfloat16" and {x.dtype for x in jax.tree.leaves(params)} == {jax.numpy.dtype("bfloat16")}
    cfg, params = convert.load(tmp_path / "bf16_src", param_dtype="float32")
    assert {x.dtype for x in jax.tree.leaves(params)} == {jax.numpy.dtype("float32")}

    convert_cli(tmp_path / "bf16_src", tmp_path / "ours")
    cfg, params = convert.load(tmp_path / "ours")
    assert cfg.param_dtype == "bfloat16" and {x.dtype for x in jax.tree.leaves(params)} == {jax.numpy.dtype("bfloat16")}
    convert_cli(tmp_path / "ours", tmp_path / "f32", "--to", "hf", "--set", "param_dtype=float32")
    assert safetensors_dtypes(tmp_path / "f32") == {"F32"}


# 6. Sharded load on a mesh ------------------------------------------------------------------------------------------


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8)")
def test_load_on_2x4_mesh(hf_model, tmp_path):
    src = hf_model("llama")
    convert_cli(src.path, tmp_path / "ours")
    one = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    cfg, single = convert.load(tmp_path / "ours", mesh=one, compute_dtype="float32")
    expected = our_logits(cfg, single)
    np.testing.assert_allclose(expected, src.logits, rtol=0, atol=1e-4)

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    for path in (src.path, tmp_path / "ours"):
        cfg, params = convert.load(path, mesh=mesh, compute_dtype="float32")
        for leaf, shard_shape in [
            (params["embed"], (64, 8)),  # [V, D]: D over fsdp
            (params["lm_head"], (8, 64)),
            (params["layers"]["attn"]["q"], (2, 8, 4, 8)),  # [L, D, N, H]
            (params["layers"]["mlp"]["down"], (2, 48, 8)),
        ]:
            assert leaf.sharding.mesh.shape == {"data": 2, "fsdp": 4, "tensor": 1}
            assert not leaf.sharding.is_fully_replicated
            assert {s.data.shape for s in leaf.addressable_shards} == {shard_shape}
        np.testing.assert_allclose(our_logits(cfg, params), expected, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(params["embed"]), np.asarray(single["embed"]))


# 7. CLI -------------------------------------------------------------------------------------------------------------


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "fusion_jax.convert", *map(str, args)], capture_output=True, text=True, timeout=120
    )


def test_cli_help():
    r = run_cli("--help")
    assert r.returncode == 0, r.stderr
    assert "python -m fusion_jax.convert SOURCE OUTPUT" in r.stdout and "--to {fusion_jax,hf}" in r.stdout
    assert "config keys (--set KEY=VALUE):" in r.stdout
    for key in ("param_dtype", "overwrite", "max_shard_gb", "mesh.fsdp", "mesh.rules"):
        assert f"\n  {key} " in r.stdout, key
    # Defaults shown are the ones used: the convert mesh (data=1, fsdp=-1), not MeshConfig's own.
    assert re.search(r"\n  mesh\.data +int = 1 *\n  mesh\.fsdp +int = -1\n", r.stdout), r.stdout


def test_cli_reports_errors_without_traceback(tmp_path):
    r = run_cli(tmp_path / "nowhere", tmp_path / "out")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'nowhere'} does not exist"
    assert "Traceback" not in r.stderr
