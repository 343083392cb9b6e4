"""configs/fusellm_llama2_7b.yaml — the paper's setting — validated without weights.

The three checkpoints are Hugging Face directories holding exactly what a dry run reads: the real `config.json` of
Llama-2-7B, OpenLLaMA-7B-v2 and MPT-7B (their values, through transformers' config classes) and safetensors shards whose
headers name every tensor transformers' model has, with its shape and dtype, over sparse files (the data is never
read, so it takes no disk). `train --dry-run` on those gives the parameter count, each param's sharding and the bytes
per device, checked here against the values computed from the shapes.
"""

import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_jax.config import loader as config_loader
from fusion_jax.experiments import compare
from fusion_jax.experiments import run as experiment
from fusion_jax.config import schema
from fusion_jax.cli import train as train_cli
from fusion_jax import pipeline
from fusion_jax.convert import checkpoint, hf
from fusion_jax.convert.architectures import architecture

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "fusellm_llama2_7b.yaml"
ST_DTYPES = {"float16": ("F16", 2), "bfloat16": ("BF16", 2), "float32": ("F32", 4)}


# ------------------------------------------------------------------------------------------------ checkpoints


def _llama2_7b_config(**kw):
    base = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=32, rms_norm_eps=1e-5, max_position_embeddings=4096,
                hidden_act="silu", tie_word_embeddings=False, architectures=["LlamaForCausalLM"],
                torch_dtype="float16")
    import transformers

    return transformers.LlamaConfig(**{**base, **kw})


def _open_llama_7b_v2_config():
    # The same shapes as Llama-2-7B (its own tokenizer, 2048 positions); eps and positions do not affect the state.
    return _llama2_7b_config(max_position_embeddings=2048, rms_norm_eps=1e-6, pad_token_id=0)


def _mpt_7b_config():
    import transformers

    return transformers.MptConfig(d_model=4096, n_layers=32, n_heads=32, vocab_size=50432, expansion_ratio=4,
                                  max_seq_len=2048, no_bias=True, attn_config={"alibi": True, "alibi_bias_max": 8},
                                  architectures=["MPTForCausalLM"], torch_dtype="bfloat16")


def _hf_shapes(config) -> dict[str, tuple[int, ...]]:
    """Every tensor name and shape of transformers' model for `config`, built on the meta device (no memory);
    tied output embeddings are left out, as save_pretrained leaves them out."""
    import torch
    import transformers

    cls = {"llama": transformers.LlamaForCausalLM, "mpt": transformers.MptForCausalLM}[config.model_type]
    with torch.device("meta"):
        model = cls(config)
    tied = getattr(config, "tie_word_embeddings", False)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}


def _write_sparse_hf_dir(path: Path, config, shards: int = 2) -> dict[str, tuple[int, ...]]:
    """config.json + model.safetensors.index.json + `shards` safetensors files with real headers over sparse data."""
    path.mkdir(parents=True)
    cfg = config.to_dict()
    (path / "config.json").write_text(json.dumps(cfg, indent=1))
    shapes = _hf_shapes(config)
    st_dtype, itemsize = ST_DTYPES[str(cfg.get("dtype") or cfg.get("torch_dtype")).removeprefix("torch.")]
    names = list(shapes)
    per = math.ceil(len(names) / shards)
    weight_map, total = {}, 0
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        header, offset = {}, 0
        for name in names[s * per:(s + 1) * per]:
            n = math.prod(shapes[name]) * itemsize
            header[name] = {"dtype": st_dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + n]}
            offset += n
            weight_map[name] = fname
        header["__metadata__"] = {"format": "pt"}
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with open(path / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            f.truncate(8 + len(raw) + offset)  # a hole: no disk used, never read
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    return shapes


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {
        "target": (root / "Llama-2-7b-hf", _write_sparse_hf_dir(root / "Llama-2-7b-hf", _llama2_7b_config())),
        "openllama": (root / "open_llama_7b_v2",
                      _write_sparse_hf_dir(root / "open_llama_7b_v2", _open_llama_7b_v2_config())),
        "mpt": (root / "mpt-7b", _write_sparse_hf_dir(root / "mpt-7b", _mpt_7b_config())),
    }


def _overrides(ckpts, run_dir: Path, *extra: str) -> list[str]:
    sources = [a for i, n in enumerate(("openllama", "mpt")) for a in ("--set", f"sources[{i}].checkpoint={ckpts[n][0]}")]
    return ["--set", f"target={ckpts['target'][0]}", *sources,
            "--set", f"run_dir={run_dir}", *[a for e in extra for a in ("--set", e)]]


# ------------------------------------------------------------------------------------------------ expected values

# Llama-2-7B from its config: V = 32,000, D = 4096, F = 11,008, L = 32, 32 heads of 128 (no GQA), untied lm_head.
V, D, F, L = 32000, 4096, 11008, 32
LLAMA2_7B_PARAMS = (V * D                            # embed_tokens
                    + L * (4 * D * D                 # q, k, v, o
                           + 3 * D * F               # gate, up, down
                           + 2 * D)                  # input / post-attention RMSNorm
                    + D                              # final norm
                    + D * V)                         # lm_head
assert LLAMA2_7B_PARAMS == 6_738_415_616


def expected_bytes_per_device(n_params: int, n_fsdp: int) -> dict[str, int]:
    """float32 master weights + AdamW's two float32 moments, every leaf split n_fsdp ways on its hidden (4096) axis:
        params    = 4 B · P / N
        opt_state = 2 · 4 B · P / N  +  8 B   (μ, ν; two replicated int32 counts: Adam's and the schedule's)
        step      = 4 B                       (the int32 step, replicated)"""
    assert D % n_fsdp == 0 and n_params % n_fsdp == 0
    return {"step": 4, "params": 4 * n_params // n_fsdp, "opt_state": 8 * n_params // n_fsdp + 8}


def _check_dry_run(report: dict, shapes: dict[str, tuple[int, ...]], n_devices: int) -> None:
    # Parameter count: the model's, the one computed from the config, and transformers' (meta device) agree.
    assert report["params"] == LLAMA2_7B_PARAMS == sum(math.prod(s) for s in shapes.values())
    assert abs(report["params"] - 6.74e9) < 0.01e9
    assert report["mesh"] == {"data": 1, "fsdp": n_devices, "tensor": 1}

    # Bytes per device, exactly: 12·P/N + 12.
    per = report["bytes_per_device"]
    assert per == expected_bytes_per_device(LLAMA2_7B_PARAMS, n_devices)
    assert sum(per.values()) == 12 * LLAMA2_7B_PARAMS // n_devices + 12

    # Every param leaf is split n_devices ways (no replicated 7B matrix); only the three int32 counters are whole.
    leaves = report["param_shardings"]
    assert sum(math.prod(v["shape"]) for v in leaves.values()) == LLAMA2_7B_PARAMS
    for name, leaf in leaves.items():
        assert leaf["dtype"] == "float32", name
        assert math.prod(leaf["shard_shape"]) * n_devices == math.prod(leaf["shape"]), (name, leaf)
    assert report["replicated"] == {"leaves": 3, "bytes": 12}
    largest_leaf = max(math.prod(v["shape"]) for v in leaves.values()) * 4       # the stacked MLP matrices, f32
    assert largest_leaf == L * D * F * 4
    assert report["largest_leaf_per_device"]["bytes"] == largest_leaf // n_devices

    # The embedding and a layer matrix: split on the hidden axis over fsdp (vocab and heads would go to `tensor`).
    assert leaves["embed"]["shape"] == [V, D] and leaves["embed"]["spec"] == [None, "fsdp"]
    assert leaves["embed"]["shard_shape"] == [V, D // n_devices]
    assert leaves["layers/attn/q"]["shape"] == [L, D, 32, 128]
    assert leaves["layers/attn/q"]["spec"] == [None, "fsdp", None, None]
    assert leaves["layers/mlp/down"]["spec"] == [None, None, "fsdp"]
    assert leaves["lm_head"]["spec"] == ["fsdp", None]

    # TeacherRows: the target (teacher 0) and both sources are cached, so no teacher params live on the devices.
    assert report["teachers"] == {"target": "cached", "openllama": "cached", "mpt": "cached"}
    assert not [k for k in per if k.startswith("online/")]


# ------------------------------------------------------------------------------------------------ tests


def test_yaml_is_the_papers_setting():
    cfg = config_loader.load(schema.TrainConfig, str(CONFIG))
    # fusellm.md §1/§2: k = 10, λ = 0.9, 128 × 2048, lr 1e-5, MinCE (per block), one epoch over ≈ 1.8e9 tokens.
    assert cfg.capture.k == cfg.loader.k == 10
    assert cfg.loss.lm_weight == 0.9 and cfg.loss.lm_weight_schedule == "constant" and cfg.loss.fusion_loss == "ce"
    assert cfg.loader.global_batch_size == 128 and cfg.loader.seq_len == cfg.capture.seq_len == 2048
    assert cfg.optimizer.learning_rate == 1e-5
    assert (cfg.fusion.method, cfg.fusion.granularity) == ("min_ce", "sequence")
    assert cfg.fusion.teacher_temperature == 1.0
    # The official training flags: warmup 0.008 + cosine, AdamW β = (0.9, 0.95), weight decay 0.1, clip 1.0, bf16.
    o = cfg.optimizer
    assert (o.schedule, o.warmup_ratio, o.min_lr_ratio) == ("cosine", 0.008, 0.0)
    assert (o.b1, o.b2, o.eps, o.weight_decay, o.grad_clip) == (0.9, 0.95, 1e-8, 0.1, 1.0)
    assert (cfg.param_dtype, cfg.compute_dtype, cfg.capture.param_dtype) == ("float32", "bfloat16", "bfloat16")
    assert cfg.train.steps == int(1.8e9 // (128 * 2048)) == 6866
    assert cfg.remat == "full"
    # TeacherRows: Llama-2 itself first, then OpenLLaMA-7B-v2 and MPT-7B, all cached; MiniPile as a datasets directory.
    assert cfg.target_as_teacher and cfg.target_teacher_mode == "cached"
    assert [s.name for s in cfg.sources] == ["openllama", "mpt"] and all(s.mode == "cached" for s in cfg.sources)
    assert [t.name for t in pipeline.teacher_list(cfg)] == ["target", "openllama", "mpt"]
    assert cfg.data.corpus.format == "hf" and cfg.data.max_tokens == 2000
    assert (cfg.mesh.data, cfg.mesh.fsdp) == (1, -1)
    # the paper's recipe: the report compares nothing more (compare.paper_config leaves it as it is)
    assert all(not s.continuation and not s.in_context for s in cfg.sources) and cfg.loss.likelihood_weight == 0
    assert compare.paper_config(cfg) == cfg


def test_paper_config_resets_the_recipe_only():
    cfg = config_loader.load(schema.TrainConfig, str(CONFIG), [
        "loss.lm_weight=0.0", "loss.lm_weight_schedule=hard_and_decay", "loss.likelihood_weight=0.5",
        "fusion.granularity=token", "fusion.teacher_temperature=2.0", "sources[0].continuation=true",
        "sources[1].in_context=true", "loader.k=5", "train.steps=7"])
    paper = compare.paper_config(cfg)
    assert paper == compare.paper_config(config_loader.load(schema.TrainConfig, str(CONFIG),
                                                            ["loader.k=5", "train.steps=7"]))
    assert (paper.loader.k, paper.train.steps) == (5, 7)  # everything but the recipe is kept


def test_sources_are_loadable_checkpoints(ckpts):
    """Both sources' directories map onto our architectures: every tensor name and shape is what the loader expects."""
    for name, (path, _) in ckpts.items():
        ckpt = hf.HFCheckpoint(path)
        cfg = checkpoint.model_config(path)
        hf.check_tensors(ckpt, cfg, architecture(ckpt.model_type).groups(cfg))
        assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads) == (4096, 32, 32), name
    mpt = checkpoint.model_config(ckpts["mpt"][0])
    assert (mpt.vocab_size, mpt.intermediate_size, mpt.position, mpt.tie_embeddings) == (50432, 16384, "alibi", True)


def test_dry_run_8_devices(ckpts, tmp_path):
    """In process, on the 8 fake CPU devices (fsdp = 8: the 8-GPU layout)."""
    import jax

    assert jax.device_count() == 8
    run_dir = tmp_path / "run"
    report = experiment.main(train_cli.parse(["--config", str(CONFIG), "--dry-run", *_overrides(ckpts, run_dir)]))
    _check_dry_run(report, ckpts["target"][1], 8)
    assert report["bytes_per_device"] == {"step": 4, "params": 3_369_207_808, "opt_state": 6_738_415_624}
    assert not run_dir.exists()  # nothing written, nothing allocated


def test_dry_run_cli_v4_64_layout(ckpts, tmp_path):
    """The user's command in a subprocess, on 32 fake CPU devices with the TPU v4-64 mesh (32 chips,
    mesh.data=1 mesh.fsdp=32, docs/scaling.md §7): its stdout is the JSON report."""
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=32", "JAX_PLATFORMS": "cpu",
           "HF_HUB_OFFLINE": "1"}
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "fusion_jax.train", "--config", str(CONFIG), "--dry-run",
            *_overrides(ckpts, run_dir, "mesh.data=1", "mesh.fsdp=32")]
    proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    _check_dry_run(report, ckpts["target"][1], 32)
    assert report["bytes_per_device"] == {"step": 4, "params": 842_301_952, "opt_state": 1_684_603_912}
    assert not run_dir.exists()
