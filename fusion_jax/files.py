"""Files written so that a crash never leaves half of one, JSON that strict parsers read, the exclusive lock
that keeps two commands out of one output directory, the checks that keep an output from replacing what it should
not, content hashes remembered across runs, and the check that every configured path is a local one."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import secrets
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from fusion_jax.errors import ConfigError, InputError, RunDirError, UserError

LOCK_FILE = ".lock"


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, tmp: str | os.PathLike | None = None) -> Iterator[Path]:
    """Yield a temporary path beside `path` for the caller to write the new file to (by name or by opening it:
    numpy, safetensors, ArrayRecord). Leaving without an exception fsyncs that file, renames it over `path` and
    fsyncs the directory: a reader sees the old file or the new one, never a part. Leaving with one removes the
    temporary file and leaves `path` as it was. The one temp → fsync → rename in the package.

    `tmp`: the temporary name (default `.<name>.<pid>.<random>.tmp`, unique per writer), for a writer whose resume
    logic recognises and removes leftovers of a `kill -9` by their name."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp") if tmp is None else Path(tmp)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        except OSError as e:  # fsync's error (a full disk, EIO) names no file
            raise OSError(e.errno, e.strerror, str(tmp)) from e
        finally:
            os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, fsync it, rename it over `path`, fsync the directory: a
    reader sees the old file or the new one, never a part."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def commit_directory(partial: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename the completed directory `partial` to `out` (which must not exist, or be an empty directory) and fsync
    `out`'s parent, so the new name survives a crash."""
    os.rename(partial, out)
    fsync_dir(Path(out).parent)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def strict_json(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, ±inf) replaced by None, so `json.dumps` writes `null` where it would
    write `NaN`, which strict JSON parsers reject. numpy scalars become Python numbers."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "shape", None) == ():  # numpy / jax scalars
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def json_dumps(obj: Any, **kwargs: Any) -> str:
    """Strict JSON (`allow_nan=False` after non-finite floats became null)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kwargs)


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 1) -> None:
    atomic_write_text(path, json_dumps(obj, indent=indent) + "\n")


class DirectoryLock:
    """An exclusive, non-blocking lock on a directory (`flock` on `<dir>/.lock`), held from `acquire()` until
    `release()` or the process's exit (the kernel drops it on `kill -9` too, so a stale lock file never blocks).

    A second command on the same directory fails at once with a `RunDirError` naming the holder (host, pid,
    command, since when). In a multi-host run only one process should take it: every host runs the same command
    on the same shared directory."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.directory = Path(directory)
        self.what = what
        self._fd: int | None = None

    def acquire(self) -> "DirectoryLock":
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(f"{self.directory}: this {self.what} is in use by {holder}; wait for it to finish or "
                              f"stop it, or use another {self.what}") from None
        holder = (f"pid {os.getpid()} on {socket.gethostname()} since "
                  f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)[:300]})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def read_json(path: str | os.PathLike, error: type[UserError] = InputError, fix: str = "") -> Any:
    """The JSON in `path`; a truncated or otherwise invalid file is an `error` naming the file (and `fix`, what to do
    about it). A missing file stays the OSError it is."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}): the file is truncated or corrupted"
                    + (f"; {fix}" if fix else "")) from None


# ------------------------------------------------------------------------------------------------ outputs


def _contains(outer: Path, inner: Path) -> bool:
    return outer == inner or outer in inner.parents


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      error: type[UserError] = RunDirError) -> None:
    """Refuse an output that is, contains or lies inside one of the command's `inputs` (compared as real paths, so
    `./a`, `a` and a symlink to `a` are one path): writing it would replace or change what is being read."""
    real_out = Path(out).resolve()
    for given in inputs:
        real_in = Path(given).resolve()
        if real_out == real_in:
            problem = f"is the input {given} itself"
        elif _contains(real_out, real_in):
            problem = f"contains the input {given}: replacing it would delete the input"
        elif _contains(real_in, real_out):
            problem = f"lies inside the input {given}"
        else:
            continue
        raise error(f"{out}: the output {problem}; choose an output directory outside the input")


def check_replaceable(out: str | os.PathLike, overwrite: bool, *, markers: Sequence[str], what: str,
                      error: type[UserError] = RunDirError, overwrite_flag: str = "--set overwrite=true") -> None:
    """Refuse to write `out` where that would lose something: it exists and `overwrite` is off, or it is not what
    this command writes (`what`, recognised by one of the `markers` files in it; an empty directory is fine too), so
    overwrite never deletes a directory of someone else's files."""
    out = Path(out)
    if not out.exists() and not out.is_symlink():
        return
    ours = out.is_dir() and not out.is_symlink() and any((out / m).is_file() for m in markers)
    if not overwrite:
        raise error(f"{out}: already exists ({what if ours else 'not ' + what}); keep it, choose another output, "
                    f"or pass overwrite ({overwrite_flag}) to replace it")
    if out.is_symlink() or not out.is_dir() or (not ours and any(out.iterdir())):
        raise error(f"{out}: exists and is not {what} (no {' or '.join(markers)}); refusing to replace it even "
                    "with overwrite: remove it yourself or choose another output")


# ------------------------------------------------------------------------------------------------ content hashes


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def hash_cache_dir() -> Path:
    """Where content hashes are remembered: $FUSION_JAX_CACHE_DIR, else $XDG_CACHE_HOME/fusion_jax, else
    ~/.cache/fusion_jax (one small JSON per hashed file under `sha256/`)."""
    root = os.environ.get("FUSION_JAX_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                           Path.home() / ".cache") / "fusion_jax"
    return Path(root) / "sha256"


def _stat_key(st: os.stat_result) -> list[int]:
    # ctime and inode change on every write or replacement, even when size and mtime are made to look the same.
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def cached_file_sha256(path: str | os.PathLike) -> str:
    """sha256 of the file's content, remembered in `hash_cache_dir()` by path + size + mtime (+ ctime, inode): a
    large checkpoint is read once, not at every start, and a file changed in place is hashed again.

    Safe for concurrent processes: each entry is one file replaced atomically (two processes hashing the same file
    write the same entry), and a file that changes while it is hashed is not remembered. An unwritable cache only
    costs the re-hash."""
    path = Path(path).resolve()
    entry = hash_cache_dir() / (hashlib.sha256(str(path).encode("utf-8", "surrogatepass")).hexdigest()[:40] + ".json")
    before = _stat_key(os.stat(path))
    try:
        known = json.loads(entry.read_text())
        if known.get("path") == str(path) and known.get("stat") == before:
            return str(known["sha256"])
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    digest = file_sha256(path)
    if _stat_key(os.stat(path)) == before:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_json(entry, {"path": str(path), "stat": before, "sha256": digest}, indent=None)
        except OSError:
            pass
    return digest


# The config fields that hold a path the job reads or writes (model, tokenizer, data, cache, run and output paths),
# in any section; a corpus's own paths (hub datasets, TFDS names, remote data files) are the datasets library's.
PATH_FIELDS = ("run_dir", "cache_dir", "documents", "output", "checkpoint", "target", "target_tokenizer", "tokenizer",
               "source", "cache", "prompts_file", "include", "dataset_dir", "tokenizers")


def check_local_paths(cfg: Any, prefix: str = "") -> None:
    """Refuse a URL (``gs://…``, ``s3://…``) in any :data:`PATH_FIELDS` field of the config dataclass `cfg`: every
    path is a local (or mounted) one for now, and a URL taken as a local path would write into a directory named
    ``gs:``. A corpus section is left to its reader."""
    if not dataclasses.is_dataclass(cfg) or type(cfg).__name__ == "CorpusConfig":
        return
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        values = value if isinstance(value, tuple) else (value,)
        if f.name in PATH_FIELDS:
            for v in values:
                if isinstance(v, str) and "://" in v:
                    raise ConfigError(
                        f"{key}={v!r}: URL paths (object stores such as gs://) are not supported yet; give a local "
                        "path, or mount the bucket (gcsfuse, Filestore) and give the mount's path")
        for i, v in enumerate(values):
            if dataclasses.is_dataclass(v):
                check_local_paths(v, f"{key}[{i}]." if isinstance(value, tuple) else f"{key}.")
