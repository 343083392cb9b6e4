"""The run's evaluation: held-out bits per byte (per domain) on the validation documents, the CLM and fusion
losses and per-teacher win rates on the first ``train.eval_batches`` batches of the validation caches, and the
lm-evaluation-harness tasks of ``train.tasks`` (at the end, and every ``train.tasks_every`` steps)."""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import TeacherConfig, TrainConfig
from fusion_jax.data.documents import DocumentStore
from fusion_jax.data.loader import FusionLoader
from fusion_jax.evaluate.bpb import evaluate_bpb
from fusion_jax.evaluate.model import LoadedModel
from fusion_jax.pipeline.stages import loader_config
from fusion_jax.tokenizers import load_tokenizer
from fusion_jax.train.step import eval_losses


class Evaluator:
    """Held-out bits per byte (per domain), the fusion metrics on the validation caches and the benchmark tasks:
    ``evaluator(params, step)`` → {"bits_per_byte", "domains", "clm", "fusion", "win_rate", "tasks"} (the first two
    without validation documents, the next three without validation batches, tasks when they run at this step:
    {task: {metric: value}})."""

    def __init__(self, cfg: TrainConfig, teachers: list[TeacherConfig], documents: str, tgt_tok: str,
                 model_cfg: ModelConfig, mesh, rules, online=(), extra=()):
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
        self.task_results: dict | None = None  # lm-eval's results of the last evaluation with tasks

    def __call__(self, params, step: int) -> dict:
        out: dict[str, Any] = {}
        tasks = self.cfg.train.tasks
        every = self.cfg.train.tasks_every
        if tasks.names and (step == self.cfg.train.steps or (every and step % every == 0)):
            from fusion_jax.evaluate import harness  # lm-eval loads only when tasks are asked for

            model = LoadedModel(self.cfg.target, self.model_cfg, params, self.tokenizer, None, self.mesh, self.rules)
            self.task_results = harness.run_tasks(model, tasks)
            out["tasks"] = harness.task_metrics(self.task_results)
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
            if self.cfg.loss.likelihood_weight > 0:
                out["likelihood"] = float(sums["likelihood_sum"] / max(sums["likelihood_tokens"], 1))
            wins = sums["teacher_wins"]
            out["win_rate"] = dict(zip(self.names, (wins / max(wins.sum(), 1e-9)).tolist()))
        return out
