"""Training checkpoints: Orbax ``CheckpointManager`` with the train state and the data-loader state.

``<run_dir>/checkpoints/<step>/`` holds ``state`` (params, optimizer state, step; saved and restored shard by shard
into the run's shardings) and ``loader`` (a small JSON dict). Saves are asynchronous (the device → host copy blocks,
the writes do not); Orbax commits a step only when it is complete, so a run killed at any moment restarts from the
newest complete step. ``keep`` bounds how many are kept.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class Checkpoints:
    def __init__(self, directory: str | Path, keep: int = 3, async_save: bool = True):
        self.directory = Path(directory).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "loader"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """→ (state placed as ``abstract_state`` says, loader state, step) of ``step`` (default: the newest)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()))
        return out["state"], out["loader"], step

    def save(self, step: int, state: Any, loader_state: dict) -> None:
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
