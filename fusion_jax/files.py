"""Files written so that a crash never leaves half of one, JSON that strict parsers read, the exclusive lock
that keeps two commands out of one output directory, the checks that keep an output from replacing what it should
not, content hashes remembered across runs, and the run paths that may be object-store URLs (``gs://``).

Paths: :func:`as_path` makes a configured path a :class:`pathlib.Path` (local) or an :class:`etils.epath.Path`
(``gs://bucket/dir``, through fsspec/gcsfs: the abstraction Orbax and grain use). Both answer the same methods
(``/``, ``exists``, ``iterdir``, ``glob``, ``read_text``, ``open``, ``unlink``, ``mkdir``); what only works on local
files is done here: an atomic write to an object store writes a local file and uploads it (an object appears whole
or not at all), a directory is committed by copying it with its marker files last, a reader that needs a local file
(ArrayRecord, safetensors) reads a downloaded copy (:func:`local_copy`), and the lock is an object created only if
absent (:class:`DirectoryLock`)."""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import math
import os
import secrets
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path, PurePath
from typing import Any, Iterable, Iterator, Sequence, TypeAlias

from etils import epath

from fusion_jax.errors import ConfigError, InputError, RunDirError, UserError

LOCK_FILE = ".lock"

AnyPath: TypeAlias = "Path | epath.Path"  # what as_path returns: a local path or an object-store URL's
URL_SCHEMES = ("gs",)  # the object stores run paths may name (tested against a GCS emulator)


def is_url(path: str | PurePath) -> bool:
    """Whether `path` names an object in a store (``gs://bucket/dir``) rather than a local (or mounted) file."""
    return "://" in str(path)


def as_path(path: str | os.PathLike) -> AnyPath:
    """A configured path as a path object: :class:`pathlib.Path` for a local one, :class:`etils.epath.Path` for a
    URL (``Path("gs://b/x")`` would be the local ``gs:/b/x``)."""
    if isinstance(path, (Path, epath.Path)):
        return path
    return epath.Path(str(path)) if is_url(path) else Path(path)


def file_size(path: AnyPath) -> int:
    return path.stat().length if is_url(path) else path.stat().st_size


def copy_file(src: AnyPath, dst: AnyPath) -> None:
    """Copy one file between any two of local disk and object store (server-side within one store)."""
    if is_url(src) and is_url(dst):
        src.copy(dst, overwrite=True)
        return
    with src.open("rb") as r, dst.open("wb") as w:
        shutil.copyfileobj(r, w, 1 << 24)


def staging_root() -> Path:
    """Where files bound for an object store are written first: $FUSION_JAX_STAGING_DIR, else the temp directory."""
    root = Path(os.environ.get("FUSION_JAX_STAGING_DIR") or Path(tempfile.gettempdir()) / "fusion_jax-staging")
    root.mkdir(parents=True, exist_ok=True)
    return root


def staging_path(out: AnyPath) -> Path:
    """The local path that `out` (an output directory, or a file appended to) is written at before it goes to
    `out`: beside it (``<out>.partial``, on the same file system, so :func:`commit_directory` is a rename) for a local
    `out`; in :func:`staging_root` for an object-store one (ArrayRecord and safetensors write only local files, and
    an object cannot be appended to)."""
    if not is_url(out):
        return Path(f"{out}.partial")
    key = hashlib.sha256(str(out).encode()).hexdigest()[:16]
    return staging_root() / f"{key}-{out.name}.partial"


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
    logic recognises and removes leftovers of a `kill -9` by their name.

    An object-store `path`: the temporary file is local (in :func:`staging_root`) and is uploaded on success; the
    object appears whole or not at all, and a crash leaves the old one."""
    path = as_path(path)
    if is_url(path):
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=staging_root())
        os.close(fd)
        try:
            yield Path(name)
            copy_file(Path(name), path)
        finally:
            os.unlink(name)
        return
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
    reader sees the old file or the new one, never a part. An object is written whole (it appears at the end of
    its upload)."""
    path = as_path(path)
    if is_url(path):
        path.write_bytes(data)
        return
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def commit_directory(partial: str | os.PathLike, out: str | os.PathLike, markers: Sequence[str] = ()) -> None:
    """Rename the completed directory `partial` to `out` (which must not exist, or be an empty directory) and fsync
    `out`'s parent, so the new name survives a crash.

    To an object store, where there is no rename: every file is copied (uploaded from a local `partial`) with the
    files named in `markers` (what readers take as "complete") last, then `partial` is removed; an interrupted
    commit leaves `out` without its marker, which readers and the next run treat as unfinished."""
    partial, out = as_path(partial), as_path(out)
    if not is_url(partial) and not is_url(out):
        os.rename(partial, out)
        fsync_dir(out.parent)
        return
    for rel in sorted(_files_under(partial), key=lambda rel: (rel.rpartition("/")[2] in markers, rel)):
        copy_file(partial / rel, out / rel)
    remove_tree(partial)


def _files_under(directory: AnyPath) -> list[str]:
    """The relative paths (``a/b.json``) of every file under `directory`, local or in an object store (where a
    recursive glob is refused: it walks the listing instead)."""
    def bare(path: Any) -> str:  # epath's walk gives "bucket/dir", without the scheme
        return str(path).split("://", 1)[-1].rstrip("/")

    base, out = bare(directory), []
    for root, _, names in (directory.walk() if is_url(directory) else os.walk(directory)):
        prefix = bare(root)[len(base):].strip("/")
        out += [f"{prefix}/{name}" if prefix else name for name in names]
    return out


def remove_tree(path: str | os.PathLike) -> None:
    """Remove the directory `path` and everything in it, local or in an object store (nothing when it is absent)."""
    path = as_path(path)
    if is_url(path):
        path.rmtree(missing_ok=True)
    elif path.exists():
        shutil.rmtree(path)


def local_copy(path: str | os.PathLike) -> Path:
    """A local file or directory with the content of `path`: `path` itself when local; from an object store, every
    file downloaded once into ``<cache>/remote`` (:func:`cache_root`) and reused while the object's size and time are
    unchanged. For readers that open only local files (ArrayRecord, safetensors, tokenizers)."""
    path = as_path(path)
    if not is_url(path):
        return path
    local = cache_root() / "remote" / hashlib.sha256(str(path).encode()).hexdigest()[:40] / path.name
    if not path.is_dir():
        _download(path, local)
        return local
    for rel in _files_under(path):
        _download(path / rel, local / rel)
    return local


def _download(src: epath.Path, local: Path) -> None:
    stat = src.stat()
    record = local.with_name(f".{local.name}.source.json")
    want = {"url": str(src), "size": stat.length, "mtime": stat.mtime}
    try:
        if json.loads(record.read_text()) == want and local.stat().st_size == stat.length:
            return
    except (OSError, ValueError):
        pass
    local.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(local) as tmp:
        copy_file(src, tmp)
    atomic_write_json(record, want)


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
    on the same shared directory.

    In an object store the lock is the object `<dir>/.lock`, created only if absent (a conditional write) and
    deleted on release. A process killed without releasing leaves it: the next command on the same host takes it over
    when the holder's pid is gone; from another host it is refused, naming the object to delete once that run is
    known to be gone (a preempted VM)."""

    def __init__(self, directory: str | os.PathLike, what: str = "directory"):
        self.directory = as_path(directory)
        self.what = what
        self._fd: int | None = None
        self._object: epath.Path | None = None

    def _in_use(self, holder: str, hint: str = "") -> RunDirError:
        return RunDirError(f"{self.directory}: this {self.what} is in use by {holder or 'another process'}; wait for "
                           f"it to finish or stop it, or use another {self.what}{hint}")

    @staticmethod
    def _holder() -> str:
        return (f"pid {os.getpid()} on {socket.gethostname()} since "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')} ({' '.join(sys.argv)[:300]})")

    def acquire(self) -> "DirectoryLock":
        if is_url(self.directory):
            return self._acquire_object()
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / LOCK_FILE
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
            os.close(fd)
            raise self._in_use(holder) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, self._holder().encode(), 0)
        self._fd = fd
        return self

    def _acquire_object(self) -> "DirectoryLock":
        lock = self.directory / LOCK_FILE
        if lock.exists():
            holder = lock.read_bytes().decode(errors="replace").strip()
            pid, _, host = holder.partition(" on ")
            if not (host.split(" since ")[0] == socket.gethostname() and pid.startswith("pid ")
                    and not _alive(int(pid.split()[1]))):
                raise self._in_use(holder, f". If that command is gone (a preempted or deleted VM), delete {lock} "
                                           f"(gcloud storage rm {lock})")
            lock.unlink(missing_ok=True)  # left by a command of this host that no longer runs
        import fsspec  # epath's open has no "x" mode; gcsfs makes "xb" a write only if the object is absent

        try:
            with fsspec.open(str(lock), "xb") as f:  # fails when another command created it meanwhile
                f.write(self._holder().encode())
        except FileExistsError:  # gcsfs: HTTP 412, precondition failed
            raise self._in_use("another command") from None
        self._object = lock
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
        if self._object is not None:
            self._object.unlink(missing_ok=True)
            self._object = None

    def __enter__(self) -> "DirectoryLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_json(path: str | os.PathLike, error: type[UserError] = InputError, fix: str = "") -> Any:
    """The JSON in `path`; a truncated or otherwise invalid file is an `error` naming the file (and `fix`, what to do
    about it). A missing file stays the OSError it is."""
    path = as_path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e}): the file is truncated or corrupted"
                    + (f"; {fix}" if fix else "")) from None


# ------------------------------------------------------------------------------------------------ outputs


def _contains(outer: AnyPath, inner: AnyPath) -> bool:
    return outer == inner or outer in inner.parents


def canonical_path(path: str | os.PathLike) -> AnyPath:
    """One spelling per file: a local path resolved (``./a``, ``a`` and a link to ``a`` are one path), a URL
    without a trailing slash."""
    path = as_path(path)
    return epath.Path(str(path).rstrip("/")) if is_url(path) else path.resolve()


def check_output_path(out: str | os.PathLike, inputs: Iterable[str | os.PathLike] = (),
                      error: type[UserError] = RunDirError) -> None:
    """Refuse an output that is, contains or lies inside one of the command's `inputs` (compared as real paths, so
    `./a`, `a` and a symlink to `a` are one path): writing it would replace or change what is being read."""
    real_out = canonical_path(out)
    for given in inputs:
        real_in = canonical_path(given)
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
    out = as_path(out)
    link = not is_url(out) and out.is_symlink()  # an object store has no links
    if not out.exists() and not link:
        return
    ours = out.is_dir() and not link and any((out / m).is_file() for m in markers)
    if not overwrite:
        raise error(f"{out}: already exists ({what if ours else 'not ' + what}); keep it, choose another output, "
                    f"or pass overwrite ({overwrite_flag}) to replace it")
    if link or not out.is_dir() or (not ours and any(out.iterdir())):
        raise error(f"{out}: exists and is not {what} (no {' or '.join(markers)}); refusing to replace it even "
                    "with overwrite: remove it yourself or choose another output")


# ------------------------------------------------------------------------------------------------ content hashes


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def cache_root() -> Path:
    """This machine's fusion_jax cache (vocabulary maps, document lengths, content hashes, downloaded objects):
    $FUSION_JAX_CACHE (or its older name $FUSION_JAX_CACHE_DIR), else $XDG_CACHE_HOME/fusion_jax, else
    ~/.cache/fusion_jax."""
    root = (os.environ.get("FUSION_JAX_CACHE") or os.environ.get("FUSION_JAX_CACHE_DIR")
            or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fusion_jax")
    return Path(root)


def hash_cache_dir() -> Path:
    """Where content hashes are remembered (one small JSON per hashed file)."""
    return cache_root() / "sha256"


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
# Of those, the ones that may be an object-store URL (config class → fields): a run's directory and everything under
# it, teacher caches and document stores, and the commands that write them.
URL_FIELDS = {"TrainConfig": ("run_dir", "cache_dir"), "DataConfig": ("documents",), "TeacherConfig": ("cache",),
              "PrepareConfig": ("output",), "CaptureConfig": ("documents", "output"),
              "EvaluateConfig": ("documents", "output")}


def check_paths(cfg: Any, prefix: str = "") -> None:
    """Refuse a URL in a :data:`PATH_FIELDS` field of the config dataclass `cfg` that cannot take one (only
    :data:`URL_FIELDS` can, and only in a :data:`URL_SCHEMES` store whose file system is installed): taken as a local
    path, ``gs://b/x`` would write into a directory named ``gs:``. A corpus section is left to its reader."""
    if not dataclasses.is_dataclass(cfg) or type(cfg).__name__ == "CorpusConfig":
        return
    allowed = URL_FIELDS.get(type(cfg).__name__, ())
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        values = value if isinstance(value, tuple) else (value,)
        if f.name in PATH_FIELDS:
            for v in values:
                if isinstance(v, str) and is_url(v):
                    check_url(key, v, f.name in allowed)
        for i, v in enumerate(values):
            if dataclasses.is_dataclass(v):
                check_paths(v, f"{key}[{i}]." if isinstance(value, tuple) else f"{key}.")
    if type(cfg).__name__ == "TrainConfig" and is_url(cfg.run_dir) and (cfg.baseline or cfg.demo.enabled):
        raise ConfigError(f"{prefix}run_dir={cfg.run_dir!r}: the demo's assets and the comparison report (baseline) "
                          "are written on local disk only; give them a local run_dir, or run without them")


def check_url(key: str, url: str, allowed: bool = True) -> None:
    """Refuse `url` as the value of setting `key`: where the setting takes no URL (`allowed` false), in a store
    other than :data:`URL_SCHEMES`, or without the store's file system installed."""
    if not allowed:
        raise ConfigError(
            f"{key}={url!r}: this setting takes a local path. URLs are for run_dir, cache_dir, documents, teacher "
            "caches and prepare/capture outputs, and for models and tokenizers, which the commands (python -m "
            "fusion_jax.…) download before they start (from Python: fusion_jax.hub.resolve_config(cfg)). Copy it to "
            "local disk, or mount the bucket (gcsfuse) and give the mount's path")
    scheme = url.split("://", 1)[0]
    if scheme not in URL_SCHEMES:
        raise ConfigError(f"{key}={url!r}: {scheme}:// is not a supported store ({', '.join(URL_SCHEMES)}:// is); "
                          "mount it and give the mount's path instead")
    try:
        import gcsfs  # noqa: F401 - etils.epath reaches gs:// through fsspec's gcsfs
    except ImportError:
        raise ConfigError(f"{key}={url!r}: gs:// paths need gcsfs: pip install 'fusion_jax[gcs]'") from None
