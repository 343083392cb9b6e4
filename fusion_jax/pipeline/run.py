"""python -m fusion_jax.train --config FILE — the fusion run, every stage it needs, each resumable.

Stages, each skipped when its output is already complete (so re-running after a crash continues where it stopped):

0. with ``demo.enabled`` (``configs/demo.yaml``): the demo's corpus, tokenizers and pretrained models
   (``fusion_jax/demo/build.py``), which then fill ``target``, ``sources`` and ``data.corpus``;
1. documents: ``data.documents``, or prepared from ``data.corpus`` into ``<run_dir>/documents``;
2. capture: every cached teacher (the target itself when ``target_as_teacher`` — the paper's setting — then
   ``sources``) over the train and validation documents into ``<cache>/{train,validation}`` (``fusion_jax.data.capture``);
   an online teacher (``mode: online``) is not captured: its params are loaded once (frozen, sharded, in
   ``capture.param_dtype``) and it runs inside the train step on the source tokens the loader ships
   (``fusion_jax/online.py``);
3. train: the loader aligns the teachers to the target's blocks; the jitted, sharded step fuses them and trains the
   target on ``λ·CLM + (1−λ)·fusion``; Orbax checkpoints every ``train.checkpoint_every`` steps (restored with the
   loader's state, so a resumed run sees exactly the batches it would have seen; a damaged newest checkpoint falls
   back to the one before it); a non-finite loss, or a run that stops learning (``train.stall_steps``), stops the
   run with nothing exported;
4. evaluate: every ``train.eval_every`` steps and at the end, held-out bits per byte per domain, CLM and fusion loss
   and per-teacher win rates;
5. export: the trained target as a Hugging Face checkpoint in ``<run_dir>/export`` (the step it holds in its
   marker: an export of an earlier step is replaced);
6. with ``baseline``: the CLM baseline in ``<run_dir>/clm``, the sources and the starting target scored on the same
   held-out documents, the alignment audit, and ``report.md`` with plots (``fusion_jax/compare.py``).

With no teachers (no sources, ``target_as_teacher: false``) and ``loss.lm_weight: 1`` the run is plain CLM training.

The run directory is the run's: ``<run_dir>/run_config.json`` records the settings that define it (not logging,
evaluation, mesh or paths' spelling: :data:`NOT_IDENTITY`) before anything else is written, and a rerun with other
settings is refused naming the keys; ``--set train.extend=true`` continues a run to another ``train.steps``
(:func:`schedule_optimizer` says what that means for the schedule). A directory that holds a model or files not of
a run is refused, and one command at a time holds a run directory (a lock; a second one fails at once).

Metrics go to ``<run_dir>/metrics.jsonl`` (strict JSON: NaN as null) and TensorBoard event files in
``<run_dir>/tensorboard``. ``--dry-run`` builds the sharded state abstractly and prints bytes per device without
allocating anything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import numpy as np

from fusion_jax import mesh as mesh_lib
from fusion_jax.config import loader as config_loader
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import CaptureConfig, LoaderConfig, OptimizerConfig, TeacherConfig, TrainConfig
from fusion_jax.data.loader import FusionLoader
from fusion_jax.errors import RunDirError, UserError
from fusion_jax.files import LOCK_FILE, DirectoryLock, atomic_write_json, json_dumps, read_json
from fusion_jax.models import decoder

log = logging.getLogger("fusion_jax.pipeline.run")
SPLITS = ("train", "validation")

# Dense bf16 peak FLOP/s per chip, for MFU (override with train.peak_flops).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12}


# ------------------------------------------------------------------------------------------------ the run directory

RUN_CONFIG = "run_config.json"  # the run's marker and identity; named so that it never collides with a model file
LEGACY_RUN_CONFIG = "config.json"  # what runs wrote before run_config.json (a model's file name: see _check_run_dir)
RUN_FORMAT = "fusion_jax.run"
RUN_VERSION = 1
EXPORT_STEP = "run_step"  # the key, in an export's marker (checkpoint.EXPORT_MARKER), of the step it holds

# Keys of the config that change how a run is watched, evaluated, laid out on the devices or fed, but not what it
# computes: they may change between invocations of one run (a run resumes on another mesh, with accumulation for
# memory, more or fewer evaluations). Every other key defines the run.
NOT_IDENTITY = (
    "run_dir", "dry_run", "baseline", "remat", "mesh", "allow_tokenizer_mismatch",
    "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.eval_documents", "train.peak_flops", "train.export", "train.progress", "train.extend", "train.stall_steps",
    "capture.batch_size", "optimizer.accumulation", "loss.chunk_size",
    "loader.worker_count", "loader.prefetch", "loader.cache_dir", "loader.doc_cache", "loader.verify",
)
# What the demo fills in from its own settings (which its stages check): not part of a demo run's identity.
DEMO_FILLED = ("target", "target_tokenizer", "sources", "data.documents", "data.corpus")


class TrainingError(UserError, FloatingPointError):
    """The run diverged (a non-finite loss) or stopped learning: settings to change (learning rate, clipping), not a
    bug, so one ``error:`` line. A FloatingPointError too, for callers that catch that."""


def _not_learning(metrics: dict, uniform_loss: float) -> bool:
    """A step of a run that stopped learning: no gradient at all, or a CLM loss at ln V — a uniform prediction, which
    a trained model never makes and an untrained one leaves within a few steps (float32 round-off allowed)."""
    return metrics["grad_norm"] == 0.0 or abs(metrics["clm"] - uniform_loss) <= 1e-5 * uniform_loss


def _stall_message(cfg: TrainConfig, steps: list[int], uniform_loss: float, ckpts) -> str:
    before = [s for s in ckpts.manager.all_steps() if s < steps[0]]
    where = (f"the newest checkpoint from before it is step {max(before)} in {ckpts.directory}" if before
             else "no checkpoint from before it is kept")
    return (f"the run stopped learning: for {len(steps)} steps in a row (steps {steps[0]}–{steps[-1]}) the gradient "
            f"norm was exactly 0 or the CLM loss sat at ln V = {uniform_loss:.4f}, the loss of a uniform prediction. "
            f"That is what a learning rate far too high does (optimizer.learning_rate={cfg.optimizer.learning_rate:g}, "
            f"optimizer.grad_clip={cfg.optimizer.grad_clip:g}): the weights blew up and the model collapsed. Stopped "
            f"without exporting it; {where}. Start again with a lower optimizer.learning_rate (and check "
            f"optimizer.grad_clip; 0 turns clipping off) in another run_dir, or delete {cfg.run_dir}. "
            "train.stall_steps=0 turns this check off")


def _differences(have: Any, want: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, have, want) wherever two settings trees differ; dicts by key, equally long lists item by item."""
    if isinstance(have, dict) and isinstance(want, dict):
        return [d for k in sorted(set(have) | set(want), key=str)
                for d in _differences(have.get(k), want.get(k), f"{key}.{k}" if key else str(k))]
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want) and have != want:
        return [d for i, (a, b) in enumerate(zip(have, want)) for d in _differences(a, b, f"{key}[{i}]")]
    return [] if have == want else [(key or "(settings)", have, want)]


def differing_keys(have: Any, want: Any) -> list[str]:
    """The dotted keys (``optimizer.learning_rate``, ``sources[1].checkpoint``) whose values differ between two
    settings trees: what the refusals of a changed run, document store or demo stage name."""
    return [k for k, _, _ in _differences(have, want)]


def _absolute(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path))) if path else path


def run_identity(settings: dict) -> dict:
    """The settings that define a run: ``config_loader.to_dict(cfg)`` (or a run's recorded config) without the keys
    of :data:`NOT_IDENTITY`, with local paths absolute, so that a run given ``corpus.jsonl`` once and
    ``./corpus.jsonl`` (or a relative and an absolute run_dir) the next time is the same run."""
    from fusion_jax.data import prepare

    out = json.loads(json_dumps(settings))
    demo = out.get("demo")
    for key in NOT_IDENTITY + (DEMO_FILLED if isinstance(demo, dict) and demo.get("enabled") else ()):
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    for key in ("target", "target_tokenizer", "cache_dir"):
        if isinstance(out.get(key), str):
            out[key] = _absolute(out[key])
    for source in out.get("sources") or ():
        for key in ("checkpoint", "tokenizer", "cache"):
            if isinstance(source, dict) and isinstance(source.get(key), str):
                source[key] = _absolute(source[key])
    data = out.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("documents"), str):
            data["documents"] = _absolute(data["documents"])
        if isinstance(data.get("corpus"), dict):
            data["corpus"] = prepare.normalised({"corpus": data["corpus"]})["corpus"]
    return out


def schedule_optimizer(opt: OptimizerConfig, steps: int, warmup: int) -> OptimizerConfig:
    """``opt`` with its schedule over ``steps`` steps and a warmup of exactly ``warmup`` steps.

    What "more steps" means for an extended run (``train.extend``): the schedule's length is part of the optimizer,
    so a run of 4 steps extended to 8 cannot continue "its" schedule, which ended at step 4. Its steps 5–8 follow the
    schedule of an 8-step run instead — the decay (and a λ schedule) spans the new total — but the warmup keeps the
    length the run started with (recorded in run_config.json): ``warmup_ratio × 8`` may be longer than the steps
    already done, and the run must not go back up a warmup it finished. Where the decay had already brought the
    learning rate down, it comes back up to the 8-step schedule's value: that is what asking for a longer run means,
    and why extending is refused unless asked for."""
    from fusion_jax.train.optim import warmup_steps

    if warmup_steps(opt, steps) == warmup:
        return opt
    # warmup_steps() is max(1, ceil(ratio · steps)) for ratio > 0: half a step below `warmup` rounds up to it.
    out = dataclasses.replace(opt, warmup_ratio=(warmup - 0.5) / steps if warmup else 0.0)
    assert warmup_steps(out, steps) == warmup, (warmup, steps)
    return out


def _is_model_dir(path: Path) -> bool:
    from fusion_jax.convert.checkpoint import META

    weights = (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
               or any(path.glob("pytorch_model*.bin")))
    return (path / META).exists() or ((path / "config.json").is_file() and weights)


def _legacy_settings(run: Path) -> dict | None:
    """The config.json that runs wrote before run_config.json, or None (none there, or not one of ours)."""
    path = run / LEGACY_RUN_CONFIG
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) and {"run_dir", "train", "optimizer"} <= set(settings) else None


def _check_run_dir(run: Path) -> None:
    """Refuse, before anything is written there, a run_dir that is not a run of ours (nor new, nor empty)."""
    if not run.exists():
        return
    if not run.is_dir():
        raise RunDirError(f"run_dir {run} is a file: give a directory (a new one, or an earlier run's)")
    if _is_model_dir(run):
        raise RunDirError(f"run_dir {run} is a model checkpoint (config.json and weights): the run's files would "
                          "land among the model's and break it; give run_dir a new directory of its own")
    if (run / RUN_CONFIG).exists() or _legacy_settings(run) is not None:
        return
    others = sorted(p.name for p in run.iterdir() if p.name != LOCK_FILE and not p.name.startswith(f".{RUN_CONFIG}."))
    if others:
        shown = ", ".join(others[:5]) + (", …" if len(others) > 5 else "")
        raise RunDirError(f"run_dir {run} holds files and is not a fusion_jax run (no {RUN_CONFIG}): {shown}. The run "
                          "would mix its checkpoints, metrics and export with them: give a new or empty directory")


def _warmup_of(settings: dict, where: Path) -> int:
    from fusion_jax.train.optim import warmup_steps

    try:
        opt = config_loader.from_dict(OptimizerConfig, settings["optimizer"])
        return warmup_steps(opt, int(settings["train"]["steps"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{where}: the run's recorded settings cannot be read by this version of fusion_jax ({e}); "
                          "use another run_dir (or delete this one)") from None


def _read_run(run: Path) -> dict | None:
    """The run recorded in ``run`` (run_config.json, or a pre-run_config.json run's config.json, marked legacy), or
    None for a new run."""
    path = run / RUN_CONFIG
    if path.exists():
        record = read_json(path, RunDirError, fix="it records the run's settings: restore it, or use another run_dir")
        if not isinstance(record, dict) or record.get("format") != RUN_FORMAT or "identity" not in record:
            raise RunDirError(f"{path} is not a fusion_jax run record; use another run_dir")
        if record.get("version") != RUN_VERSION:
            raise RunDirError(f"{path} is version {record.get('version')!r} of the run record; this fusion_jax reads "
                              f"version {RUN_VERSION}: use the fusion_jax that started the run, or another run_dir")
        return record
    legacy = _legacy_settings(run)
    if legacy is None:
        return None
    return {**_new_record(legacy, run / LEGACY_RUN_CONFIG), "legacy": True}


def _new_record(settings: dict, where: Path) -> dict:
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "identity": run_identity(settings),
            "warmup_steps": _warmup_of(settings, where), "steps": [int(settings["train"]["steps"])],
            "config": settings}


def _checkpoint_steps(run: Path) -> list[int]:
    directory = run / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "…"


def _admit(cfg: TrainConfig, run: Path, record: dict | None) -> tuple[dict, bool]:
    """This invocation's settings against the run recorded in ``run`` → (the run's record, whether to write it);
    refuses other settings, naming the keys that differ."""
    settings = json.loads(json_dumps(config_loader.to_dict(cfg)))
    if record is None:
        return _new_record(settings, run), True
    legacy = record.pop("legacy", False)
    want = run_identity(settings)
    diffs = _differences(record["identity"], want)
    if not diffs:
        return record, legacy
    keys = [k for k, _, _ in diffs]
    if keys == ["train.steps"] and cfg.train.extend:
        newest = max(_checkpoint_steps(run), default=0)
        if cfg.train.steps < newest:
            raise RunDirError(f"{run}: train.steps={cfg.train.steps} is below step {newest}, where this run's newest "
                              "checkpoint is; a run cannot be shortened: use another run_dir")
        log.info("%s: extending the run from %s to %d steps", run, record["identity"]["train"]["steps"],
                 cfg.train.steps)
        return {**record, "identity": want, "steps": [*record.get("steps", []), cfg.train.steps]}, True
    detail = "; ".join(f"{k}: {_short(a)} in the run, {_short(b)} now" for k, a, b in diffs[:8])
    hint = (f"; or, to continue this run to {cfg.train.steps} steps, add --set train.extend=true"
            if keys == ["train.steps"] else "")
    raise RunDirError(f"{run} holds a run with other settings ({', '.join(keys)} differ: {detail}). Its checkpoints, "
                      f"metrics and export belong to those settings: use another run_dir for these (or delete "
                      f"{run}){hint}")


_open_runs: dict[str, dict] = {}  # run directories this process holds → their records


@contextlib.contextmanager
def open_run(cfg: TrainConfig) -> Iterator[dict]:
    """Hold ``cfg.run_dir`` for the run and yield its record (run_config.json).

    Before anything is written there, refuses a directory that is not a run of ours (a model checkpoint, someone's
    files). Then takes the directory's lock (a second command on it fails at once, naming the holder), compares the
    settings with the run's recorded ones (refusing a difference, naming the keys; ``train.extend`` allows a new
    ``train.steps``) and records them when the run is new or extended. Process 0 does this in a multi-host run; every
    process fails when it refuses. Nested runs hold their own directories (the demo's pretraining runs, the CLM
    baseline in ``<run_dir>/clm``); a directory this process holds already is held once (``main`` →
    ``fusion_run``)."""
    run = Path(cfg.run_dir)
    key = os.path.realpath(run)
    if key in _open_runs:
        yield _open_runs[key]
        return
    lock, record, failure = None, None, None
    if jax.process_index() == 0:
        try:
            _check_run_dir(run)
            lock = DirectoryLock(run, "run directory").acquire()
            record, write = _admit(cfg, run, _read_run(run))
            if write:
                atomic_write_json(run / RUN_CONFIG, record)
        except (UserError, OSError) as e:
            failure = e
    if jax.process_count() > 1 and mesh_lib.max_over_processes(int(failure is not None)) and failure is None:
        failure = RunDirError(f"{run}: process 0 refused this run directory (its error says why)")
    if failure is not None:
        if lock is not None:
            lock.release()
        raise failure
    if record is None:  # another process of a multi-host run: what process 0 recorded
        record = _read_run(run)
    _open_runs[key] = record
    try:
        yield record
    finally:
        del _open_runs[key]
        if lock is not None:
            lock.release()


# ------------------------------------------------------------------------------------------------ stages


def teacher_list(cfg: TrainConfig) -> list[TeacherConfig]:
    caches = Path(cfg.cache_dir or Path(cfg.run_dir) / "cache")
    out = [TeacherConfig(name="target", checkpoint=cfg.target, tokenizer=cfg.target_tokenizer, vocab_map="identity",
                        mode=cfg.target_teacher_mode)] if cfg.target_as_teacher else []
    out += list(cfg.sources)
    return [dataclasses.replace(s, cache=s.cache or str(caches / s.name)) for s in out]


def documents_stage(cfg: TrainConfig) -> str:
    if cfg.data.documents:
        return cfg.data.documents
    from fusion_jax.data import prepare
    from fusion_jax.data.documents import read_meta

    out = Path(cfg.run_dir) / "documents"
    tokenizers = tuple(t.tokenizer or t.checkpoint for t in teacher_list(cfg))
    if not cfg.target_as_teacher:
        tokenizers = (cfg.target_tokenizer or cfg.target, *tokenizers)
    pcfg = prepare.PrepareConfig(corpus=cfg.data.corpus, tokenizers=tokenizers, max_tokens=cfg.data.max_tokens,
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
    from fusion_jax.data import capture

    teachers = teacher_list(cfg)
    for t in teachers:
        if t.mode == "online":  # runs inside the train step: nothing to capture
            continue
        for split in SPLITS:
            capture.main(CaptureConfig(
                **{f.name: getattr(cfg.capture, f.name) for f in dataclasses.fields(cfg.capture)},
                documents=documents, split=split, source=t.checkpoint, tokenizer=t.tokenizer,
                output=str(Path(t.cache) / split), append_eos=cfg.loader.append_eos, mesh=cfg.mesh,
                allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch))
    return teachers


def loader_config(cfg: TrainConfig, teachers: list[TeacherConfig], split: str) -> LoaderConfig:
    """The loader's config for ``split``: each cached teacher reads ``<its cache>/<split>``."""
    specs = tuple(dataclasses.replace(t, cache="" if t.online else str(Path(t.cache) / split)) for t in teachers)
    return dataclasses.replace(cfg.loader, teachers=specs)


def load_online(cfg: TrainConfig, teachers: list[TeacherConfig], loader: FusionLoader, mesh, rules):
    """The online teachers, loaded once (frozen, in their shards, ``capture.param_dtype``/``compute_dtype``) →
    (tuple of OnlineTeacher, frozen params and vocab maps) in config order; ((), None) when there are none."""
    from fusion_jax.convert import checkpoint
    from fusion_jax.fusion.online import OnlineTeacher, load_frozen
    from fusion_jax.tokenizers import check_vocab_size, load_tokenizer

    online = [t for t in teachers if t.mode == "online"]
    if not online:
        return (), None
    for t in online:  # before any weight is read
        check_vocab_size(load_tokenizer(t.tokenizer or t.checkpoint), checkpoint.model_config(t.checkpoint).vocab_size,
                         t.checkpoint)
    maps = loader.vocab_maps()
    cfgs, frozen = load_frozen([t.checkpoint for t in online], [maps[t.name] for t in online], mesh, rules,
                               param_dtype=cfg.capture.param_dtype, compute_dtype=cfg.capture.compute_dtype)
    specs = tuple(OnlineTeacher(name=t.name, model=m, k=cfg.loader.k, topk=max(cfg.capture.k, cfg.loader.k),
                                fallback=t.fallback) for t, m in zip(online, cfgs))
    log.info("online teachers: %s (%s params, frozen)", ", ".join(t.name for t in online), cfg.capture.param_dtype)
    return specs, frozen


# ------------------------------------------------------------------------------------------------ metrics


class MetricsLog:
    """JSONL (one object per logged step; a resumed run appends, later lines win) and TensorBoard event files."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json_dumps({"step": step, "kind": kind, **values}) + "\n")  # NaN as null: strict JSON
        for k, v in _flat(values).items():
            self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flat(values: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


def peak_flops(cfg: TrainConfig) -> float:
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k) or k in kind), 0.0)


# ------------------------------------------------------------------------------------------------ the run


def dry_run(cfg: TrainConfig) -> dict:
    """The sharded train state built abstractly: bytes per device of params and optimizer state (and of online
    teachers), each param's shape and sharding, the largest per-device leaf and what stays replicated; nothing
    allocated. Activations and the step's temporaries are not included (docs/scaling.md)."""
    from fusion_jax.convert import checkpoint
    from fusion_jax.train.optim import make_optimizer
    from fusion_jax.train.step import abstract_state

    mesh = mesh_lib.make_mesh(cfg.mesh)
    model_cfg = checkpoint.model_config(cfg.target, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                                        remat=cfg.remat)
    abstract = abstract_state(model_cfg, make_optimizer(cfg.optimizer, cfg.train.steps), mesh, cfg.mesh.rules)
    per_device, param_leaves = {}, {}
    largest = {"leaf": "", "bytes": -1}
    replicated = {"leaves": 0, "bytes": 0}  # leaves every device holds whole (step counters, or a layout bug)
    for name, tree in abstract.items():
        total = 0
        for path, a in jax.tree_util.tree_leaves_with_path(tree):
            shard = a.sharding.shard_shape(a.shape)
            nbytes = int(np.prod(shard)) * a.dtype.itemsize
            total += nbytes
            where = "/".join(filter(None, [name, jax.tree_util.keystr(path, simple=True, separator="/")]))
            if nbytes > largest["bytes"]:
                largest = {"leaf": where, "bytes": nbytes}
            if tuple(shard) == tuple(a.shape) and len(mesh.devices.flat) > 1:
                replicated = {"leaves": replicated["leaves"] + 1, "bytes": replicated["bytes"] + nbytes}
            if name == "params":
                param_leaves[where.removeprefix("params/")] = {
                    "shape": list(a.shape), "dtype": str(a.dtype), "spec": [list(s) if isinstance(s, tuple) else s
                                                                            for s in a.sharding.spec],
                    "shard_shape": list(shard)}
        per_device[name] = total
    for t in teacher_list(cfg):
        if t.mode == "online":  # frozen params in capture.param_dtype, sharded like the target's
            t_cfg = checkpoint.model_config(t.checkpoint, param_dtype=cfg.capture.param_dtype)
            shardings = decoder.param_shardings(t_cfg, mesh, cfg.mesh.rules)
            per_device[f"online/{t.name}"] = sum(
                int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                for a, s in zip(jax.tree.leaves(decoder.abstract_params(t_cfg)), jax.tree.leaves(shardings)))
    report = {"mesh": dict(mesh.shape), "params": sum(int(np.prod(a.shape)) for a in
                                                      jax.tree.leaves(abstract["params"])),
              "bytes_per_device": per_device, "largest_leaf_per_device": largest, "replicated": replicated,
              "teachers": {t.name: t.mode for t in teacher_list(cfg)}, "param_shardings": param_leaves}
    print(_json_lines(report))
    return report


def _json_lines(obj, depth: int = 0) -> str:
    """JSON with one line per entry of the top two levels and anything deeper compact (one line per param leaf)."""
    if isinstance(obj, dict) and obj and depth < 2:
        pad = " " * (depth + 1)
        items = ",\n".join(f"{pad}{json_dumps(k)}: {_json_lines(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + items + "\n" + " " * depth + "}"
    return json_dumps(obj)


def main(cfg: TrainConfig) -> dict:
    """One run (stages 1–5) → its report; with ``dry_run``, the sharded state's bytes per device instead."""
    mesh_lib.initialize_distributed(cfg.mesh)
    if cfg.dry_run:  # reads the target's config only: writes and holds nothing
        return dry_run(cfg)
    return fusion_run(cfg)


def fusion_run(cfg: TrainConfig) -> dict:
    """Stages 1–5 of the module docstring for one run → its report (also in ``<run_dir>/report.json``), with its run
    directory held (:func:`open_run`)."""
    with open_run(cfg) as record:
        return _fusion_run(cfg, record)


def _fusion_run(cfg: TrainConfig, record: dict) -> dict:
    from tqdm import tqdm

    from fusion_jax.convert import checkpoint
    from fusion_jax.train.checkpoint import Checkpoints
    from fusion_jax.train.step import (
        abstract_state,
        eval_losses,
        flops_per_token,
        host_metrics,
        init_state,
        jit_train_step,
        make_train_step,
    )

    run = Path(cfg.run_dir)  # made, and its settings recorded (run_config.json), by open_run
    documents = documents_stage(cfg)
    teachers = capture_stage(cfg, documents)

    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    tgt_tok = cfg.target_tokenizer or cfg.target
    loader = FusionLoader(loader_config(cfg, teachers, "train"), documents, tgt_tok, split="train", mesh=mesh,
                          rules=rules, progress=cfg.train.progress)
    for name, ckpt, tok in [("target", cfg.target, tgt_tok)] + [(t.name, t.checkpoint, t.tokenizer or t.checkpoint)
                                                             for t in teachers if t.mode == "online"]:
        # Captured teachers were checked by their capture.
        checkpoint.check_tokenizer(ckpt, tokenizer_path=tok, allow_mismatch=cfg.allow_tokenizer_mismatch,
                                   setting="target_tokenizer" if name == "target" else f"sources[{name}].tokenizer")
    model_cfg, params = checkpoint.load(cfg.target, mesh, rules, param_dtype=cfg.param_dtype, remat=cfg.remat,
                                        compute_dtype=cfg.compute_dtype)
    online, frozen = load_online(cfg, teachers, loader, mesh, rules)
    extra = () if frozen is None else (frozen,)  # the online teachers' params: an argument, never donated
    optimizer = schedule_optimizer(cfg.optimizer, cfg.train.steps, record["warmup_steps"])
    step_fn, opt = make_train_step(model_cfg, cfg.fusion, cfg.loss, optimizer, cfg.train.steps, rules, online=online)
    abstract = abstract_state(model_cfg, opt, mesh, rules)
    ckpts = Checkpoints(run / "checkpoints", keep=cfg.train.keep_checkpoints)
    start = ckpts.latest_step()
    if start is not None:
        del params
        try:
            state, loader_state, start = ckpts.restore(abstract)
        except BaseException:
            ckpts.close()
            raise
        loader.restore(loader_state)
        log.info("resumed from %s at step %d", ckpts.directory / str(start), start)
    else:
        state, start = init_state(params, opt, abstract), 0
    if start > cfg.train.steps:  # open_run refuses this; a guard against logging step `start`'s results as `steps`
        ckpts.close()
        raise RunDirError(f"{run}: its checkpoint is at step {start}, beyond train.steps={cfg.train.steps}; a run "
                          "cannot be shortened: use another run_dir")
    if start < cfg.train.steps and jax.process_index() == 0:
        for name in ("report.json", "report.md"):  # of fewer steps than the run is about to train
            (run / name).unlink(missing_ok=True)
    uniform_loss = math.log(model_cfg.vocab_size)  # the CLM loss of a uniform prediction
    stalled: list[int] = []  # the latest steps in a row that did not learn
    train_step = jit_train_step(step_fn, abstract, loader.element_spec(), mesh, frozen=frozen)
    metrics_log = MetricsLog(run, jax.process_index() == 0)
    tokens_per_step = cfg.loader.global_batch_size * cfg.loader.seq_len
    fpt = flops_per_token(model_cfg, cfg.loader.seq_len)
    peak = peak_flops(cfg) * jax.device_count()
    names = [t.name for t in teachers]
    evaluate = _Evaluator(cfg, teachers, documents, tgt_tok, model_cfg, mesh, rules, eval_losses, online, extra)
    online_names = [t.name for t in online]

    bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not cfg.train.progress or jax.process_index() != 0)
    pending: tuple[int, Any, float] | None = None  # (step, device metrics, dispatch time): fetched one step later
    last_good = start if start else None
    t_prev = time.perf_counter()

    def finish(step: int, device_metrics, t_dispatch: float) -> dict:
        nonlocal t_prev, last_good
        m = host_metrics(device_metrics)
        now = time.perf_counter()
        if not all(math.isfinite(m[k]) for k in ("loss", "clm", "fusion", "grad_norm")):
            where = f"the last good checkpoint is step {last_good} in {ckpts.directory}" if last_good is not None \
                else "no checkpoint was written yet"
            raise TrainingError(
                f"step {step}: the loss is not finite (loss {m['loss']}, clm {m['clm']}, fusion {m['fusion']}, grad "
                f"norm {m['grad_norm']}); stopping without saving — {where}. Lower optimizer.learning_rate or check "
                "the teachers' caches")
        if cfg.train.stall_steps:
            stalled[:] = [*stalled, step] if _not_learning(m, uniform_loss) else []
            if len(stalled) >= cfg.train.stall_steps:
                raise TrainingError(_stall_message(cfg, stalled, uniform_loss, ckpts))
        dt = max(now - t_prev, 1e-9)
        t_prev = now
        wins = np.asarray(m.pop("teacher_wins"))
        m["win_rate"] = dict(zip(names, (wins / max(wins.sum(), 1e-9)).tolist()))
        if online_names:
            m["src_overflow"] = dict(zip(online_names, [int(x) for x in m["src_overflow"]]))
        m["tokens_per_s"] = tokens_per_step / dt
        m["mfu"] = m["tokens_per_s"] * fpt / peak if peak else float("nan")
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:,.0f}", refresh=False)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics_log.write(step, "train", m)
        return m

    last: dict = {}
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = next(loader)
            state, device_metrics = train_step(state, batch, *extra)
            if pending is not None:
                last = finish(*pending)
            pending = (step, device_metrics, time.perf_counter())
            save = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
            if save or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                last = finish(*pending)  # validate this step before anything is written
                pending = None
                if save:
                    ckpts.save(step, state, loader.state())
                    last_good = step
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                    metrics_log.write(step, "eval", evaluate(state["params"]))
        if pending is not None:
            last = finish(*pending)
        ckpts.wait()
        final_eval = evaluate(state["params"])
        metrics_log.write(cfg.train.steps, "eval", final_eval)
    finally:
        bar.close()
        ckpts.close()
        metrics_log.close()
        loader.close()
    report = {"run_dir": str(run), "steps": cfg.train.steps, "step": cfg.train.steps, "resumed_from": start,
              "train": last, "eval": final_eval}
    if cfg.train.export or (run / "export").exists():  # an export of an earlier step is brought up to date too
        report["export"] = export_stage(cfg, model_cfg, state["params"], cfg.train.steps)
        report["export_step"] = cfg.train.steps
    if jax.process_index() == 0:
        atomic_write_json(run / "report.json", report)  # NaN (MFU on CPU) as null: strict JSON
    return report


class _Evaluator:
    """Held-out bits per byte (per domain) and the fusion metrics on the validation caches."""

    def __init__(self, cfg, teachers, documents, tgt_tok, model_cfg, mesh, rules, eval_losses, online=(),
                 extra=()):
        from fusion_jax.data.documents import DocumentStore
        from fusion_jax.tokenizers import load_tokenizer

        self.cfg, self.model_cfg, self.mesh, self.rules = cfg, model_cfg, mesh, rules
        self.extra = extra  # the online teachers' frozen params, if any
        self.names = [t.name for t in teachers]
        self.store = DocumentStore(documents, "validation")
        self.tokenizer = load_tokenizer(tgt_tok)
        self.loader = FusionLoader(loader_config(cfg, teachers, "validation"), documents, tgt_tok, split="validation",
                                   mesh=mesh, rules=rules, progress=False) if len(self.store) else None
        self.batches = [self.loader.global_batch(i) for i in range(cfg.train.eval_batches)] if self.loader else []
        with jax.set_mesh(mesh):
            self.losses = jax.jit(eval_losses(model_cfg, cfg.fusion, cfg.loss, rules, online))

    def __call__(self, params) -> dict:
        from fusion_jax.evaluate.bpb import evaluate_bpb

        out: dict[str, Any] = {}
        if len(self.store):
            bpb = evaluate_bpb(self.model_cfg, params, self.tokenizer, self.store, mesh=self.mesh, rules=self.rules,
                               batch_size=self.cfg.loader.global_batch_size, seq_len=self.cfg.loader.seq_len,
                               append_eos=self.cfg.loader.append_eos, max_documents=self.cfg.train.eval_documents)
            out["bits_per_byte"] = bpb["bits_per_byte"]
            out["domains"] = {d: v["bits_per_byte"] for d, v in bpb["domains"].items()}
        sums: dict[str, Any] = {}
        for batch in self.batches:
            with jax.set_mesh(self.mesh):
                r = jax.device_get(self.losses(params, batch, *self.extra))
            for k, v in r.items():
                sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
        if sums:
            out["clm"] = float(sums["clm_sum"] / max(sums["clm_tokens"], 1))
            out["fusion"] = float(sums["fusion_sum"] / max(sums["fusion_tokens"], 1))
            wins = sums["teacher_wins"]
            out["win_rate"] = dict(zip(self.names, (wins / max(wins.sum(), 1e-9)).tolist()))
        return out


def export_step(export_dir: str | os.PathLike) -> int | None:
    """The step of its run an export holds (``run_step`` in its marker, ``fusion_jax_export.json``), or None: no
    export, or one whose write did not finish or that predates the record."""
    from fusion_jax.convert.checkpoint import EXPORT_MARKER

    try:
        return int(json.loads((Path(export_dir) / EXPORT_MARKER).read_text())[EXPORT_STEP])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_stage(cfg: TrainConfig, model_cfg: ModelConfig, params, step: int) -> str:
    """The params of ``step`` as a Hugging Face checkpoint in ``<run_dir>/export``, the step recorded in its marker;
    an export of another step (or of an unknown one) is replaced: written beside it, then swapped in."""
    import shutil

    from fusion_jax.convert import checkpoint

    out = Path(cfg.run_dir) / "export"
    if export_step(out) == step:
        log.info("export: %s holds step %d already; kept", out, step)
        return str(out)
    if out.exists() and not (out / checkpoint.EXPORT_MARKER).exists() and jax.process_index() == 0:
        log.info("export: %s is of an earlier fusion_jax (no marker): replacing it", out)
        shutil.rmtree(out)  # the run's own; convert's overwrite check knows an export by its marker
    mesh_lib.sync(f"fusion_jax:export:{out}")
    model_type, hf_config = checkpoint.source_info(cfg.target)
    tok_dir = Path(cfg.target_tokenizer or cfg.target)
    checkpoint.save_hf(out, model_cfg, params, model_type=model_type, hf_config=hf_config,
                       tokenizer_dir=tok_dir if tok_dir.is_dir() else tok_dir.parent, overwrite=True)
    if jax.process_index() == 0:  # a crash before this leaves no step: the next run exports again
        marker = json.loads((out / checkpoint.EXPORT_MARKER).read_text())
        atomic_write_json(out / checkpoint.EXPORT_MARKER, {**marker, EXPORT_STEP: step})
    return str(out)
