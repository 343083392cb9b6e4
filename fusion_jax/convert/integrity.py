"""Checks that loaded weights are what was saved: every param finite, and a content fingerprint of the weight files.

The finiteness check runs on the devices, one reduction per param (per layer for the stacked layer params), so no
host ever holds the model; only the counts come back.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fusion_jax.errors import CheckpointError
from fusion_jax.files import cached_file_sha256

ParamPath = tuple[str, ...]
# (param path, layer or None) → how the user knows that tensor (e.g. its Hugging Face name).
TensorNamer = Callable[[ParamPath, "int | None"], str]


def _is_layered(path: ParamPath) -> bool:
    return bool(path) and path[0] == "layers"  # stacked: a leading layer axis (decoder.param_specs)


def nonfinite_counts(params, mesh: Mesh) -> dict[ParamPath, np.ndarray]:
    """Per param: the number of NaN/inf values (int32[num_layers] for the stacked layer params, a scalar otherwise),
    computed where the params live."""
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    paths = [tuple(str(getattr(k, "key", k)) for k in key_path) for key_path, _ in flat]
    layered = [_is_layered(p) for p in paths]

    def count(leaves):
        return [jnp.sum(~jnp.isfinite(x), axis=tuple(range(1, x.ndim)) if lay else None, dtype=jnp.int32)
                for x, lay in zip(leaves, layered)]

    with jax.set_mesh(mesh):
        counts = jax.jit(count, out_shardings=NamedSharding(mesh, PartitionSpec()))([x for _, x in flat])
    # Replicated: every process reads its own copy (no gather across hosts).
    return {p: np.asarray(c.addressable_data(0)) for p, c in zip(paths, counts)}


def check_finite(params, mesh: Mesh, where: str, namer: TensorNamer | None = None, fix: str = "") -> None:
    """Raise a CheckpointError naming every tensor (and layer) that holds NaN or inf values."""
    namer = namer or (lambda path, layer: ".".join(path) + ("" if layer is None else f" (layer {layer})"))
    problems = []
    for path, n in nonfinite_counts(params, mesh).items():
        if n.ndim:
            problems += [(namer(path, int(layer)), int(n[layer])) for layer in np.flatnonzero(n)]
        elif n:
            problems.append((namer(path, None), int(n)))
    if problems:
        listed = "; ".join(f"{name}: {n:,}" for name, n in problems[:8]) + (" …" if len(problems) > 8 else "")
        total = sum(n for _, n in problems)
        raise CheckpointError(f"{where}: {total:,} parameter values are NaN or inf ({listed}); the checkpoint is "
                              f"corrupted or the model diverged{'; ' + fix if fix else ''}")


def fingerprint_files(root: str | os.PathLike, files: Iterable[Path]) -> str:
    """sha256 over the files' paths (relative to `root`), sizes and contents. Each file's hash is remembered by path,
    size and mtime (`files.cached_file_sha256`), so only new or changed files are read."""
    root = Path(root)
    files = sorted(files)
    h = hashlib.sha256(b"fusion_jax.weights.v1\0")
    for f in files:
        h.update(f"{f.relative_to(root).as_posix()}\0{f.stat().st_size}\0{cached_file_sha256(f)}\n".encode())
    return h.hexdigest()


def on_process_0(compute: Callable[[], str]) -> str:
    """`compute()` (a sha256 hex digest) run on process 0 only and sent to every process of a multi-host run, so
    the hosts do not all read the same files."""
    if jax.process_count() == 1:
        return compute()
    from jax.experimental import multihost_utils

    data = np.frombuffer(bytes.fromhex(compute()), np.uint8) if jax.process_index() == 0 else np.zeros(32, np.uint8)
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(data)).astype(np.uint8)).hex()
