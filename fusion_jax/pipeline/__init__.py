"""The fusion run as stages: documents → capture → train → evaluate → export, each resumable (:mod:`.run`), in a
run directory of its own (:mod:`.run_dir`, :mod:`.identity`)."""

from fusion_jax.pipeline.export import export_stage, export_step
from fusion_jax.pipeline.identity import NOT_IDENTITY, differing_keys, run_identity
from fusion_jax.pipeline.memory import dry_run
from fusion_jax.pipeline.run import fusion_run, main
from fusion_jax.pipeline.run_dir import RUN_CONFIG, open_run, schedule_optimizer
from fusion_jax.pipeline.stages import (SPLITS, capture_stage, check_inputs, documents_stage, load_online, loader_config,
                                        teacher_list)

__all__ = [
    "NOT_IDENTITY", "RUN_CONFIG", "SPLITS", "capture_stage", "check_inputs", "differing_keys", "documents_stage",
    "dry_run", "export_stage", "export_step", "fusion_run", "load_online", "loader_config", "main", "open_run",
    "run_identity", "schedule_optimizer", "teacher_list",
]
