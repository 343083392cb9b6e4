"""The run directory: its record (``run_config.json``: the run's identity, warmup and steps), the checks before
anything is written there, and its lock (:func:`open_run`)."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from typing import Any, Iterator

import jax

from fusion_jax import mesh as mesh_lib
from fusion_jax.config import loader as config_loader
from fusion_jax.config.schema import OptimizerConfig, TrainConfig
from fusion_jax.convert.checkpoint import META
from fusion_jax.errors import RunDirError, UserError
from fusion_jax.files import (LOCK_FILE, AnyPath, DirectoryLock, as_path, atomic_write_json, canonical_path,
                              check_paths, json_dumps, read_json)
from fusion_jax.pipeline.identity import differences, run_identity
from fusion_jax.train.optim import warmup_steps

log = logging.getLogger(__name__)

RUN_CONFIG = "run_config.json"  # the run's marker and identity; named so that it never collides with a model file
LEGACY_RUN_CONFIG = "config.json"  # what runs wrote before run_config.json (a model's file name: see _check_run_dir)
RUN_FORMAT = "fusion_jax.run"
RUN_VERSION = 1


def schedule_optimizer(opt: OptimizerConfig, steps: int, warmup: int) -> OptimizerConfig:
    """``opt`` with its schedule over ``steps`` steps and a warmup of exactly ``warmup`` steps.

    What "more steps" means for an extended run (``train.extend``): the schedule's length is part of the optimizer,
    so a run of 4 steps extended to 8 cannot continue "its" schedule, which ended at step 4. Its steps 5–8 follow the
    schedule of an 8-step run instead — the decay (and a λ schedule) spans the new total — but the warmup keeps the
    length the run started with (recorded in run_config.json): ``warmup_ratio × 8`` may be longer than the steps
    already done, and the run must not go back up a warmup it finished. Where the decay had already brought the
    learning rate down, it comes back up to the 8-step schedule's value: that is what asking for a longer run means,
    and why extending is refused unless asked for."""
    if warmup_steps(opt, steps) == warmup:
        return opt
    # warmup_steps() is max(1, ceil(ratio · steps)) for ratio > 0: half a step below `warmup` rounds up to it.
    out = dataclasses.replace(opt, warmup_ratio=(warmup - 0.5) / steps if warmup else 0.0)
    assert warmup_steps(out, steps) == warmup, (warmup, steps)
    return out


def _is_model_dir(path: AnyPath) -> bool:
    weights = (any(path.glob("*.safetensors")) or (path / "model.safetensors.index.json").exists()
               or any(path.glob("pytorch_model*.bin")))
    return (path / META).exists() or ((path / "config.json").is_file() and weights)


def _legacy_settings(run: AnyPath) -> dict | None:
    """The config.json that runs wrote before run_config.json, or None (none there, or not one of ours)."""
    path = run / LEGACY_RUN_CONFIG
    try:
        settings = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return settings if isinstance(settings, dict) and {"run_dir", "train", "optimizer"} <= set(settings) else None


def _check_run_dir(run: AnyPath) -> None:
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


def _warmup_of(settings: dict, where: AnyPath) -> int:
    try:
        opt = config_loader.from_dict(OptimizerConfig, settings["optimizer"])
        return warmup_steps(opt, int(settings["train"]["steps"]))
    except (KeyError, TypeError, ValueError) as e:
        raise RunDirError(f"{where}: the run's recorded settings cannot be read by this version of fusion_jax ({e}); "
                          "use another run_dir (or delete this one)") from None


def _read_run(run: AnyPath) -> dict | None:
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


def _new_record(settings: dict, where: AnyPath) -> dict:
    return {"format": RUN_FORMAT, "version": RUN_VERSION, "identity": run_identity(settings),
            "warmup_steps": _warmup_of(settings, where), "steps": [int(settings["train"]["steps"])],
            "config": settings}


def _checkpoint_steps(run: AnyPath) -> list[int]:
    directory = run / "checkpoints"
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) if directory.is_dir() else []


def _short(value: Any) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= 60 else text[:57] + "…"


def _admit(cfg: TrainConfig, run: AnyPath, record: dict | None) -> tuple[dict, bool]:
    """This invocation's settings against the run recorded in ``run`` → (the run's record, whether to write it);
    refuses other settings, naming the keys that differ."""
    settings = json.loads(json_dumps(config_loader.to_dict(cfg)))
    if record is None:
        return _new_record(settings, run), True
    legacy = record.pop("legacy", False)
    want = run_identity(settings)
    diffs = differences(run_identity(record["identity"]), want)  # recorded with a key added later, at its old value
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


def _take(cfg: TrainConfig, run: AnyPath) -> tuple[DirectoryLock | None, dict | None, BaseException | None]:
    """Process 0's part of :func:`open_run` → (the lock, the run's record, why it refused); the others' (None, None,
    None)."""
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
    return lock, record, failure


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
    check_paths(cfg)  # a URL where a local path is needed would be taken as a directory named gs:
    run = as_path(cfg.run_dir)
    key = str(canonical_path(run))
    if key in _open_runs:
        yield _open_runs[key]
        return
    lock, record, failure = _take(cfg, run)
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
