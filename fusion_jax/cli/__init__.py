"""Shared entry point of the `python -m fusion_jax.<stage>` commands."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import sys
from typing import Any, Callable, TypeVar

import yaml

from fusion_jax import hub
from fusion_jax.config import loader as config_loader
from fusion_jax.errors import UserError
from fusion_jax.files import check_paths

C = TypeVar("C")


def config_parser(prog: str, doc: str | None, config_cls: type) -> argparse.ArgumentParser:
    """An argument parser with `--config FILE` / `--set KEY=VALUE` whose `--help` lists every key of `config_cls`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (--set KEY=VALUE):\n" + config_loader.describe(config_cls),
    )
    config_loader.add_config_arguments(parser)
    return parser


def parse_config(parser: argparse.ArgumentParser, config_cls: type, argv: list[str] | None,
                 flags: dict[str, str] | None = None, shortcuts: dict[str, str] | None = None):
    """Parse `argv` into a `config_cls`. Each `shortcuts` entry {argparse dest: config key} turns a given value (not
    None: a string, number, bool or list; e.g. a positional OUTPUT) into the override `key=value`, applied before
    `--set`; each `flags` entry {argparse dest: "key=value"} turns a set flag (e.g. `--dry-run`) into that override,
    applied after `--set`."""
    args = parser.parse_args(argv)
    given = [(key, getattr(args, dest)) for dest, key in (shortcuts or {}).items()]
    overrides = [override_text(key, value) for key, value in given if value is not None]
    overrides += args.overrides or []
    overrides += [override for dest, override in (flags or {}).items() if getattr(args, dest)]
    return config_loader.load(config_cls, args.config, overrides)


def override_text(key: str, value: Any) -> str:
    """`--set` text that sets `key` to `value`. A string goes as it is when YAML reads it back as itself or as a
    number, bool, list or mapping (the loader keeps a string field's text as given, so `123` or `a: b` stay
    strings); else (`null`, ``, `a #b`, `'a'`, unreadable YAML) it is quoted. Anything else goes as JSON (YAML)."""
    if isinstance(value, str):
        try:
            loaded = yaml.safe_load(value)
            plain = loaded == value or not isinstance(loaded, (str, type(None)))
        except yaml.YAMLError:
            plain = False
        if plain:
            return f"{key}={value}"
    return f"{key}={json.dumps(value, ensure_ascii=False)}"


def run(main: Callable[[C], object], parse: Callable[[], C]) -> None:
    """Parse the config, resolve its Hugging Face hub ids (:mod:`fusion_jax.hub`), check its paths (`files.check_paths`) and run `main`. What the user can
    fix ends in one `error: …` line (exit 1): the errors we raise on purpose (`fusion_jax.errors.UserError` and its
    subclasses) and file-system errors (naming the path).
    Ctrl-C exits 130 with a note that the command resumes. Anything else, a bare ValueError included, is our bug
    (or a library's) and propagates with its full traceback."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    logging.getLogger("jax").setLevel(logging.WARNING)
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        cfg = hub.resolve_config(parse())
        check_paths(cfg)
        main(cfg)
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
