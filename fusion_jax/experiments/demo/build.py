"""The demo's assets, built at run time and cached under ``<run_dir>/assets``: what a user brings to a real run.

1. ``corpus/``: ``code.jsonl`` and ``prose.jsonl`` from the running Python installation (``demo/corpus.py``), and
   ``mix.jsonl``, the first ``mix_bytes`` of each (they are in hash order, so a random subset), interleaved: the
   fusion run's corpus. Train and held-out documents are split by a hash of the document id (``split_of``), the same
   in every stage, so no model ever trains on a held-out document.
2. ``tokenizers/<model>/``: each model's tokenizer, trained on the train split of the text it is pretrained on.
3. ``init/<model>/``: a random initialisation in our format, with its Hugging Face model type (Llama, MPT, GPT-NeoX).
4. ``pretrain/<model>/``: a CLM-only run of ``fusion_jax.pipeline`` (no teachers, λ = 1) on the model's domain;
   its export moves to ``hf/<model>/``, a Hugging Face checkpoint directory (safetensors, config.json, tokenizer):
   the sources enter the fusion run from there through ``convert``, exactly as a user's checkpoints do, and the
   target starts from its own.

Every step writes a ``stage.json`` with its settings; a rerun skips a step whose settings match and stops with the
differing keys when they don't (use another ``run_dir`` or delete that directory).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Callable

import jax

from fusion_jax import pipeline
from fusion_jax.config import loader as config_loader
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import (
    CorpusConfig,
    DataConfig,
    DemoConfig,
    DemoModel,
    LossConfig,
    OptimizerConfig,
    TeacherConfig,
    TrainConfig,
)
from fusion_jax.convert import checkpoint
from fusion_jax.convert.architectures import architecture
from fusion_jax.data.corpus import split_of
from fusion_jax.errors import ConfigError, RunDirError
from fusion_jax.experiments.demo import tokenizers
from fusion_jax.experiments.demo.corpus import write_stdlib_corpus
from fusion_jax.files import atomic_write_text, commit_directory, json_dumps, read_json
from fusion_jax.models import decoder
from fusion_jax.tokenizers import load_tokenizer

log = logging.getLogger("fusion_jax.experiments.demo")


@dataclasses.dataclass(frozen=True)
class Assets:
    """Paths of the built assets."""

    code: str
    prose: str
    mix: str
    target: str                 # the pretrained target's Hugging Face export
    sources: dict[str, str]     # name → Hugging Face export


# ------------------------------------------------------------------------------------------------ stages


def _stage(directory: Path, settings: dict, comparable: Callable[[dict], dict] = lambda s: s) -> bool:
    """True when ``directory`` holds a finished stage with these settings (as ``comparable`` sees them: it drops what
    may change and normalises paths); raise, naming the keys, when they differ."""
    marker = directory / "stage.json"
    if not marker.exists():
        return False
    have = comparable(read_json(marker, RunDirError, fix="delete that directory to build it again"))
    want = comparable(settings)
    if have != want:
        keys = ", ".join(pipeline.differing_keys(have, want))
        raise RunDirError(f"{directory} was built with other settings ({keys} differ); use another run_dir or delete "
                          "that directory")
    return True


def _done(directory: Path, settings: dict) -> None:
    atomic_write_text(directory / "stage.json", json_dumps(settings, indent=1, sort_keys=True))


def corpus_stage(demo: DemoConfig, out: Path, validation_fraction: float) -> tuple[Path, Path, Path]:
    """→ (code.jsonl, prose.jsonl, mix.jsonl) under ``out``."""
    settings = {"seed": demo.seed, "code_bytes": demo.code_bytes, "prose_bytes": demo.prose_bytes,
                "mix_bytes": demo.mix_bytes, "max_document_bytes": demo.max_document_bytes,
                "validation_fraction": validation_fraction}
    paths = out / "code.jsonl", out / "prose.jsonl", out / "mix.jsonl"
    if _stage(out, settings):
        return paths
    out.mkdir(parents=True, exist_ok=True)
    summary = write_stdlib_corpus(out, code_bytes=demo.code_bytes, prose_bytes=demo.prose_bytes,
                                  max_document_bytes=demo.max_document_bytes, seed=demo.seed)
    write_mix(paths[:2], paths[2], demo.mix_bytes)
    log.info("demo corpus: %s", json.dumps(summary))
    _done(out, settings)
    return paths


def write_mix(domain_files: tuple[Path, ...], out: Path, bytes_per_domain: int) -> None:
    """The first ``bytes_per_domain`` UTF-8 bytes of documents of each file (whole documents, at least one),
    interleaved one by one → ``out`` (JSON lines, written atomically)."""
    picked = []
    for path in domain_files:
        lines, total = [], 0
        for line in path.read_text(encoding="utf-8").splitlines():
            if lines and total >= bytes_per_domain:
                break
            lines.append(line)
            total += len(json.loads(line)["text"].encode("utf-8"))
        picked.append(lines)
    mixed = [line for group in _interleave(picked) for line in group]
    atomic_write_text(out, "".join(line + "\n" for line in mixed))


def _interleave(lists: list[list[str]]):
    for i in range(max(map(len, lists))):
        yield [lst[i] for lst in lists if i < len(lst)]


def _train_texts(files: list[Path], validation_fraction: float):
    for path in files:
        with open(path, encoding="utf-8") as f:
            for line in f:
                rec = json.loads(line)
                if split_of(rec["id"], validation_fraction) == "train":
                    yield rec["text"]


def _domain_files(model: DemoModel, code: Path, prose: Path) -> list[Path]:
    return {"code": [code], "prose": [prose], "mix": [code, prose]}[model.domain]


def tokenizer_stage(model: DemoModel, files: list[Path], out: Path, validation_fraction: float) -> Path:
    settings = {"tokenizer": model.tokenizer, "vocab_size": model.vocab_size, "domain": model.domain,
                "validation_fraction": validation_fraction}
    if _stage(out, settings):
        return out
    if out.exists():
        shutil.rmtree(out)
    texts = _train_texts(files, validation_fraction)
    if model.tokenizer == "sentencepiece":
        tokenizers.train_sentencepiece_bpe(texts, out, model.vocab_size)
    else:
        tokenizers.train_byte_level_bpe(texts, out, model.vocab_size,
                                         split_digits=model.tokenizer == "byte_level_digits")
    _done(out, settings)
    return out


def model_config(model: DemoModel, vocab_size: int) -> ModelConfig:
    """The demo model's ModelConfig in its family's conventions (as its HF config would say)."""
    h = model.hidden_size
    common = dict(vocab_size=vocab_size, hidden_size=h, num_layers=model.num_layers, num_heads=model.num_heads,
                  num_kv_heads=model.num_heads)
    if model.architecture == "llama":
        return ModelConfig(**common, intermediate_size=_multiple(8 * h // 3, 32), norm="rms", norm_eps=1e-5,
                           mlp="gated", activation="silu")
    if model.architecture == "mpt":
        return ModelConfig(**common, intermediate_size=4 * h, norm="layer", norm_eps=1e-5, mlp="plain",
                           activation="gelu", tie_embeddings=True, position="alibi")
    if model.architecture == "gpt_neox":
        return ModelConfig(**common, intermediate_size=4 * h, norm="layer", norm_bias=True, norm_eps=1e-5,
                           mlp="plain", activation="gelu", mlp_bias=True, qkv_bias=True, out_bias=True,
                           parallel_residual=True, rotary_fraction=0.25)
    raise ConfigError(f"{model.name}: architecture must be one of ('llama', 'mpt', 'gpt_neox'), got {model.architecture!r}")


def _multiple(x: int, m: int) -> int:
    return max(m, (x + m - 1) // m * m)


def init_stage(model: DemoModel, tokenizer_dir: Path, out: Path, seed: int, max_len: int) -> Path:
    """A random initialisation in our format, with the HF model type and config it exports to."""
    settings = {**config_loader.to_dict(model), "seed": seed, "max_len": max_len}
    if _stage(out, settings):
        return out
    cfg = model_config(model, load_tokenizer(tokenizer_dir).vocab_size)
    cfg.validate()
    arch = architecture(model.architecture)
    hf_config = {**arch.config_to_hf(cfg), "max_position_embeddings": max_len}
    if model.architecture == "mpt":
        hf_config["max_seq_len"] = max_len
    params = decoder.init_params(cfg, jax.random.key(seed))
    checkpoint.save(out / "model", cfg, params, model_type=model.architecture, hf_config=hf_config,
                    tokenizer_dir=tokenizer_dir, overwrite=True)
    _done(out, settings)
    return out


def pretrain_config(base: TrainConfig, model: DemoModel, init: Path, files: list[Path], run_dir: Path) -> TrainConfig:
    """A CLM-only ``TrainConfig`` (no teachers, λ = 1) that pretrains ``model`` from ``init`` on ``files``."""
    demo = base.demo
    corpus = CorpusConfig(format="jsonl", paths=tuple(str(f) for f in files), id_field="id", domain_field="domain")
    return TrainConfig(
        run_dir=str(run_dir), target=str(init / "model"), target_as_teacher=False, sources=(),
        param_dtype="float32", compute_dtype=base.compute_dtype,
        data=DataConfig(corpus=corpus, max_tokens=base.data.max_tokens,
                              validation_fraction=base.data.validation_fraction),
        loader=dataclasses.replace(base.loader, teachers=(), seq_len=demo.pretrain_seq_len,
                                   global_batch_size=demo.pretrain_batch_size, seed=demo.seed),
        loss=LossConfig(lm_weight=1.0),
        optimizer=OptimizerConfig(learning_rate=model.learning_rate, schedule="cosine", warmup_ratio=0.05,
                                  min_lr_ratio=0.1, b2=0.99, weight_decay=0.01),
        train=dataclasses.replace(base.train, steps=model.steps, checkpoint_every=max(model.steps // 2, 1),
                                  eval_every=0, export=True),
        mesh=base.mesh,
    )


def pretrain_stage(base: TrainConfig, model: DemoModel, init: Path, files: list[Path], run_dir: Path) -> Path:
    """Pretrain (resumable: the run's own checkpoints) → its Hugging Face export directory."""
    cfg = pretrain_config(base, model, init, files, run_dir)
    settings = config_loader.to_dict(cfg)
    settings.pop("train")  # progress, logging and eval settings don't change the weights
    settings["steps"] = model.steps
    hf_dir = run_dir.parent.parent / "hf" / model.name
    # Compared as the run's identity: another mesh, or the same run_dir given relative and absolute, is the same run.
    if _stage(run_dir, settings, pipeline.run_identity):
        return hf_dir
    log.info("demo: pretraining %s (%s, %s) on %s for %d steps", model.name, model.architecture, model.tokenizer,
             model.domain, model.steps)
    pipeline.main(cfg)
    if hf_dir.exists():  # left by a crash between the move and the marker
        shutil.rmtree(hf_dir)
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    commit_directory(run_dir / "export", hf_dir)
    _done(run_dir, settings)
    return hf_dir


def build(cfg: TrainConfig) -> Assets:
    """Every asset of the demo under ``<run_dir>/assets`` (each step cached; see the module docstring)."""
    demo: DemoConfig = cfg.demo
    root = Path(cfg.run_dir) / "assets"
    vf = cfg.data.validation_fraction
    code, prose, mix = corpus_stage(demo, root / "corpus", vf)
    max_len = max(demo.pretrain_seq_len, cfg.loader.seq_len, cfg.capture.seq_len)
    exports = {}
    for i, model in enumerate((demo.target, *demo.sources)):
        files = _domain_files(model, code, prose)
        tok = tokenizer_stage(model, files, root / "tokenizers" / model.name, vf)
        init = init_stage(model, tok, root / "init" / model.name, demo.seed * 1000 + i, max_len)
        exports[model.name] = str(pretrain_stage(cfg, model, init, files, root / "pretrain" / model.name))
    return Assets(code=str(code), prose=str(prose), mix=str(mix), target=exports[demo.target.name],
                  sources={m.name: exports[m.name] for m in demo.sources})


def apply(cfg: TrainConfig) -> TrainConfig:
    """The TrainConfig with the built demo's target and corpus filled in, and its sources before the config's own
    (the fusion run's inputs)."""
    assets = build(cfg)
    ctx = cfg.demo.in_context
    demo_sources = tuple(TeacherConfig(name=name, checkpoint=path, continuation=ctx, in_context=ctx,
                                       tail="next_token" if ctx else "renormalize")
                         for name, path in assets.sources.items())
    sources = demo_sources + cfg.sources
    corpus = CorpusConfig(format="jsonl", paths=(assets.mix,), id_field="id", domain_field="domain")
    return dataclasses.replace(cfg, target=assets.target, target_tokenizer="", sources=sources,
                               data=dataclasses.replace(cfg.data, documents="", corpus=corpus))
