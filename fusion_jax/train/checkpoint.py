"""Training checkpoints: Orbax ``CheckpointManager`` with the train state and the data-loader state.

``<run_dir>/checkpoints/<step>/`` holds ``state`` (params, optimizer state, step; saved and restored shard by shard
into the run's shardings) and ``loader`` (a small JSON dict). Saves are asynchronous (the device → host copy blocks,
the writes do not); Orbax commits a step only when it is complete, so a run killed at any moment (``kill -9``;
Ctrl-C, after which the run still finishes the save in flight) restarts from the newest complete step. ``keep`` bounds
how many are kept.

A committed step can still be damaged afterwards (a truncated copy, a disk that failed, a file deleted by hand):
restoring then falls back to the newest step that restores, and moves the damaged ones aside to
``<directory>.damaged/<step>`` (kept for a look, out of the way of the steps the run saves again).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from typing import Any, Iterator

import jax
import orbax.checkpoint as ocp

from fusion_jax import mesh as mesh_lib
from fusion_jax.errors import CheckpointError
from fusion_jax.files import AnyPath, as_path, commit_directory, is_url

log = logging.getLogger(__name__)


def _first_line(e: BaseException, limit: int = 300) -> str:
    """The head of an error's message: TensorStore's run to pages (a whole array spec)."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return text if len(text) <= limit else text[:limit] + " …"


@contextlib.contextmanager
def _ctrl_c_deferred() -> Iterator[None]:
    """Hold a SIGINT (Ctrl-C) that arrives inside the block and handle it when the block is done."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) in (
            signal.SIG_IGN, None):
        yield
        return
    received: list[tuple[int, Any]] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append((signum, frame)))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:  # now handled as it would have been (Python's default handler raises KeyboardInterrupt)
        if not callable(previous):
            raise KeyboardInterrupt
        previous(*received[0])


def _drop_closed_loop_reports() -> None:
    """After a restore fails, TensorStore still finishes the reads in flight, and their callbacks post to Orbax's
    event loop, closed by then: each prints an "Event loop is closed" traceback at some later moment (through
    ``sys.unraisablehook``). They say nothing the restore's error did not: drop exactly those (installed once)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_closed_loop_reports", False):
        return

    def hook(unraisable) -> None:
        exc = unraisable.exc_value
        if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
            previous(unraisable)

    hook.drops_closed_loop_reports = True  # type: ignore[attr-defined]
    sys.unraisablehook = hook


# Orbax's default layout (OCDBT: a few large files per step). It commits with conditional writes, which the Cloud
# Storage emulator of tests/test_cloud.py does not implement: that test writes one zarr directory per array instead.
USE_OCDBT = True


class Checkpoints:
    def __init__(self, directory: str | AnyPath, keep: int = 3, async_save: bool = True):
        directory = as_path(directory)  # an object store's (gs://) is written by Orbax itself, through TensorStore
        self.directory = directory if is_url(directory) else directory.absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        handlers = {"state": ocp.StandardCheckpointHandler(use_ocdbt=USE_OCDBT), "loader": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "loader"),
                                             item_handlers=handlers)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """→ (state placed as ``abstract_state`` says, loader state, step) of ``step``, or by default of the newest
        checkpoint that restores: a newer one that does not is named in a warning and moved aside (see the module
        docstring). When none restores, a CheckpointError names the directory and what to do."""
        if step is not None:
            state, loader = self._restore(step, abstract_state)
            return state, loader, step
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        damaged: list[tuple[int, Exception]] = []
        for s in steps:
            try:
                state, loader = self._restore(s, abstract_state)
            except Exception as e:  # noqa: BLE001 - Orbax and TensorStore raise bare Exceptions for damaged files
                _drop_closed_loop_reports()
                log.warning("checkpoint %s does not restore (%s)", self.directory / str(s), _first_line(e))
                damaged.append((s, e))
                continue
            if damaged:
                self._set_aside([d for d, _ in damaged])
                log.warning("resuming from step %d: the newer checkpoint(s) %s did not restore and were moved to %s",
                            s, ", ".join(str(d) for d, _ in damaged), self.damaged_directory)
            return state, loader, s
        newest, error = damaged[0]
        raise CheckpointError(
            f"{self.directory}: none of the checkpoints (steps {', '.join(map(str, steps))}) restores; the newest, "
            f"step {newest}, fails with: {_first_line(error)}. If the target model or its config changed since this "
            f"run started, the checkpoints no longer fit it: use another run_dir. If their files are damaged (a "
            f"truncated copy, a full disk), delete {self.directory} to train this run from the start") from error

    @property
    def damaged_directory(self) -> AnyPath:
        return self.directory.with_name(self.directory.name + ".damaged")

    def _restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
        out = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()))
        return out["state"], out["loader"]

    def _set_aside(self, steps: list[int]) -> None:
        """Move damaged steps out of the manager's directory (process 0; every process then rereads the steps)."""
        if jax.process_index() == 0:
            self.damaged_directory.mkdir(parents=True, exist_ok=True)
            for step in steps:
                dest = self.damaged_directory / str(step)
                n = 1
                while dest.exists():
                    dest, n = self.damaged_directory / f"{step}-{n}", n + 1
                commit_directory(self.directory / str(step), dest)
        mesh_lib.sync(f"fusion_jax:checkpoints_set_aside:{self.directory}")
        self.manager.reload()

    def save(self, step: int, state: Any, loader_state: dict) -> None:
        """Start saving ``step`` (asynchronous). Ctrl-C while the save is being started waits until it is: Orbax
        left half-started would leave the step unfinished and its writer threads failing at exit."""
        with _ctrl_c_deferred():
            self.manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), loader=ocp.args.JsonSave(loader_state)), force=True)

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
