"""The step loop: steps ``start + 1 … train.steps`` of the jitted train step, each step's metrics fetched from the
device one step after its dispatch (so the host never waits on the step it just started), checked, completed with
throughput and win rates, and logged; a checkpoint every ``train.checkpoint_every`` steps and at the end, an
evaluation (a callable: the loop knows nothing of what it measures) every ``train.eval_every`` steps.

A non-finite loss, or ``train.stall_steps`` steps in a row that did not learn, raise :class:`TrainingError` before
anything of that step is written."""

from __future__ import annotations

import math
import time
from typing import Any, Callable

import jax
import numpy as np
from tqdm import tqdm

from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import TrainConfig
from fusion_jax.data.loader import FusionLoader
from fusion_jax.errors import UserError
from fusion_jax.train.checkpoint import Checkpoints
from fusion_jax.train.metrics import MetricsLog, peak_flops
from fusion_jax.train.step import flops_per_token, host_metrics


class TrainingError(UserError, FloatingPointError):
    """The run diverged (a non-finite loss) or stopped learning: settings to change (learning rate, clipping), not a
    bug, so one ``error:`` line. A FloatingPointError too, for callers that catch that."""


def _not_learning(metrics: dict, uniform_loss: float) -> bool:
    """A step of a run that stopped learning: no gradient at all, or a CLM loss at ln V — a uniform prediction, which
    a trained model never makes and an untrained one leaves within a few steps (float32 round-off allowed)."""
    return metrics["grad_norm"] == 0.0 or abs(metrics["clm"] - uniform_loss) <= 1e-5 * uniform_loss


def _stall_message(cfg: TrainConfig, steps: list[int], uniform_loss: float, ckpts: Checkpoints) -> str:
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


class TrainLoop:
    """The loop over one run's steps, with what it keeps between them: the progress bar, the last step that was
    checkpointed, the steps in a row that did not learn and the time the previous step's metrics arrived.

    Built right before :meth:`run` (the first step's throughput is timed from construction); :meth:`close` closes
    the progress bar. The checkpoints, metrics log and loader stay their opener's to close."""

    def __init__(self, cfg: TrainConfig, model_cfg: ModelConfig, ckpts: Checkpoints, metrics_log: MetricsLog, *,
                 start: int, teacher_names: list[str], online_names: list[str]):
        self.cfg, self.ckpts, self.metrics_log = cfg, ckpts, metrics_log
        self.start = start
        self.teacher_names, self.online_names = teacher_names, online_names
        self.uniform_loss = math.log(model_cfg.vocab_size)  # the CLM loss of a uniform prediction
        self.tokens_per_step = cfg.loader.global_batch_size * cfg.loader.seq_len
        self.flops_per_token = flops_per_token(model_cfg, cfg.loader.seq_len)
        self.peak = peak_flops(cfg) * jax.device_count()
        self.stalled: list[int] = []  # the latest steps in a row that did not learn
        self.last_good = start if start else None  # the newest step checkpointed (None: none yet)
        self.bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
                        disable=not cfg.train.progress or jax.process_index() != 0)
        self.t_prev = time.perf_counter()

    def run(self, train_step: Callable, state: Any, loader: FusionLoader, evaluate: Callable[[Any], dict],
            extra: tuple = ()) -> tuple[Any, dict]:
        """Steps ``start + 1 … train.steps`` → (the state after the last, the last step's train metrics; {} when no
        step was left). ``evaluate(params)`` → the metrics logged as "eval"; ``extra``: the train step's arguments
        after the state and the batch (the online teachers' frozen params)."""
        train = self.cfg.train
        pending: tuple[int, Any] | None = None  # (step, device metrics): fetched one step later
        last: dict = {}
        for step in range(self.start + 1, train.steps + 1):
            batch = next(loader)
            state, device_metrics = train_step(state, batch, *extra)
            if pending is not None:
                last = self._finish(*pending)
            pending = (step, device_metrics)
            save = step % train.checkpoint_every == 0 or step == train.steps
            if save or (train.eval_every and step % train.eval_every == 0):
                last = self._finish(*pending)  # validate this step before anything is written
                pending = None
                if save:
                    self.ckpts.save(step, state, loader.state())
                    self.last_good = step
                if train.eval_every and step % train.eval_every == 0 and step != train.steps:
                    self.metrics_log.write(step, "eval", evaluate(state["params"], step))
        if pending is not None:
            last = self._finish(*pending)
        return state, last

    def close(self) -> None:
        self.bar.close()

    def _finish(self, step: int, device_metrics: Any) -> dict:
        """Step ``step``'s metrics on the host: checked, completed with win rates and throughput, logged."""
        m = host_metrics(device_metrics)
        now = time.perf_counter()
        self._check(step, m)
        dt = max(now - self.t_prev, 1e-9)
        self.t_prev = now
        wins = np.asarray(m.pop("teacher_wins"))
        m["win_rate"] = dict(zip(self.teacher_names, (wins / max(wins.sum(), 1e-9)).tolist()))
        if self.online_names:
            m["src_overflow"] = dict(zip(self.online_names, [int(x) for x in m["src_overflow"]]))
        m["tokens_per_s"] = self.tokens_per_step / dt
        m["mfu"] = m["tokens_per_s"] * self.flops_per_token / self.peak if self.peak else float("nan")
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:,.0f}", refresh=False)
        if step % self.cfg.train.log_every == 0 or step == self.cfg.train.steps:
            self.metrics_log.write(step, "train", m)
        return m

    def _check(self, step: int, m: dict) -> None:
        """Raise :class:`TrainingError` on a non-finite loss, or on the ``train.stall_steps``-th step in a row that
        did not learn."""
        if not all(math.isfinite(m[k]) for k in ("loss", "clm", "fusion", "likelihood", "grad_norm")):
            where = (f"the last good checkpoint is step {self.last_good} in {self.ckpts.directory}"
                     if self.last_good is not None else "no checkpoint was written yet")
            raise TrainingError(
                f"step {step}: the loss is not finite (loss {m['loss']}, clm {m['clm']}, fusion {m['fusion']}, grad "
                f"norm {m['grad_norm']}); stopping without saving — {where}. Lower optimizer.learning_rate or check "
                "the teachers' caches")
        if self.cfg.train.stall_steps:
            self.stalled = [*self.stalled, step] if _not_learning(m, self.uniform_loss) else []
            if len(self.stalled) >= self.cfg.train.stall_steps:
                raise TrainingError(_stall_message(self.cfg, self.stalled, self.uniform_loss, self.ckpts))
