"""Model directories: our Orbax format, Hugging Face in and out, one `load` for both.

Our format (a directory):
    fusion_jax.json   format tag and version, the ModelConfig, the HF model_type and original config.json
    params/           Orbax checkpoint of the params tree (sharded save and restore)
    tokenizer files   copied from the HF directory it came from

Every writer builds `<out>.partial` and renames it to `<out>` only when complete, so a crash never leaves something
that looks finished; `fusion_jax.json` is written last, and a directory without it is reported as incomplete.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fusion_jax import config_loader, mesh as mesh_lib
from fusion_jax.convert import hf
from fusion_jax.convert.architectures import architecture
from fusion_jax.convert.hf import CheckpointError
from fusion_jax.models import decoder
from fusion_jax.models.config import ModelConfig

META = "fusion_jax.json"
FORMAT = "fusion_jax.model"
VERSION = 1


def kind(path: str | os.PathLike) -> str:
    """'fusion_jax' or 'hf'; a clear error for anything else, including a half-written directory."""
    p = Path(path)
    partial = Path(f"{p}.partial")
    if not p.exists():
        hint = f" ({partial} exists: an earlier write crashed; delete it and convert again)" if partial.exists() else ""
        raise CheckpointError(f"{p} does not exist{hint}")
    if (p / META).exists():
        return "fusion_jax"
    if (p / "config.json").exists():
        return "hf"
    if (p / "params").exists():
        raise CheckpointError(f"{p} is an incomplete fusion_jax checkpoint (no {META}): its write did not finish")
    raise CheckpointError(f"{p} is not a model checkpoint: expected {META} (fusion_jax) or config.json + *.safetensors (Hugging Face)")


def _read_meta(path: Path) -> dict:
    meta = json.loads((path / META).read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path / META} has format {meta.get('format')!r} version {meta.get('version')!r}; "
            f"this fusion_jax reads {FORMAT!r} version {VERSION}"
        )
    return meta


def model_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of either kind of directory, without reading any weights (for abstract shapes)."""
    p = Path(path)
    if kind(p) == "hf":
        ckpt = hf.HFCheckpoint(p)
        return architecture(ckpt.model_type).config_from_hf(ckpt.config, **{"param_dtype": ckpt.dtype(), **overrides})
    meta = _read_meta(p)
    return config_loader.from_dict(ModelConfig, {**meta["model"], **overrides}, source=str(p / META))


def load(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
    **overrides,
) -> tuple[ModelConfig, dict]:
    """Load a fusion_jax or Hugging Face model directory → (ModelConfig, params) placed on `mesh`.

    `overrides` replace ModelConfig fields (e.g. param_dtype="bfloat16", compute_dtype="float32"); params are
    cast to the resulting param_dtype, which defaults to the dtype the checkpoint holds. Without a mesh, all
    devices form a data-parallel mesh (params replicated unless `rules` shard them).
    """
    p = Path(path)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(mesh_lib.MeshConfig())
    rules = rules if rules is not None else mesh_lib.DEFAULT_RULES
    if kind(p) == "hf":
        ckpt = hf.HFCheckpoint(p)
        overrides = {"param_dtype": ckpt.dtype(), **overrides}
        cfg = architecture(ckpt.model_type).config_from_hf(ckpt.config, **overrides)
        return cfg, hf.load_hf_params(ckpt, cfg, decoder.param_shardings(cfg, mesh, rules))
    meta = _read_meta(p)
    cfg = config_loader.from_dict(ModelConfig, {**meta["model"], **overrides}, source=str(p / META))
    shardings = decoder.param_shardings(cfg, mesh, rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), decoder.abstract_params(cfg), shardings
    )
    return cfg, ocp.StandardCheckpointer().restore((p / "params").absolute(), target)


def _start(out: Path, overwrite: bool) -> Path:
    """Prepare `<out>.partial` (removing one left by a crash); refuse to replace `out` unless asked."""
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out} already exists; pass overwrite (--set overwrite=true) to replace it")
    tmp = Path(f"{out}.partial")
    if jax.process_index() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices(f"fusion_jax:start:{out}")
    return tmp


def _finish(tmp: Path, out: Path) -> None:
    multihost_utils.sync_global_devices(f"fusion_jax:finish:{out}")
    if jax.process_index() == 0:
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    multihost_utils.sync_global_devices(f"fusion_jax:renamed:{out}")


def _copy_tokenizer(src: Path | None, dst: Path) -> None:
    if src is None or jax.process_index() != 0:
        return
    for name in hf.TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def save(
    out: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    *,
    model_type: str,
    hf_config: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write our format atomically. `model_type`/`hf_config` let the model be exported back to HF later."""
    out = Path(out).absolute()
    architecture(model_type)
    tmp = _start(out, overwrite)
    ckpt = ocp.StandardCheckpointer()
    ckpt.save(tmp / "params", params)
    ckpt.wait_until_finished()
    _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp)
    if jax.process_index() == 0:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": config_loader.to_dict(cfg),
            "hf_model_type": model_type,
            "hf_config": hf_config,
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))
    _finish(tmp, out)
    return out


def save_hf(
    out: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    *,
    model_type: str,
    hf_config: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
) -> Path:
    """Write a Hugging Face directory (safetensors + config.json + tokenizer) that transformers loads."""
    out = Path(out).absolute()
    tmp = _start(out, overwrite)
    hf.write_hf_dir(tmp, cfg, params, model_type, hf_config, max_shard_bytes)
    _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp)
    _finish(tmp, out)
    return out


def source_info(path: str | os.PathLike) -> tuple[str, dict]:
    """(HF model_type, original HF config) of either kind of directory, for export."""
    p = Path(path)
    if kind(p) == "hf":
        ckpt = hf.HFCheckpoint(p)
        return ckpt.model_type, ckpt.config
    meta = _read_meta(p)
    return meta["hf_model_type"], meta.get("hf_config") or {}
