"""Shared entry point of the `python -m fusion_jax.<stage>` commands."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
from typing import Callable, TypeVar

C = TypeVar("C")


def config_parser(prog: str, doc: str | None, config_cls: type) -> argparse.ArgumentParser:
    """An argument parser with `--config FILE` / `--set KEY=VALUE` whose `--help` lists every key of `config_cls`."""
    from fusion_jax.config import loader as config_loader

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
    from fusion_jax.config import loader as config_loader

    args = parser.parse_args(argv)
    for dest, override in (flags or {}).items():
        if getattr(args, dest):
            args.overrides = [*(args.overrides or []), override]
    return config_loader.config_from_args(config_cls, args)


def run(main: Callable[[C], object], parse: Callable[[], C]) -> None:
    """Parse the config and run `main`. What the user can fix ends in one `error: …` line (exit 1): the errors we
    raise on purpose (`fusion_jax.errors.UserError` and its subclasses) and file-system errors (naming the path).
    Ctrl-C exits 130 with a note that the command resumes. Anything else, a bare ValueError included, is our bug
    (or a library's) and propagates with its full traceback."""
    from fusion_jax.errors import UserError

    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        main(parse())
    except KeyboardInterrupt:
        print("\ninterrupted: everything written so far is kept; run the same command again to resume",
              file=sys.stderr)
        sys.exit(130)
    except UserError as e:
        sys.exit(f"error: {e}")
    except OSError as e:
        sys.exit(f"error: {os_error_message(e)}")


_OS_ERROR_HINTS = {
    errno.ENOSPC: "free some space or choose another output, then run the same command again to resume",
    errno.EDQUOT: "free some space or choose another output, then run the same command again to resume",
    errno.EACCES: "check the permissions, or choose a directory you can write to",
    errno.EPERM: "check the permissions, or choose a directory you can write to",
    errno.EROFS: "the file system is read-only: choose a writable directory",
}


def os_error_message(e: OSError) -> str:
    """One line for a file-system error: what failed, on which path, and what to do about it."""
    message = e.strerror or str(e)
    if e.filename:
        message += f": {e.filename}" + (f" -> {e.filename2}" if e.filename2 else "")
    hint = _OS_ERROR_HINTS.get(e.errno or 0)
    return f"{message} ({hint})" if hint else message
