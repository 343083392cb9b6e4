"""Device mesh (data, fsdp, tensor) from config, logical-axis rules → NamedSharding, multi-host start.

Code names array dimensions logically (`batch, seq, embed, vocab, heads, kv_heads, head_dim, mlp, layers`); one
rules table in the config says which mesh axes each logical name is split over. A dimension that the mesh axes do
not divide stays replicated, so one config works from 1 CPU to a pod.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fusion_jax.config.schema import MESH_AXES, MeshConfig
from fusion_jax.errors import ConfigError

log = logging.getLogger(__name__)


def _on_cloud_tpu_vm() -> bool:
    """JAX's own import-time check (libtpu installed and TPU chips present): true on every Cloud TPU VM worker."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:  # a JAX without the module: no TPU detection
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _env_int(environ: Mapping[str, str], name: str) -> int | None:
    value = environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def _cluster_detected(environ: Mapping[str, str], on_cloud_tpu: bool) -> bool:
    hosts = environ.get("TPU_WORKER_HOSTNAMES", "")
    platforms = environ.get("JAX_PLATFORMS", "")
    return (
        (on_cloud_tpu and (not platforms or "tpu" in platforms))  # Cloud TPU VMs: JAX reads the slice from metadata
        or "," in hosts
        or (_env_int(environ, "SLURM_NTASKS") or 1) > 1
        or (_env_int(environ, "OMPI_COMM_WORLD_SIZE") or 1) > 1
        or bool(environ.get("JAX_COORDINATOR_ADDRESS"))
    )


def distributed_kwargs(
    cfg: MeshConfig, environ: Mapping[str, str] | None = None, on_cloud_tpu: bool | None = None
) -> dict[str, Any] | None:
    """The keyword arguments ``initialize_distributed`` passes to ``jax.distributed.initialize``; None: this process
    runs alone (or ``multihost: off``), so nothing is started.

    Each of coordinator address, process count and process id comes from ``mesh.*`` when set, else from the
    environment: ``JAX_COORDINATOR_ADDRESS`` (also read by JAX itself), ``JAX_NUM_PROCESSES``, ``JAX_PROCESS_ID``
    (``launch/slurm_gpu.sbatch`` sets all three). Arguments given neither way are left to JAX's cluster detection
    (Cloud TPU VMs, SLURM, Open MPI), and ``{}`` means "detect everything". ``JAX_LOCAL_DEVICE_IDS`` (which
    accelerators this process drives) is read by JAX itself.
    """
    env = os.environ if environ is None else environ
    if cfg.multihost == "off":
        return None
    given = {
        "coordinator_address": cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS") or None,
        "num_processes": cfg.num_processes if cfg.num_processes is not None else _env_int(env, "JAX_NUM_PROCESSES"),
        "process_id": cfg.process_id if cfg.process_id is not None else _env_int(env, "JAX_PROCESS_ID"),
    }
    kwargs = {k: v for k, v in given.items() if v is not None}
    if kwargs:
        return kwargs
    if _cluster_detected(env, _on_cloud_tpu_vm() if on_cloud_tpu is None else on_cloud_tpu):
        return {}
    return None


def initialize_distributed(cfg: MeshConfig) -> None:
    """Start JAX's multi-controller runtime when this is one process of several; a no-op on one host."""
    if jax.distributed.is_initialized():
        return
    kwargs = distributed_kwargs(cfg)
    if kwargs is None:
        return
    # CPU processes (tests, CPU clusters) need a collectives backend; accelerators ignore this setting.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kwargs)  # {}: TPU pods, SLURM and Open MPI describe themselves
    log.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())


def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if num_devices % fixed:
            raise ConfigError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide {num_devices} devices")
        sizes[sizes.index(-1)] = num_devices // fixed
    if int(np.prod(sizes)) != num_devices:
        raise ConfigError(
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


def allgather_json(obj) -> list:
    """Every process's `obj` (JSON-serialisable), in process order."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    n = max_over_processes(len(data))
    lengths = np.asarray(multihost_utils.process_allgather(np.asarray([len(data)], np.int64))).reshape(-1)
    buf = np.zeros(n, np.uint8)
    buf[:len(data)] = data
    everyone = np.asarray(multihost_utils.process_allgather(buf)).reshape(len(lengths), n)
    return [json.loads(everyone[i, :lengths[i]].tobytes()) for i in range(len(lengths))]


def to_host(x: jax.Array) -> np.ndarray:
    """The whole of a global array on this host (gathered from every process when it spans several)."""
    if not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
