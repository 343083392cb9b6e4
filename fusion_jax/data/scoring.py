"""Rows of tokens through a jitted step on the mesh, from every process at once (capture and evaluation).

Each process feeds its own ``local`` rows to each global batch (``jax.make_array_from_process_local_data``) and gets
its own rows of the outputs back. Every process runs the same number of batches (the most any process needs; a
process out of rows feeds padding), and the next batch is dispatched before the previous one is fetched, so the
devices compute while the host handles the last results.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fusion_jax import mesh as mesh_lib


@dataclasses.dataclass(frozen=True)
class RowStep:
    """A jitted step over global batches of rows and what it takes to feed it from this process."""

    step: Callable          # (params, *inputs [batch_size, seq_len]) → outputs, jitted with the outputs' shardings
    params: Any
    mesh: jax.sharding.Mesh
    input_sharding: jax.NamedSharding  # of every input
    output_specs: Any       # the outputs' PartitionSpecs (a matching pytree)
    local: int              # rows of each batch this process feeds
    row_arrays: Callable[[Any], tuple[np.ndarray, ...]]  # a row (None: padding) → its inputs, each [seq_len]

    def dispatch(self, batch: Sequence) -> Any:
        """Start the step on up to ``local`` rows (padded with empty rows); returns the device outputs (JAX
        dispatches asynchronously)."""
        arrays = [self.row_arrays(r) for r in batch] + [self.row_arrays(None)] * (self.local - len(batch))
        inputs = [jax.make_array_from_process_local_data(self.input_sharding, np.stack([a[i] for a in arrays]))
                  for i in range(len(arrays[0]))]
        with jax.set_mesh(self.mesh):
            return self.step(self.params, *inputs)

    def fetch(self, outputs) -> Any:
        """This process's rows of the outputs, on the host (numpy, the outputs' pytree structure)."""
        if jax.process_count() > 1:
            outputs = multihost_utils.global_array_to_host_local_array(outputs, self.mesh, self.output_specs)
        return jax.tree.map(np.asarray, outputs)

    def __call__(self, batch: Sequence) -> Any:
        return self.fetch(self.dispatch(batch))


def score_rows(run: RowStep, rows: Sequence, on_batch: Callable[[Sequence, Any], None]) -> None:
    """All of this process's `rows` through the step, ``run.local`` at a time: ``on_batch(batch, outputs)`` for each
    batch in order, with ``outputs[j]`` (per output) the rows of ``batch[j]`` (a batch past this process's rows is
    empty). A collective: every process calls it, with the same step."""
    local = run.local
    n_steps = mesh_lib.max_over_processes(-(-len(rows) // local))
    in_flight = None  # (batch, device outputs) of the batch dispatched last
    for i in range(n_steps + 1):
        batch = rows[i * local:(i + 1) * local]
        launched = run.dispatch(batch) if i < n_steps else None
        if in_flight is not None:
            on_batch(in_flight[0], run.fetch(in_flight[1]))
        in_flight = (batch, launched) if launched is not None else None
