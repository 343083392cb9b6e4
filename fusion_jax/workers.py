"""Spawned worker processes that share one state built once per worker.

``spawn_map(fn, items, workers, init, *init_args)`` yields ``(item, fn(state, item))`` in the order of ``items``,
computed in ``workers`` processes started with ``spawn`` (forking a process that has run the Rust tokenizers'
threads can deadlock). Every worker builds ``state = init(*init_args)`` once, in its initializer, and keeps it in
this module's one private slot; ``fn``, ``init`` and ``init_args`` must be picklable (module-level functions).
A worker that raises re-raises in the caller at that item; one that dies raises ``BrokenProcessPool``.
"""

from __future__ import annotations

import collections
import concurrent.futures
import functools
import itertools
import multiprocessing
from typing import Any, Callable, Iterable, Iterator, TypeVar

S = TypeVar("S")
T = TypeVar("T")
R = TypeVar("R")

_state: Any = None  # this worker's state (set by _init in the spawned processes only)


def _init(init: Callable[..., Any], args: tuple) -> None:
    global _state
    _state = init(*args)


def _apply(fn: Callable[[Any, T], R], item: T) -> R:
    return fn(_state, item)


def spawn_map(fn: Callable[[S, T], R], items: Iterable[T], workers: int, init: Callable[..., S], *init_args: Any,
              chunksize: int = 1, window: int | None = None) -> Iterator[tuple[T, R]]:
    """``(item, fn(state, item))`` for every item, in order, from ``workers`` spawned processes.

    ``chunksize``: items sent to a worker per task. ``window``: read ``items`` that many at a time with at most
    three windows in flight (bounded memory for a long iterator); None submits them all at once.
    """
    call = functools.partial(_apply, fn)
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init,
                                                initargs=(init, init_args)) as ex:
        try:
            if window is None:
                items = list(items)
                yield from zip(items, ex.map(call, items, chunksize=chunksize))
                return
            it, pending = iter(items), collections.deque()
            while chunk := list(itertools.islice(it, window)):
                pending.append((chunk, ex.map(call, chunk, chunksize=chunksize)))
                if len(pending) > 2:
                    chunk, results = pending.popleft()
                    yield from zip(chunk, results)
            while pending:
                chunk, results = pending.popleft()
                yield from zip(chunk, results)
        finally:  # stopped early (an error here or in a worker): drop the queued work rather than finish it
            ex.shutdown(wait=True, cancel_futures=True)
