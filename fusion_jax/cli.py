"""Shared entry point of the `python -m fusion_jax.<stage>` commands."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, TypeVar

C = TypeVar("C")


def config_parser(prog: str, doc: str | None, config_cls: type) -> argparse.ArgumentParser:
    """An argument parser with `--config FILE` / `--set KEY=VALUE` whose `--help` lists every key of `config_cls`."""
    from fusion_jax import config_loader

    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (--set KEY=VALUE):\n" + config_loader.describe(config_cls),
    )
    config_loader.add_config_arguments(parser)
    return parser


def parse_config(parser: argparse.ArgumentParser, config_cls: type, argv: list[str] | None,
                 flags: dict[str, str] | None = None):
    """Parse `argv` into a `config_cls`; each `flags` entry {argparse dest: "key=value"} turns a set flag
    (e.g. `--dry-run`) into that config override."""
    from fusion_jax import config_loader

    args = parser.parse_args(argv)
    for dest, override in (flags or {}).items():
        if getattr(args, dest):
            args.overrides = [*(args.overrides or []), override]
    return config_loader.config_from_args(config_cls, args)


def run(main: Callable[[C], object], parse: Callable[[], C]) -> None:
    """Parse the config and run `main`; configuration and input errors end in one clear line, not a traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        main(parse())
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
