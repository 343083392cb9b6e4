"""The export stage: the trained target as a Hugging Face checkpoint in ``<run_dir>/export``, the step it holds
recorded in its marker (an export of another step is replaced)."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import jax

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import TrainConfig
from fusion_jax.convert import checkpoint
from fusion_jax.files import atomic_write_json
from fusion_jax.tokenizers.gguf import is_gguf

log = logging.getLogger(__name__)
EXPORT_STEP = "run_step"  # the key, in an export's marker (checkpoint.EXPORT_MARKER), of the step it holds


def export_step(export_dir: str | os.PathLike) -> int | None:
    """The step of its run an export holds (``run_step`` in its marker, ``fusion_jax_export.json``), or None: no
    export, or one whose write did not finish or that predates the record."""
    try:
        return int(json.loads((Path(export_dir) / checkpoint.EXPORT_MARKER).read_text())[EXPORT_STEP])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_stage(cfg: TrainConfig, model_cfg: ModelConfig, params, step: int) -> str:
    """The params of ``step`` as a Hugging Face checkpoint in ``<run_dir>/export``, the step recorded in its marker;
    an export of another step (or of an unknown one) is replaced: written beside it, then swapped in."""
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
                       tokenizer_dir=tok_dir if tok_dir.is_dir() or is_gguf(tok_dir) else tok_dir.parent,
                       overwrite=True)
    if jax.process_index() == 0:  # a crash before this leaves no step: the next run exports again
        marker = json.loads((out / checkpoint.EXPORT_MARKER).read_text())
        atomic_write_json(out / checkpoint.EXPORT_MARKER, {**marker, EXPORT_STEP: step})
    return str(out)
