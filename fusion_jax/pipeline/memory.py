"""``--dry-run``: the sharded train state built abstractly and its bytes per device printed; nothing allocated,
nothing written."""

from __future__ import annotations

import jax
import numpy as np

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.schema import TrainConfig
from fusion_jax.convert import checkpoint
from fusion_jax.files import json_dumps
from fusion_jax.models import decoder
from fusion_jax.pipeline.stages import teacher_list
from fusion_jax.train.optim import make_optimizer
from fusion_jax.train.step import abstract_state


def dry_run(cfg: TrainConfig) -> dict:
    """The sharded train state built abstractly: bytes per device of params and optimizer state (and of online
    teachers), each param's shape and sharding, the largest per-device leaf and what stays replicated; nothing
    allocated. Activations and the step's temporaries are not included (docs/scaling.md)."""
    mesh = mesh_lib.make_mesh(cfg.mesh)
    model_cfg = checkpoint.model_config(cfg.target, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                                        remat=cfg.remat)
    abstract = abstract_state(model_cfg, make_optimizer(cfg.optimizer, cfg.train.steps), mesh, cfg.mesh.rules)
    per_device, largest, replicated, param_leaves = _state_bytes(abstract, mesh)
    for t in teacher_list(cfg):
        if t.mode == "online":  # frozen params in capture.param_dtype, sharded like the target's
            per_device[f"online/{t.name}"] = _online_bytes(cfg, t.checkpoint, mesh)
    report = {"mesh": dict(mesh.shape), "params": sum(int(np.prod(a.shape)) for a in
                                                      jax.tree.leaves(abstract["params"])),
              "bytes_per_device": per_device, "largest_leaf_per_device": largest, "replicated": replicated,
              "teachers": {t.name: t.mode for t in teacher_list(cfg)}, "param_shardings": param_leaves}
    print(_json_lines(report))
    return report


def _state_bytes(abstract: dict, mesh) -> tuple[dict, dict, dict, dict]:
    """The abstract state's (bytes per device by part, largest per-device leaf, replicated leaves and their bytes,
    each param's shape, dtype, spec and shard shape)."""
    per_device, param_leaves = {}, {}
    largest = {"leaf": "", "bytes": -1}
    replicated = {"leaves": 0, "bytes": 0}  # leaves every device holds whole (step counters, or a layout bug)
    for name, tree in abstract.items():
        total = 0
        for path, a in jax.tree_util.tree_leaves_with_path(tree):
            shard = a.sharding.shard_shape(a.shape)
            nbytes = int(np.prod(shard)) * a.dtype.itemsize
            total += nbytes
            where = "/".join(filter(None, [name, jax.tree_util.keystr(path, simple=True, separator="/")]))
            if nbytes > largest["bytes"]:
                largest = {"leaf": where, "bytes": nbytes}
            if tuple(shard) == tuple(a.shape) and len(mesh.devices.flat) > 1:
                replicated = {"leaves": replicated["leaves"] + 1, "bytes": replicated["bytes"] + nbytes}
            if name == "params":
                param_leaves[where.removeprefix("params/")] = {
                    "shape": list(a.shape), "dtype": str(a.dtype), "spec": [list(s) if isinstance(s, tuple) else s
                                                                            for s in a.sharding.spec],
                    "shard_shape": list(shard)}
        per_device[name] = total
    return per_device, largest, replicated, param_leaves


def _online_bytes(cfg: TrainConfig, teacher_checkpoint: str, mesh) -> int:
    """Bytes per device of an online teacher's frozen params (``capture.param_dtype``, sharded like the target's)."""
    t_cfg = checkpoint.model_config(teacher_checkpoint, param_dtype=cfg.capture.param_dtype)
    shardings = decoder.param_shardings(t_cfg, mesh, cfg.mesh.rules)
    return sum(int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
               for a, s in zip(jax.tree.leaves(decoder.abstract_params(t_cfg)), jax.tree.leaves(shardings)))


def _json_lines(obj, depth: int = 0) -> str:
    """JSON with one line per entry of the top two levels and anything deeper compact (one line per param leaf)."""
    if isinstance(obj, dict) and obj and depth < 2:
        pad = " " * (depth + 1)
        items = ",\n".join(f"{pad}{json_dumps(k)}: {_json_lines(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + items + "\n" + " " * depth + "}"
    return json_dumps(obj)
