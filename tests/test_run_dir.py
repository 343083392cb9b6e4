"""The run directory is the run's: its settings are recorded (run_config.json) and a rerun with other settings is
refused naming the keys; train.extend continues a run to more steps without going back up the warmup, and the export
and report follow; a run_dir that holds a model or someone's files is refused before anything is written; one command
at a time holds a run (or a capture output); a run that stops learning stops; JSON is strict; a damaged newest
checkpoint falls back to the one before it; Ctrl-C leaves the last checkpoint intact.

Tiny runs on test_train's assets, documents and caches (made once per module); one finished 4-step run is copied by
the tests that change it."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from fusion_jax.data import capture
from fusion_jax.config import loader as config_loader
from fusion_jax.experiments import run as experiment
from fusion_jax.config import schema
from fusion_jax import pipeline
from fusion_jax.data.capture import CaptureConfig
from fusion_jax.experiments.demo import build
from fusion_jax.errors import CheckpointError, RunDirError
from fusion_jax.files import LOCK_FILE, DirectoryLock
from fusion_jax.fusion.fuse import FusionConfig
from fusion_jax.mesh import MeshConfig
from fusion_jax.train.loop import TrainingError
from fusion_jax.train.optim import schedule
# test_train's tiny assets (a SentencePiece target and a byte-level source, both fusion_jax checkpoints, a jsonl
# corpus), its prepared documents and caches, and its config; the module fixtures are reused through this import.
from test_train import _cli, _train_losses, assets, config, prepared  # noqa: F401

STEPS = 4
OPT = schema.OptimizerConfig(learning_rate=1e-2, schedule="cosine", warmup_ratio=0.55)  # warmup: 3 of 4 steps


def _cfg(assets: Path, prepared: dict, run: Path | str, **kw) -> schema.TrainConfig:
    loop = dict(steps=STEPS, checkpoint_every=2, log_every=1, eval_batches=1, progress=False)
    loop.update(kw.pop("loop", {}))
    return config(assets, run, optimizer=kw.pop("optimizer", OPT), train=schema.LoopConfig(**loop),
                  **{**prepared, **kw})


@pytest.fixture(scope="module")
def finished(assets, prepared, tmp_path_factory) -> Path:
    """A finished run of STEPS steps (checkpoints 2 and 4, an export, a report); copy it before changing it."""
    run = tmp_path_factory.mktemp("finished") / "run"
    experiment.main(_cfg(assets, prepared, run))
    return run


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest)
    return dest


def _snapshot(path: Path) -> dict[str, bytes | None]:
    """Every file under `path` (its bytes) and directory (None) but the lock file, whose holder line each command
    that takes the lock rewrites: what "nothing was written" compares."""
    return {str(p.relative_to(path)): (p.read_bytes() if p.is_file() else None) for p in sorted(path.rglob("*"))
            if p.name != LOCK_FILE}


# ------------------------------------------------------------------------------------------------ item 7: identity


@pytest.mark.parametrize("key, change", [
    ("optimizer.learning_rate", dict(optimizer=dataclasses.replace(OPT, learning_rate=2e-2))),
    ("loss.lm_weight", dict(loss=schema.LossConfig(lm_weight=0.5))),
    ("fusion.method", dict(fusion=FusionConfig(method="avg_ce"))),
    ("sources", dict(sources=())),
    ("train.steps", dict(loop=dict(steps=8))),
])
def test_changed_settings_are_refused_naming_the_keys(assets, prepared, finished, key, change):
    before = _snapshot(finished)
    with pytest.raises(RunDirError, match=rf"{re.escape(key)}[^ ]* differ.*another run_dir") as e:
        experiment.main(_cfg(assets, prepared, finished, **change))
    assert ("train.extend=true" in str(e.value)) == (key == "train.steps")
    assert _snapshot(finished) == before  # run_config.json, metrics, checkpoints, export: untouched


def test_what_does_not_define_the_run_may_change(assets, prepared, finished, tmp_path, monkeypatch):
    """Another mesh, logging, evaluation, accumulation, and the same run_dir and documents given as relative paths
    are the same run: it resumes (at its end: nothing to train)."""
    run = _copy(finished, tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    documents = "./" + os.path.relpath(prepared["data"].documents, tmp_path)
    cfg = _cfg(assets, prepared, "run", mesh=MeshConfig(data=1, fsdp=8), loop=dict(log_every=2, eval_batches=2),
               data=dataclasses.replace(prepared["data"], documents=documents),
               optimizer=dataclasses.replace(OPT, accumulation=2))
    report = experiment.main(cfg)
    assert report["resumed_from"] == STEPS and (run / "checkpoints" / str(STEPS)).is_dir()


def test_extend_continues_over_the_new_total_and_refreshes_export_and_report(assets, prepared, finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    old_export = (run / "export" / "model.safetensors").read_bytes()
    logged = (run / "metrics.jsonl").read_text()
    record = json.loads((run / pipeline.RUN_CONFIG).read_text())
    assert record["warmup_steps"] == 3 and record["steps"] == [STEPS]

    report = experiment.main(_cfg(assets, prepared, run, loop=dict(steps=8, extend=True)))
    assert report["resumed_from"] == STEPS and report["steps"] == report["step"] == report["export_step"] == 8
    lrs = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "train":
            lrs[rec["step"]] = rec["learning_rate"]
    # Steps 5-8 follow the 8-step schedule with the warmup the run started with (3 steps): they decay from where
    # step 4 was; the 8-step schedule's own warmup (5 steps) would have taken step 5 back down to 0.8 · peak.
    expected = schedule(pipeline.schedule_optimizer(OPT, 8, 3), 8)
    np.testing.assert_allclose([lrs[s] for s in range(5, 9)], [float(expected(s - 1)) for s in range(5, 9)], rtol=1e-6)
    assert all(lrs[s + 1] <= lrs[s] for s in range(STEPS, 8))
    assert json.loads((run / "report.json").read_text())["step"] == 8
    assert pipeline.export_step(run / "export") == 8
    assert (run / "export" / "model.safetensors").read_bytes() != old_export  # not the step-4 export any more
    assert json.loads((run / pipeline.RUN_CONFIG).read_text())["steps"] == [STEPS, 8]

    # Shortening is refused, with or without extend: nothing logged as a step the weights are not at.
    logged = (run / "metrics.jsonl").read_text()
    with pytest.raises(RunDirError, match=r"train.steps=6 is below step 8.*cannot be shortened"):
        experiment.main(_cfg(assets, prepared, run, loop=dict(steps=6, extend=True)))
    with pytest.raises(RunDirError, match=r"train.steps differ"):
        experiment.main(_cfg(assets, prepared, run, loop=dict(steps=6)))
    assert (run / "metrics.jsonl").read_text() == logged


def test_export_dtype_rewrites_the_export_in_bfloat16(assets, prepared, finished, tmp_path):
    """train.export_dtype=bfloat16 on a finished run replaces its float32 export: bf16 tensors, config.json's dtype,
    the marker's; transformers and our loader read it back, and its logits stay near the float32 export's."""
    torch = pytest.importorskip("torch")
    import transformers
    from safetensors import safe_open

    run = _copy(finished, tmp_path / "run")
    f32 = tmp_path / "f32"
    shutil.copytree(run / "export", f32)
    report = experiment.main(_cfg(assets, prepared, run, loop=dict(export_dtype="bfloat16")))
    export = Path(report["export"])
    with safe_open(str(export / "model.safetensors"), "np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    assert json.loads((export / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((export / "fusion_jax_export.json").read_text())["dtype"] == "bfloat16"
    assert pipeline.export_step(export) == STEPS
    bf16 = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert bf16.dtype == torch.bfloat16
    ref = transformers.AutoModelForCausalLM.from_pretrained(f32, dtype=torch.float32)
    ids = torch.as_tensor([[3, 4, 5, 6, 7, 8]])
    with torch.inference_mode():
        a, b = bf16.float()(ids).logits, ref(ids).logits
    assert float((a - b).abs().max()) < 0.05 * float(b.abs().max())
    from fusion_jax.convert import checkpoint
    from fusion_jax import mesh as mesh_lib

    cfg, _ = checkpoint.load(export, mesh_lib.make_mesh(MeshConfig()), MeshConfig().rules)
    assert cfg.param_dtype == "bfloat16"
    again = experiment.main(_cfg(assets, prepared, run, loop=dict(export_dtype="bfloat16")))  # kept, not rewritten
    assert again["export"] == report["export"]


def _wandb_records(path: Path):
    """The records of a W&B transaction log (run-<id>.wandb): a 7-byte header, then LevelDB-style log records (crc,
    length, type; FULL or FIRST..LAST pieces in 32 KiB blocks), each a protobuf Record."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        pending += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            pending = b""
            yield record


def test_wandb_offline_run_is_continued_when_the_run_resumes(assets, prepared, tmp_path, monkeypatch):
    """train.trackers with wandb (offline mode): the run's settings are the W&B config, its id is kept in the run
    directory, and the extended run logs steps 5-8 into the same W&B run after steps 1-4."""
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = tmp_path / "run"
    loop = dict(trackers=("jsonl", "wandb"), wandb=schema.WandbConfig(mode="offline", project="test"))
    experiment.main(_cfg(assets, prepared, run, loop=loop))
    run_id = (run / "wandb_run_id").read_text().strip()
    experiment.main(_cfg(assets, prepared, run, loop=dict(loop, steps=8, extend=True)))
    assert (run / "wandb_run_id").read_text().strip() == run_id
    logs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert [p.name for p in logs] == [f"run-{run_id}.wandb"] * 2
    steps, config = [], {}
    for log in logs:
        for record in _wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                assert record.run.run_id == run_id
                config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key) for i in record.history.item}
                if "train/loss" in items:
                    steps.append(record.history.step.num)
    assert steps == list(range(1, 9))
    assert config["optimizer"]["learning_rate"] == OPT.learning_rate and config["run_dir"] == str(run)
    assert not (run / "tensorboard").exists()  # not in trackers


def test_baseline_needs_the_jsonl_tracker(assets, prepared, tmp_path):
    with pytest.raises(Exception, match="keep jsonl in train.trackers"):
        _cfg(assets, prepared, tmp_path / "run", baseline=True, loop=dict(trackers=("tensorboard",))).validate()


def test_run_from_before_run_config_json_is_recognised(assets, prepared, finished, tmp_path):
    """A run directory written before run_config.json (its settings in config.json) is checked against its
    settings, and adopted when they match."""
    run = _copy(finished, tmp_path / "run")
    record = json.loads((run / pipeline.RUN_CONFIG).read_text())
    (run / pipeline.RUN_CONFIG).unlink()
    (run / "config.json").write_text(json.dumps(record["config"], indent=1))
    before = _snapshot(run)
    with pytest.raises(RunDirError, match=r"optimizer.learning_rate differ"):
        experiment.main(_cfg(assets, prepared, run, optimizer=dataclasses.replace(OPT, learning_rate=3e-2)))
    assert _snapshot(run) == before
    assert experiment.main(_cfg(assets, prepared, run))["resumed_from"] == STEPS
    assert json.loads((run / pipeline.RUN_CONFIG).read_text())["identity"] == record["identity"]


# ------------------------------------------------------------------------------------------------ item 9: not a run


def test_run_dir_holding_a_model_or_other_files_is_refused_before_writing(assets, prepared, tmp_path):
    hf = tmp_path / "hf_model"  # the case: --set run_dir=D --set target=D
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32}))
    (hf / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    ours = shutil.copytree(assets / "target", tmp_path / "fusion_jax_model")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.txt").write_text("years of work")
    for directory, message in ((hf, "is a model checkpoint"), (ours, "is a model checkpoint"),
                               (notes, r"is not a fusion_jax run \(no run_config.json\): thesis.txt")):
        before = _snapshot(directory)
        with pytest.raises(RunDirError, match=message):
            experiment.main(_cfg(assets, prepared, directory, target=str(directory)))
        assert _snapshot(directory) == before and not (directory / LOCK_FILE).exists(), directory


# ------------------------------------------------------------------------------------------------ item 10: one holder


def test_a_held_run_dir_or_capture_output_fails_fast_naming_the_holder(assets, prepared, finished, tmp_path):
    fresh = tmp_path / "fresh"
    for run in (fresh, finished):
        with DirectoryLock(run, "run directory"):  # another command's lock (its own descriptor: flock conflicts)
            with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} .*wait for it to finish"):
                experiment.main(_cfg(assets, prepared, run))
    assert not (fresh / pipeline.RUN_CONFIG).exists()
    out = Path(prepared["cache_dir"]) / "src" / "train"
    with DirectoryLock(out, "capture output"):
        with pytest.raises(RunDirError, match="capture output is in use"):
            capture.main(CaptureConfig(documents=prepared["data"].documents, source=str(assets / "source"),
                                       output=str(out), k=4, seq_len=48, param_dtype="float32",
                                       compute_dtype="float32"))


# ---------------------------------------------------------------------------------------------- item 10: stops learning


def test_run_that_stops_learning_stops_without_export(assets, prepared, tmp_path):
    """The issue's case: learning rate 1e6 with default clipping → gradient norm exactly 0 and the loss at ln V."""
    run = tmp_path / "run"
    cfg = _cfg(assets, prepared, run, optimizer=schema.OptimizerConfig(learning_rate=1e6, warmup_ratio=0.0),
               loop=dict(steps=12, checkpoint_every=100, stall_steps=3))
    with pytest.raises(ValueError, match=r"stopped learning: for 3 steps in a row \(steps 2–4\).*"
                                         r"lower optimizer.learning_rate") as e:
        experiment.main(cfg)
    assert isinstance(e.value, TrainingError)  # cli.run: one "error:" line
    assert not (run / "export").exists() and not (run / "report.json").exists()


# ------------------------------------------------------------------------------------------------ item 10: strict JSON


def _strict(text: str):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=reject)


def test_metrics_and_report_are_strict_json(finished):
    """MFU is NaN on CPU (no peak FLOP/s known): written as null."""
    records = [_strict(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "train" and r["mfu"] is None for r in records)
    assert _strict((finished / "report.json").read_text())["train"]["mfu"] is None
    _strict((finished / pipeline.RUN_CONFIG).read_text())


# ------------------------------------------------------------------------------------------------ item 11: damaged


def _truncate_data(step_dir: Path) -> None:
    for f in (step_dir / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def test_damaged_newest_checkpoint_falls_back_to_the_previous(assets, prepared, finished, tmp_path, caplog):
    run = _copy(finished, tmp_path / "run")
    _truncate_data(run / "checkpoints" / str(STEPS))
    caplog.set_level("WARNING", logger="fusion_jax.train.checkpoint")
    report = experiment.main(_cfg(assets, prepared, run))
    assert report["resumed_from"] == 2
    assert re.search(rf"checkpoints/{STEPS} does not restore", caplog.text)
    assert (run / "checkpoints.damaged" / str(STEPS)).is_dir() and (run / "checkpoints" / str(STEPS)).is_dir()
    np.testing.assert_allclose(_train_losses(run)[STEPS], _train_losses(finished)[STEPS], rtol=1e-6)


def test_no_intact_checkpoint_is_one_clear_error(assets, prepared, finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    for step in (2, STEPS):
        _truncate_data(run / "checkpoints" / str(step))
    with pytest.raises(CheckpointError, match=rf"{re.escape(str(run / 'checkpoints'))}: none of the checkpoints "
                                              r"\(steps 4, 2\) restores.*delete"):
        experiment.main(_cfg(assets, prepared, run))
    assert not (run / "checkpoints.damaged").exists()  # nothing moved when there is nothing to fall back to


# ------------------------------------------------------------------------------------------------ item 11: Ctrl-C


def test_ctrl_c_exits_130_and_leaves_the_last_checkpoint_intact(assets, prepared, tmp_path):
    run = tmp_path / "run"
    cfg = _cfg(assets, prepared, run, loop=dict(steps=12, export=False))
    proc = _cli(cfg)
    deadline = time.time() + 300
    while time.time() < deadline and not (run / "checkpoints" / "2").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 130, out
    assert "run the same command again to resume" in out and "Traceback" not in out
    report = experiment.main(cfg)  # the lock went with the process; the newest checkpoint restores
    assert report["resumed_from"] >= 2 and sorted(_train_losses(run))[-1] == 12


def test_ctrl_c_while_a_save_starts_is_handled_once_it_has_started(tmp_path, monkeypatch):
    """Orbax interrupted halfway through starting a save leaves the step unfinished and writer threads that fail at
    exit (tracebacks after the resume note): the interrupt waits until the save is under way."""
    import jax.numpy as jnp

    from fusion_jax.train.checkpoint import Checkpoints

    ckpts = Checkpoints(tmp_path / "checkpoints")
    real_save, started = ckpts.manager.save, []

    def save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.2)  # the handler runs here
        started.append(real_save(*args, **kwargs))

    monkeypatch.setattr(ckpts.manager, "save", save)
    with pytest.raises(KeyboardInterrupt):
        ckpts.save(1, {"w": jnp.zeros(4)}, {"step": 1})
    ckpts.close()
    assert started and ckpts.latest_step() == 1


# ------------------------------------------------------------------------------------------------ the demo's stages


def test_demo_stage_compares_as_a_run_identity(tmp_path, monkeypatch):
    """A pretraining stage is the same run on another mesh or with its paths given relative instead of absolute;
    a changed learning rate is still refused."""
    monkeypatch.chdir(tmp_path)
    stage = tmp_path / "pretrain"
    stage.mkdir()
    base = schema.TrainConfig(run_dir="runs/demo/pretrain", target="runs/demo/init/model",
                             data=schema.DataConfig(corpus=schema.CorpusConfig(paths=("runs/demo/corpus.jsonl",))))
    settings = config_loader.to_dict(base)
    build._done(stage, settings)
    moved = config_loader.to_dict(dataclasses.replace(
        base, run_dir=str(tmp_path / "runs/demo/pretrain"), target="./runs/demo/init/model",
        mesh=MeshConfig(data=2, fsdp=4), data=schema.DataConfig(corpus=schema.CorpusConfig(
            paths=(str(tmp_path / "runs/demo/corpus.jsonl"),)))))
    assert build._stage(stage, moved, pipeline.run_identity)
    changed = config_loader.to_dict(dataclasses.replace(
        base, optimizer=schema.OptimizerConfig(learning_rate=1.0)))
    with pytest.raises(RunDirError, match=r"\(optimizer.learning_rate differ\); use another run_dir"):
        build._stage(stage, changed, pipeline.run_identity)


def test_a_key_added_later_at_its_old_meaning_leaves_the_identity_unchanged():
    """A run recorded before ``sources[].continuation`` existed is the same run with continuation=false; true is
    another run."""
    source = {"name": "s", "checkpoint": "/m", "align": "bytes"}
    before = {"target": "/t", "sources": [dict(source)], "train": {"steps": 3}}
    now = {"target": "/t", "sources": [{**source, "continuation": False}], "train": {"steps": 3}}
    assert pipeline.run_identity(before) == pipeline.run_identity(now)
    other = {"target": "/t", "sources": [{**source, "continuation": True}], "train": {"steps": 3}}
    assert pipeline.differing_keys(pipeline.run_identity(before), pipeline.run_identity(other)) == [
        "sources[0].continuation"]
    # in a section: loss.likelihood_weight / likelihood_temperature, added with likelihood matching
    before = {"target": "/t", "loss": {"lm_weight": 0.9}}
    now = {"target": "/t", "loss": {"lm_weight": 0.9, "likelihood_weight": 0.0, "likelihood_temperature": 100.0}}
    assert pipeline.run_identity(before) == pipeline.run_identity(now)
    other = {"target": "/t", "loss": {"lm_weight": 0.9, "likelihood_weight": 0.5, "likelihood_temperature": 100.0}}
    assert pipeline.differing_keys(pipeline.run_identity(before), pipeline.run_identity(other)) == [
        "loss.likelihood_weight"]
