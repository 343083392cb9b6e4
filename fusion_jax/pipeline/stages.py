"""The stages before training, each skipped when its output is complete: the teachers, the documents, their capture
into teacher caches, the loader's config per split, and the online teachers' frozen params."""

from __future__ import annotations

import dataclasses
import logging

import jax

from fusion_jax import mesh as mesh_lib
from fusion_jax.config import loader as config_loader
from fusion_jax.config.schema import CaptureConfig, LoaderConfig, PrepareConfig, TeacherConfig, TrainConfig
from fusion_jax.convert import checkpoint
from fusion_jax.data import capture, prepare
from fusion_jax.data.documents import SPLITS, read_meta
from fusion_jax.data.loader import FusionLoader
from fusion_jax.errors import InputError, RunDirError
from fusion_jax.files import as_path
from fusion_jax.fusion.online import OnlineTeacher, load_frozen
from fusion_jax.pipeline.identity import differing_keys
from fusion_jax.tokenizers import check_vocab_size, load_tokenizer

log = logging.getLogger(__name__)


def check_inputs(cfg: TrainConfig) -> None:
    """Every model, tokenizer and document path the config names exists, before any stage starts (a demo run's
    target and corpus are built, so only what the user added is checked there)."""
    named = [("target", cfg.target), ("target_tokenizer", cfg.target_tokenizer), ("data.documents", cfg.data.documents)]
    for i, s in enumerate(cfg.sources):
        named += [(f"sources[{i}].checkpoint", s.checkpoint), (f"sources[{i}].tokenizer", s.tokenizer)]
    missing = [(key, path) for key, path in named if path and not as_path(path).exists()]
    if missing:
        hint = (" (`make real-model` writes SmolLM2-135M-Instruct.Q4_1.gguf to ~/.cache/fusion_jax/models)"
                if any(path.endswith(".gguf") for _, path in missing) else "")
        raise InputError("not found: " + "; ".join(f"{key} = {path}" for key, path in missing)
                         + f": fix the path{hint}")


def teacher_list(cfg: TrainConfig) -> list[TeacherConfig]:
    caches = as_path(cfg.cache_dir) if cfg.cache_dir else as_path(cfg.run_dir) / "cache"
    out = [TeacherConfig(name="target", checkpoint=cfg.target, tokenizer=cfg.target_tokenizer, vocab_map="identity",
                        mode=cfg.target_teacher_mode)] if cfg.target_as_teacher else []
    out += list(cfg.sources)
    return [dataclasses.replace(s, cache=s.cache or str(caches / s.name)) for s in out]


def documents_stage(cfg: TrainConfig) -> str:
    if cfg.data.documents:
        return cfg.data.documents
    out = as_path(cfg.run_dir) / "documents"
    tokenizers = tuple(t.tokenizer or t.checkpoint for t in teacher_list(cfg))
    if not cfg.target_as_teacher:
        tokenizers = (cfg.target_tokenizer or cfg.target, *tokenizers)
    pcfg = PrepareConfig(corpus=cfg.data.corpus, tokenizers=tokenizers, max_tokens=cfg.data.max_tokens,
                         validation_fraction=cfg.data.validation_fraction, output=str(out))
    # Multi-host: process 0 prepares (the run_dir is shared), the others wait for it and read the same store.
    fresh = jax.process_index() == 0 and not (out / "documents.json").exists()
    if fresh:
        prepare.main(pcfg)
    mesh_lib.sync(f"fusion_jax:documents:{out}")
    if not fresh:
        have = prepare.normalised(read_meta(out).get("prepare", {}))
        want = prepare.normalised(config_loader.to_dict(pcfg))
        if have != want:
            raise RunDirError(f"{out} was prepared with other settings ({', '.join(differing_keys(have, want))} "
                              "differ); use another run_dir or delete the directory")
        log.info("documents: %s (already prepared)", out)
    return str(out)


def capture_stage(cfg: TrainConfig, documents: str) -> list[TeacherConfig]:
    teachers = teacher_list(cfg)
    for t in teachers:
        if t.mode == "online":  # runs inside the train step: nothing to capture
            continue
        for split in SPLITS:
            capture.main(CaptureConfig(
                **{f.name: getattr(cfg.capture, f.name) for f in dataclasses.fields(cfg.capture)},
                documents=documents, split=split, source=t.checkpoint, tokenizer=t.tokenizer,
                output=str(as_path(t.cache) / split), append_eos=cfg.loader.append_eos, mesh=cfg.mesh,
                allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch))
    return teachers


def loader_config(cfg: TrainConfig, teachers: list[TeacherConfig], split: str) -> LoaderConfig:
    """The loader's config for ``split``: each cached teacher reads ``<its cache>/<split>``."""
    specs = tuple(dataclasses.replace(t, cache="" if t.online else str(as_path(t.cache) / split)) for t in teachers)
    return dataclasses.replace(cfg.loader, teachers=specs)


def load_online(cfg: TrainConfig, teachers: list[TeacherConfig], loader: FusionLoader, mesh, rules):
    """The online teachers, loaded once (frozen, in their shards, ``capture.param_dtype``/``compute_dtype``) →
    (tuple of OnlineTeacher, frozen params and vocab maps) in config order; ((), None) when there are none."""
    online = [t for t in teachers if t.mode == "online"]
    if not online:
        return (), None
    for t in online:  # before any weight is read
        check_vocab_size(load_tokenizer(t.tokenizer or t.checkpoint), checkpoint.model_config(t.checkpoint).vocab_size,
                         t.checkpoint)
    maps = loader.vocab_maps()
    cfgs, frozen = load_frozen([t.checkpoint for t in online], [maps[t.name] for t in online], mesh, rules,
                               param_dtype=cfg.capture.param_dtype, compute_dtype=cfg.capture.compute_dtype)
    specs = tuple(OnlineTeacher(t, model=m, k=cfg.loader.k, topk=max(cfg.capture.k, cfg.loader.k))
                  for t, m in zip(online, cfgs))
    log.info("online teachers: %s (%s params, frozen)", ", ".join(t.name for t in online), cfg.capture.param_dtype)
    return specs, frozen
