"""Device mesh (data, fsdp, tensor) from config, logical-axis rules → NamedSharding, multi-host start.

Code names array dimensions logically (`batch, seq, embed, vocab, heads, kv_heads, head_dim, mlp, layers`); one
rules table in the config says which mesh axes each logical name is split over. A dimension that the mesh axes do
not divide stays replicated, so one config works from 1 CPU to a pod.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Literal, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")

DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "seq": (),
    "head_dim": (),
    "layers": (),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape (−1 on one axis: all remaining devices) and the logical-axis sharding rules."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, tuple[str, ...]] = dataclasses.field(default_factory=lambda: dict(DEFAULT_RULES))
    multihost: Literal["auto", "off"] = "auto"
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ValueError(f"at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
        for name, axes in self.rules.items():
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ValueError(f"rules.{name} names unknown mesh axes {bad}; mesh axes are {list(MESH_AXES)}")


def _cluster_detected() -> bool:
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return (
        "," in hosts
        or int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
        or "JAX_COORDINATOR_ADDRESS" in os.environ
    )


def initialize_distributed(cfg: MeshConfig) -> None:
    """Start JAX's multi-controller runtime when this is one process of several; a no-op on one host."""
    if cfg.multihost == "off" or jax.distributed.is_initialized():
        return
    if cfg.coordinator_address is not None or _cluster_detected():
        # CPU processes (tests, CPU clusters) need a collectives backend; accelerators ignore this setting.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if cfg.coordinator_address is not None:
        jax.distributed.initialize(
            coordinator_address=cfg.coordinator_address, num_processes=cfg.num_processes, process_id=cfg.process_id
        )
    elif _cluster_detected():
        jax.distributed.initialize()  # TPU pods, SLURM and Open MPI describe themselves
    else:
        return
    log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise ValueError(
            f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices but {num_devices} are available; "
            "set one axis to -1 to use all of them"
        )
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh with explicit Auto axis types (the default changed across JAX releases)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = mesh_shape(cfg, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_to_spec(
    logical: Sequence[str | None], rules: dict[str, tuple[str, ...]], mesh: Mesh | None = None, shape: Sequence[int] | None = None
) -> PartitionSpec:
    """Logical dimension names → PartitionSpec. Mesh axes of size 1, axes already used by an earlier dimension,
    and axes that do not divide the dimension (when mesh and shape are given) are dropped."""
    used: set[str] = set()
    spec = []
    for i, name in enumerate(logical):
        axes = []
        for axis in rules.get(name, ()) if name is not None else ():
            if axis in used or (mesh is not None and mesh.shape[axis] == 1):
                continue
            axes.append(axis)
        if mesh is not None and shape is not None and axes:
            while axes and shape[i] % int(np.prod([mesh.shape[a] for a in axes])):
                axes.pop()
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else tuple(axes))
    return PartitionSpec(*spec)


def tree_shardings(mesh: Mesh, rules: dict[str, tuple[str, ...]], logical_tree, shape_tree):
    """NamedShardings for a pytree, given its logical axes (tuples) and shapes (anything with .shape)."""
    return jax.tree.map(
        lambda names, x: NamedSharding(mesh, logical_to_spec(names, rules, mesh, x.shape)),
        logical_tree,
        shape_tree,
        is_leaf=lambda n: isinstance(n, tuple),
    )


def constrain(x: jax.Array, logical: Sequence[str | None], rules: dict[str, tuple[str, ...]] | None) -> jax.Array:
    """with_sharding_constraint by logical names when a mesh is set (jax.set_mesh); identity otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if rules is None or mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(logical, rules, mesh, x.shape))


def sync(name: str) -> None:
    """A barrier across processes (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def max_over_processes(x: int) -> int:
    """The largest of every process's ``x`` (the same value on all of them)."""
    if jax.process_count() == 1:
        return x
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.asarray([x], np.int64))))
