"""The export stage: the trained target as a Hugging Face checkpoint in ``<run_dir>/export``, in
``train.export_dtype``, the step and dtype it holds recorded in its marker (an export of another step or dtype is
replaced)."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import jax

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import TrainConfig
from fusion_jax.convert import checkpoint
from fusion_jax.files import as_path, atomic_write_json, remove_tree
from fusion_jax.tokenizers.gguf import is_gguf

log = logging.getLogger(__name__)
EXPORT_STEP = "run_step"  # the key, in an export's marker (checkpoint.EXPORT_MARKER), of the step it holds
EXPORT_DTYPE = "dtype"  # and of its weights' dtype


def _marker(export_dir: str | os.PathLike) -> dict:
    try:
        marker = json.loads((as_path(export_dir) / checkpoint.EXPORT_MARKER).read_text())
        return marker if isinstance(marker, dict) else {}
    except (OSError, ValueError):
        return {}


def export_step(export_dir: str | os.PathLike) -> int | None:
    """The step of its run an export holds (``run_step`` in its marker, ``fusion_jax_export.json``), or None: no
    export, or one whose write did not finish or that predates the record."""
    try:
        return int(_marker(export_dir)[EXPORT_STEP])
    except (ValueError, KeyError, TypeError):
        return None


def export_stage(cfg: TrainConfig, model_cfg: ModelConfig, params, step: int) -> str:
    """The params of ``step`` as a Hugging Face checkpoint in ``<run_dir>/export``, the step recorded in its marker;
    an export of another step (or of an unknown one) is replaced: written beside it, then swapped in."""
    out = as_path(cfg.run_dir) / "export"
    dtype = cfg.train.export_dtype
    if export_step(out) == step and _marker(out).get(EXPORT_DTYPE, "float32") == dtype:
        log.info("export: %s holds step %d in %s already; kept", out, step, dtype)
        return str(out)
    if out.exists() and not (out / checkpoint.EXPORT_MARKER).exists() and jax.process_index() == 0:
        log.info("export: %s is of an earlier fusion_jax (no marker): replacing it", out)
        remove_tree(out)  # the run's own; convert's overwrite check knows an export by its marker
    mesh_lib.sync(f"fusion_jax:export:{out}")
    model_type, hf_config = checkpoint.source_info(cfg.target)
    tok_dir = Path(cfg.target_tokenizer or cfg.target)
    if dtype != model_cfg.param_dtype:  # cast on the devices, in their shards: no host holds the model twice
        params = jax.jit(lambda p: jax.tree.map(lambda x: x.astype(dtype), p))(params)
        model_cfg = dataclasses.replace(model_cfg, param_dtype=dtype)
    checkpoint.save_hf(out, model_cfg, params, model_type=model_type, hf_config=hf_config,
                       tokenizer_dir=tok_dir if tok_dir.is_dir() or is_gguf(tok_dir) else tok_dir.parent,
                       overwrite=True)
    if jax.process_index() == 0:  # a crash before this leaves no step: the next run exports again
        marker = json.loads((out / checkpoint.EXPORT_MARKER).read_text())
        atomic_write_json(out / checkpoint.EXPORT_MARKER, {**marker, EXPORT_STEP: step, EXPORT_DTYPE: dtype})
    return str(out)
