"""Shared entry point of the `python -m fusion_jax.<stage>` commands."""

from __future__ import annotations

import logging
import sys
from typing import Callable, TypeVar

C = TypeVar("C")


def run(main: Callable[[C], object], parse: Callable[[], C]) -> None:
    """Parse the config and run `main`; configuration and input errors end in one clear line, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        main(parse())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
