"""python -m fusion_jax.train --config FILE — the fusion run, every stage it needs, each resumable.

Stages, each skipped when its output is already complete (so re-running after a crash continues where it stopped):

0. with ``demo.enabled`` (``configs/demo.yaml``): the demo's corpus, tokenizers and pretrained models
   (``fusion_jax/experiments/demo/build.py``), which then fill ``target``, ``sources`` and ``data.corpus``;
1. documents: ``data.documents``, or prepared from ``data.corpus`` into ``<run_dir>/documents``;
2. capture: every cached teacher (the target itself when ``target_as_teacher`` — the paper's setting — then
   ``sources``) over the train and validation documents into ``<cache>/{train,validation}`` (``fusion_jax.data.capture``);
   an online teacher (``mode: online``) is not captured: its params are loaded once (frozen, sharded, in
   ``capture.param_dtype``) and it runs inside the train step on the source tokens the loader ships
   (``fusion_jax/fusion/online.py``);
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
   held-out documents, the alignment audit, and ``report.md`` with plots (``fusion_jax/experiments/compare.py``).

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

import logging

import jax

from fusion_jax import mesh as mesh_lib
from fusion_jax.config import loader as config_loader
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import TeacherConfig, TrainConfig
from fusion_jax.convert import checkpoint
from fusion_jax.data.loader import FusionLoader
from fusion_jax.errors import RunDirError
from fusion_jax.files import AnyPath, as_path, atomic_write_json
from fusion_jax.pipeline.evaluator import Evaluator
from fusion_jax.pipeline.export import export_stage
from fusion_jax.pipeline.memory import dry_run
from fusion_jax.pipeline.run_dir import open_run, schedule_optimizer
from fusion_jax.pipeline.stages import capture_stage, check_inputs, documents_stage, load_online, loader_config
from fusion_jax.train.checkpoint import Checkpoints
from fusion_jax.train.loop import TrainLoop
from fusion_jax.train.metrics import MetricsLog
from fusion_jax.train.step import abstract_state, init_state, jit_train_step, make_train_step

log = logging.getLogger(__name__)


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
    run = as_path(cfg.run_dir)  # made, and its settings recorded (run_config.json), by open_run
    check_inputs(cfg)
    documents = documents_stage(cfg)
    teachers = capture_stage(cfg, documents)

    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    tgt_tok = cfg.target_tokenizer or cfg.target
    loader = FusionLoader(loader_config(cfg, teachers, "train"), documents, tgt_tok, split="train", mesh=mesh,
                          rules=rules, progress=cfg.train.progress)
    _check_tokenizers(cfg, teachers, tgt_tok)
    model_cfg, params = checkpoint.load(cfg.target, mesh, rules, param_dtype=cfg.param_dtype, remat=cfg.remat,
                                        compute_dtype=cfg.compute_dtype)
    online, frozen = load_online(cfg, teachers, loader, mesh, rules)
    extra = () if frozen is None else (frozen,)  # the online teachers' params: an argument, never donated
    optimizer = schedule_optimizer(cfg.optimizer, cfg.train.steps, record["warmup_steps"])
    step_fn, opt = make_train_step(model_cfg, cfg.fusion, cfg.loss, optimizer, cfg.train.steps, rules, online=online)
    abstract = abstract_state(model_cfg, opt, mesh, rules)
    ckpts = Checkpoints(run / "checkpoints", keep=cfg.train.keep_checkpoints)
    if ckpts.latest_step() is not None:
        del params  # freed before the checkpoint's state is read
        state, start = _resume(ckpts, abstract, loader)
    else:
        state, start = init_state(params, opt, abstract), 0
    _start_at(cfg, run, start, ckpts)
    train_step = jit_train_step(step_fn, abstract, loader.element_spec(), mesh, frozen=frozen)
    metrics_log = MetricsLog(run, jax.process_index() == 0, cfg.train.trackers, cfg.train.wandb,
                             config_loader.to_dict(cfg))
    evaluate = Evaluator(cfg, teachers, documents, tgt_tok, model_cfg, mesh, rules, online, extra)
    loop = TrainLoop(cfg, model_cfg, ckpts, metrics_log, start=start, teacher_names=[t.name for t in teachers],
                     online_names=[t.name for t in online])
    try:
        state, last = loop.run(train_step, state, loader, evaluate, extra)
        ckpts.wait()
        final_eval = evaluate(state["params"], cfg.train.steps)
        metrics_log.write(cfg.train.steps, "eval", final_eval)
    finally:
        loop.close()
        ckpts.close()
        metrics_log.close()
        loader.close()
    return _report(cfg, model_cfg, state["params"], start, last, final_eval, evaluate.task_results)


def _check_tokenizers(cfg: TrainConfig, teachers: list[TeacherConfig], tgt_tok: str) -> None:
    """The target's tokenizer and each online teacher's against their checkpoints (captured teachers were checked by
    their capture)."""
    for name, ckpt, tok in [("target", cfg.target, tgt_tok)] + [(t.name, t.checkpoint, t.tokenizer or t.checkpoint)
                                                             for t in teachers if t.mode == "online"]:
        checkpoint.check_tokenizer(ckpt, tokenizer_path=tok, allow_mismatch=cfg.allow_tokenizer_mismatch,
                                   setting="target_tokenizer" if name == "target" else f"sources[{name}].tokenizer")


def _resume(ckpts: Checkpoints, abstract, loader: FusionLoader):
    """The newest checkpoint that restores → (its state, its step), the loader at the same batch."""
    try:
        state, loader_state, start = ckpts.restore(abstract)
    except BaseException:
        ckpts.close()
        raise
    loader.restore(loader_state)
    log.info("resumed from %s at step %d", ckpts.directory / str(start), start)
    return state, start


def _start_at(cfg: TrainConfig, run: AnyPath, start: int, ckpts: Checkpoints) -> None:
    """Refuse a checkpoint beyond ``train.steps``; drop the reports of fewer steps than the run is about to train."""
    if start > cfg.train.steps:  # open_run refuses this; a guard against logging step `start`'s results as `steps`
        ckpts.close()
        raise RunDirError(f"{run}: its checkpoint is at step {start}, beyond train.steps={cfg.train.steps}; a run "
                          "cannot be shortened: use another run_dir")
    if start < cfg.train.steps and jax.process_index() == 0:
        for name in ("report.json", "report.md"):  # of fewer steps than the run is about to train
            (run / name).unlink(missing_ok=True)


def _report(cfg: TrainConfig, model_cfg: ModelConfig, params, start: int, last: dict, final_eval: dict,
            task_results: dict | None) -> dict:
    """The run's report, after the export (when asked for, or to bring an earlier one up to date); process 0 writes
    it to ``<run_dir>/report.json``, and lm-eval's results of the final evaluation (train.tasks) to
    ``<run_dir>/lm_eval.json``."""
    run = as_path(cfg.run_dir)
    report = {"run_dir": str(run), "steps": cfg.train.steps, "step": cfg.train.steps, "resumed_from": start,
              "train": last, "eval": final_eval}
    if cfg.train.export or (run / "export").exists():  # an export of an earlier step is brought up to date too
        report["export"] = export_stage(cfg, model_cfg, params, cfg.train.steps)
        report["export_step"] = cfg.train.steps
    if jax.process_index() == 0:
        if task_results is not None:
            atomic_write_json(run / "lm_eval.json", task_results)
        atomic_write_json(run / "report.json", report)  # NaN (MFU on CPU) as null: strict JSON
    return report
