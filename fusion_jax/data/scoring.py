"""Rows of tokens through a jitted step on the mesh, from every process at once (capture and evaluation).

The items to score (documents, or windows of them) are packed into batches of rows sized to them
(:func:`pack_batches`): a batch's rows all have one length, the shortest of a few lengths (:func:`row_lengths`) that
holds its longest item, so short documents are not padded to ``seq_len`` and attend over short rows (on CPU a
SmolLM2-135M forward runs 367 tokens/s at 256-token rows, 270 at 1024). Each row length compiles the step once.

Each process feeds its own ``local`` rows to each global batch (``jax.make_array_from_process_local_data``) and gets
its own rows of the outputs back. Every process runs the same number of batches (the most any process needs; a
process out of rows feeds padding) at the same row length (the longest any process needs), and the next batch is
dispatched before the previous one is fetched, so the devices compute while the host handles the last results.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.errors import ConfigError
from fusion_jax.models.head import ce_greedy_step, ce_step


@dataclasses.dataclass(frozen=True)
class Batch:
    """One batch of one process: ``rows[j]`` the items packed into row j from offset 0, every row ``length``
    tokens long (padding included)."""

    length: int
    rows: list[list]


def row_lengths(seq_len: int, steps: int = 8, shortest: int = 256) -> tuple[int, ...]:
    """The lengths a batch's rows may take: ``seq_len·j/steps`` for j = 1..steps, rounded up to a multiple of 8, and
    at least `shortest` (at most ``seq_len``): at most `steps` compiled shapes, an item padded by at most
    ``seq_len/steps``, and no compilation for rows too short to be worth one (a ``seq_len`` ≤ `shortest` is one
    shape)."""
    def round_up(x: int, m: int) -> int:
        return -(-x // m) * m

    floor = min(seq_len, shortest)
    return tuple(sorted({min(seq_len, max(floor, round_up(round_up(seq_len * j, steps) // steps, 8)))
                         for j in range(1, steps + 1)}))


def pack_batches(sizes: Sequence[int], rows_per_batch: int, lengths: Sequence[int],
                 items: Sequence | None = None) -> list[Batch]:
    """Items of `sizes` tokens (each at most ``max(lengths)``) → batches of at most `rows_per_batch` rows that hold
    the items (`items`, default their indices), every item once, in first-fit-decreasing order: each batch takes the
    longest item left, its rows are the shortest of `lengths` that holds it, and the items left are placed, longest
    first, into the first row with room. Deterministic in `sizes` (ties in index order)."""
    lengths = sorted(lengths)
    if sizes and max(sizes) > lengths[-1]:
        raise ValueError(f"an item of {max(sizes)} tokens does not fit a row of at most {lengths[-1]}")
    left = sorted(range(len(sizes)), key=lambda i: (-sizes[i], i))
    batches = []
    while left:
        length = next(n for n in lengths if n >= sizes[left[0]])
        free = [length] * rows_per_batch
        rows: list[list[int]] = [[] for _ in range(rows_per_batch)]
        rest = []
        for i in left:
            r = next((r for r in range(rows_per_batch) if free[r] >= sizes[i]), None)
            if r is None:
                rest.append(i)
                continue
            rows[r].append(i)
            free[r] -= sizes[i]
        batches.append(Batch(length, [row if items is None else [items[i] for i in row] for row in rows if row]))
        left = rest
    return batches


@dataclasses.dataclass(frozen=True)
class RowStep:
    """A jitted step over global batches of rows and what it takes to feed it from this process."""

    step: Callable          # (params, *inputs [batch_size, length]) → outputs, jitted with the outputs' shardings
    params: Any
    mesh: jax.sharding.Mesh
    input_sharding: jax.NamedSharding  # of every input
    output_specs: Any       # the outputs' PartitionSpecs (a matching pytree)
    local: int              # rows of each batch this process feeds
    row_arrays: Callable[[Any, int], tuple[np.ndarray, ...]]  # (row (None: padding), length) → its inputs, each [length]

    def dispatch(self, rows: Sequence, length: int) -> Any:
        """Start the step on up to ``local`` rows of `length` tokens (padded with empty rows); returns the device
        outputs (JAX dispatches asynchronously)."""
        arrays = [self.row_arrays(r, length) for r in rows] + [self.row_arrays(None, length)] * (self.local - len(rows))
        inputs = [jax.make_array_from_process_local_data(self.input_sharding, np.stack([a[i] for a in arrays]))
                  for i in range(len(arrays[0]))]
        with jax.set_mesh(self.mesh):
            return self.step(self.params, *inputs)

    def fetch(self, outputs) -> Any:
        """This process's rows of the outputs, on the host (numpy, the outputs' pytree structure)."""
        if jax.process_count() > 1:
            outputs = multihost_utils.global_array_to_host_local_array(outputs, self.mesh, self.output_specs)
        return jax.tree.map(np.asarray, outputs)

    def __call__(self, rows: Sequence, length: int) -> Any:
        return self.fetch(self.dispatch(rows, length))


def score_rows(run: RowStep, batches: Sequence[Batch], on_batch: Callable[[list, Any], None]) -> None:
    """This process's `batches` (at most ``run.local`` rows each) through the step: ``on_batch(rows, outputs)`` for
    each batch in order, with ``outputs[j]`` (per output) the tokens of ``rows[j]`` (a batch past this process's
    batches is empty). A collective: every process calls it, with the same step."""
    n_steps = mesh_lib.max_over_processes(len(batches))
    in_flight = None  # (rows, device outputs) of the batch dispatched last
    for i in range(n_steps + 1):
        batch = batches[i] if i < len(batches) else Batch(0, [])
        launched = None
        if i < n_steps:
            launched = run.dispatch(batch.rows, mesh_lib.max_over_processes(batch.length))
        if in_flight is not None:
            on_batch(in_flight[0], run.fetch(in_flight[1]))
        in_flight = (batch.rows, launched) if launched is not None else None


@functools.lru_cache(maxsize=16)
def compiled_ce_step(cfg: ModelConfig, chunk: int, rules_key: tuple, mesh, batch_size: int, seq_len: int,
                     greedy: bool = False) -> tuple[Callable, jax.NamedSharding]:
    """The jitted `ce_step` (`greedy`: `ce_greedy_step`) and the rows' sharding, built once per (model, mesh,
    shape): the training loop evaluates many times without recompiling. rules_key: the rules as sorted (name,
    axes) pairs (hashable)."""
    rules = {k: tuple(v) for k, v in rules_key}
    spec = mesh_lib.logical_to_spec(("batch", "seq"), rules, mesh, (batch_size, seq_len))
    if jax.process_count() > 1 and spec[0] is None:
        raise ConfigError(f"batch_size {batch_size} must be divisible by the batch mesh axes "
                         f"({rules.get('batch')}) in a multi-host run, so each process feeds its own rows")
    sharding = jax.NamedSharding(mesh, spec)
    fn = ce_greedy_step if greedy else ce_step
    with jax.set_mesh(mesh):
        step = jax.jit(lambda p, t, s, m: fn(cfg, chunk, rules, p, t, s, m), out_shardings=sharding)
    return step, sharding
