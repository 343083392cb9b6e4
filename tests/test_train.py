"""The training job: a 2-step smoke test of every stage, the step on a 2×4 mesh vs one device, gradient
accumulation, kill -9 and resume with identical losses, a non-finite loss stopping the run, the dry run."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fusion_jax.experiments import run as experiment
from fusion_jax.config import schema
from fusion_jax import pipeline
from fusion_jax.convert import checkpoint
from fusion_jax.data.corpus import CorpusConfig
from fusion_jax.mesh import MeshConfig
from fusion_jax.models import decoder
from fusion_jax.config.model import ModelConfig
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
LINES = [
    "the quick brown fox jumps over the lazy dog", "hello world, hello there; the world is big",
    "café naïve résumé — déjà vu", "numbers 0123456789 and tabs\tand newlines", "fusion of large language models",
    "knowledge distillation by many teachers at once", "the world is big and the fox is quick",
    "sparse targets and sharded steps", "every teacher its own tokenizer", "bytes are the common ground",
] * 3


def _model(path: Path, tok_dir: Path, vocab: int, seed: int, **kw):
    cfg = ModelConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, compute_dtype="float32", **kw)
    checkpoint.save(path, cfg, decoder.init_params(cfg, jax.random.key(seed), std=0.2), model_type="llama",
                    tokenizer_dir=tok_dir)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    tgt_tok, src_tok = root / "tgt_tok", root / "src_tok"
    sp_model = train_sentencepiece(tgt_tok)
    (tgt_tok / "tokenizer.model").write_bytes(sp_model.read_bytes())
    src_tok.mkdir()
    train_byte_level(src_tok / "tokenizer.json")
    _model(root / "target", tgt_tok, load_tokenizer(tgt_tok).vocab_size, 0)
    _model(root / "source", src_tok, load_tokenizer(src_tok).vocab_size, 1)
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "domain": ["prose", "code"][i % 2]}) + "\n"
                              for i, t in enumerate(f"{line} {i}" for i, line in enumerate(LINES))))
    return root


@pytest.fixture(scope="module")
def prepared(assets, tmp_path_factory):
    """Documents and teacher caches made once (by the stages themselves) and shared by the tests that train."""
    root = tmp_path_factory.mktemp("prepared")
    cfg = config(assets, root / "run", cache_dir=str(root / "cache"))
    documents = pipeline.documents_stage(cfg)
    pipeline.capture_stage(cfg, documents)
    return {"data": dataclasses.replace(cfg.data, documents=documents), "cache_dir": cfg.cache_dir}


def config(assets: Path, run_dir: Path, **kw) -> schema.TrainConfig:
    base = schema.TrainConfig(
        run_dir=str(run_dir), target=str(assets / "target"), compute_dtype="float32",
        sources=(schema.TeacherConfig(name="src", checkpoint=str(assets / "source")),),
        data=schema.DataConfig(corpus=CorpusConfig(format="jsonl", paths=(str(assets / "corpus.jsonl"),),
                                                  domain_field="domain"),
                              max_tokens=40, validation_fraction=0.2),
        capture=schema.CaptureSettings(k=4, seq_len=48, batch_size=8, docs_per_shard=8, param_dtype="float32",
                                      compute_dtype="float32"),
        loader=schema.LoaderConfig(seq_len=32, global_batch_size=8, k=4),
        optimizer=schema.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0),
        train=schema.LoopConfig(steps=2, checkpoint_every=2, log_every=1, eval_batches=1, progress=False),
        mesh=MeshConfig(data=2, fsdp=4),
    )
    return dataclasses.replace(base, **kw)


def _train_losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            out[rec["step"]] = rec["loss"]  # a resumed run logs again: the later line wins
    return out


def test_smoke_every_stage(assets, tmp_path):
    run = tmp_path / "run"
    report = experiment.main(config(assets, run))
    assert report["steps"] == 2 and report["resumed_from"] == 0
    for p in ("documents/documents.json", "cache/target/train/manifest.json", "cache/src/validation/manifest.json",
              "checkpoints/2", "metrics.jsonl", "export/config.json", "report.json"):
        assert (run / p).exists(), p
    assert list((run / "tensorboard").iterdir())
    assert set(report["train"]["win_rate"]) == {"target", "src"}
    ev = report["eval"]
    assert ev["bits_per_byte"] > 0 and set(ev["domains"]) <= {"prose", "code"}
    assert np.isfinite([ev["clm"], ev["fusion"]]).all()
    losses = _train_losses(run)
    assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
    # Re-running the finished run does every stage's "already complete" path and keeps the results.
    again = experiment.main(config(assets, run))
    assert again["resumed_from"] == 2


def _one_step(assets, prepared, run_dir, mesh_cfg, **kw):
    """State and metrics after one step, on the shared documents and caches."""
    cfg = config(assets, run_dir, mesh=mesh_cfg, **prepared, **kw)
    from fusion_jax.data.loader import FusionLoader
    from fusion_jax.train.step import abstract_state, host_metrics, init_state, jit_train_step, make_train_step
    from fusion_jax import mesh as mesh_lib

    stages = config(assets, run_dir, **prepared)  # complete already: the stages only check
    documents = pipeline.documents_stage(stages)
    teachers = pipeline.capture_stage(stages, documents)
    n = mesh_cfg.data * mesh_cfg.fsdp * mesh_cfg.tensor
    mesh = mesh_lib.make_mesh(mesh_cfg, jax.devices()[:n])
    loader = FusionLoader(pipeline.loader_config(cfg, teachers, "train"), documents, str(assets / "target"),
                          mesh=mesh, rules=cfg.mesh.rules, progress=False)
    model_cfg, params = checkpoint.load(cfg.target, mesh, cfg.mesh.rules, param_dtype="float32",
                                        compute_dtype="float32")
    step_fn, opt = make_train_step(model_cfg, cfg.fusion, cfg.loss, cfg.optimizer, 10, cfg.mesh.rules)
    abstract = abstract_state(model_cfg, opt, mesh, cfg.mesh.rules)
    state = init_state(params, opt, abstract)
    state, m = jit_train_step(step_fn, abstract, loader.element_spec(), mesh)(state, next(loader))
    return jax.device_get(state["params"]), host_metrics(m)


def test_step_on_2x4_mesh_equals_one_device(assets, prepared, tmp_path):
    run = tmp_path / "run"
    # A small learning rate: Adam's first update is ±lr wherever |g| ≫ ε, so a larger one would only magnify
    # last-bit differences of tiny gradients.
    opt = schema.OptimizerConfig(learning_rate=1e-4, warmup_ratio=0.0)
    sharded, m8 = _one_step(assets, prepared, run, MeshConfig(data=2, fsdp=4), optimizer=opt)
    single, m1 = _one_step(assets, prepared, run, MeshConfig(data=1, fsdp=1), optimizer=opt)
    for k in ("loss", "clm", "fusion", "grad_norm"):
        np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(single)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_gives_the_same_step(assets, prepared, tmp_path):
    run = tmp_path / "run"
    opt = schema.OptimizerConfig(learning_rate=1e-4, warmup_ratio=0.0)
    p1, m1 = _one_step(assets, prepared, run, MeshConfig(data=2, fsdp=4), optimizer=opt)
    p4, m4 = _one_step(assets, prepared, run, MeshConfig(data=2, fsdp=4),
                       optimizer=dataclasses.replace(opt, accumulation=4))
    for k in ("loss", "clm", "fusion", "grad_norm"):
        np.testing.assert_allclose(m4[k], m1[k], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(p4), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def _cli(cfg: schema.TrainConfig) -> subprocess.Popen:
    path = Path(cfg.run_dir).with_suffix(".yaml")
    import yaml

    from fusion_jax.config import loader as config_loader

    path.write_text(yaml.safe_dump(config_loader.to_dict(cfg)))
    return subprocess.Popen([sys.executable, "-m", "fusion_jax.train", "--config", str(path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_and_resume_gives_the_same_losses(assets, prepared, tmp_path):
    long = dict(train=schema.LoopConfig(steps=8, checkpoint_every=2, log_every=1, eval_batches=1, progress=False,
                                       export=False), **prepared)
    straight = tmp_path / "straight"
    experiment.main(config(assets, straight, **long))
    expected = _train_losses(straight)
    run = tmp_path / "killed"
    proc = _cli(config(assets, run, **long))
    deadline = time.time() + 240
    while time.time() < deadline and not (run / "checkpoints" / "4").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run / "checkpoints").exists() and not (run / "report.json").exists()
    rerun = _cli(config(assets, run, **long))
    out, _ = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, out
    assert "resumed from" in out
    got = _train_losses(run)
    assert sorted(got) == sorted(expected)
    np.testing.assert_allclose([got[s] for s in sorted(got)], [expected[s] for s in sorted(expected)], rtol=1e-6)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(assets, prepared, tmp_path):
    run = tmp_path / "run"
    cfg = config(assets, run, optimizer=schema.OptimizerConfig(learning_rate=1e30, warmup_ratio=0.0, grad_clip=0.0),
                 train=schema.LoopConfig(steps=6, checkpoint_every=1, log_every=1, eval_batches=1, progress=False),
                 **prepared)
    with pytest.raises(FloatingPointError, match=r"step \d: the loss is not finite .* last good checkpoint is step \d"):
        experiment.main(cfg)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and all(np.isfinite(v) for s, v in _train_losses(run).items() if s in steps)


def test_dry_run_allocates_nothing_and_reports_bytes(assets, tmp_path, capsys):
    report = experiment.main(config(assets, tmp_path / "dry", dry_run=True))
    per = report["bytes_per_device"]
    params = report["params"]
    assert per["params"] * 8 >= params * 4 and per["opt_state"] >= per["params"]  # fsdp-sharded fp32, Adam μ and ν
    assert not (tmp_path / "dry").exists()


def test_clm_only_run_without_teachers(assets, prepared, tmp_path):
    """No sources and no target teacher with λ = 1: plain continued training, nothing captured; its CLM loss at
    step 1 equals the fusion run's (same start, same batch)."""
    with pytest.raises(ValueError, match="lm_weight=1.0"):
        config(assets, tmp_path / "bad", sources=(), target_as_teacher=False).validate()
    clm_cfg = config(assets, tmp_path / "clm", sources=(), target_as_teacher=False, data=prepared["data"],
                     loss=schema.LossConfig(lm_weight=1.0), train=schema.LoopConfig(
                         steps=1, checkpoint_every=1, log_every=1, eval_batches=1, progress=False, export=False))
    report = experiment.main(clm_cfg)
    assert report["train"]["win_rate"] == {} and report["train"]["fusion_tokens"] == 0
    assert np.isfinite(report["eval"]["bits_per_byte"]) and "cache" not in os.listdir(tmp_path / "clm")
    fused = experiment.main(dataclasses.replace(clm_cfg, run_dir=str(tmp_path / "fused"), cache_dir=prepared["cache_dir"],
                                           sources=config(assets, tmp_path).sources, target_as_teacher=True,
                                           loss=schema.LossConfig(lm_weight=0.9)))
    assert fused["train"]["clm"] == pytest.approx(report["train"]["clm"], rel=1e-6)
