"""What `python -m fusion_jax.train` runs: the pipeline's run, after the demo's assets when ``demo.enabled``, and
followed by the CLM baseline, the comparison and the report when ``baseline`` (:mod:`fusion_jax.experiments.compare`).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from fusion_jax import mesh as mesh_lib
from fusion_jax import pipeline
from fusion_jax.config.schema import TrainConfig
from fusion_jax.data.documents import DocumentStore
from fusion_jax.errors import InputError
from fusion_jax.experiments import compare
from fusion_jax.experiments.demo import build
from fusion_jax.experiments.demo import tasks as demo_tasks


def main(cfg: TrainConfig) -> dict:
    """The run (after the demo's assets when ``demo.enabled``; then the CLM baseline and the report when
    ``baseline``) → its report. The run directory is held (and checked against the run's recorded settings) from
    start to end: :func:`fusion_jax.pipeline.open_run`."""
    if not cfg.demo.enabled and not cfg.baseline:
        return pipeline.main(cfg)
    pipeline.check_inputs(cfg)  # before the demo's assets take minutes to build
    mesh_lib.initialize_distributed(cfg.mesh)
    if cfg.dry_run and not cfg.demo.enabled:  # reads the target's config only: writes and holds nothing
        return pipeline.dry_run(cfg)
    with pipeline.open_run(cfg):
        return _main(cfg)


def _main(cfg: TrainConfig) -> dict:
    timings = {}
    if cfg.demo.enabled:
        t = time.perf_counter()
        cfg = build.apply(cfg)
        dataclasses.replace(cfg, demo=dataclasses.replace(cfg.demo, enabled=False)).validate()  # as a user's run
        if cfg.demo.tasks and not cfg.dry_run:
            task_dir = Path(cfg.run_dir) / "tasks"
            names = demo_tasks.write_tasks(pipeline.documents_stage(cfg), task_dir, cfg.demo.seed)
            tasks = dataclasses.replace(cfg.train.tasks, names=tuple(dict.fromkeys(cfg.train.tasks.names + names)),
                                        include=tuple(dict.fromkeys(cfg.train.tasks.include + (str(task_dir),))))
            cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, tasks=tasks))
        timings["demo assets"] = time.perf_counter() - t
    if cfg.dry_run:
        return pipeline.dry_run(cfg)
    if cfg.baseline:
        documents = pipeline.documents_stage(cfg)
        if not len(DocumentStore(documents, "validation")):
            raise InputError(f"{documents} has no held-out documents to compare the runs on: raise "
                             "data.validation_fraction or the corpus size (and use another run_dir)")
    t = time.perf_counter()
    report = pipeline.fusion_run(cfg)
    timings["fusion run"] = time.perf_counter() - t
    report["timings"] = timings
    if cfg.baseline:
        report = compare.main(cfg, report)
    return report
