"""Model directories: our Orbax format, Hugging Face in and out, one `load` for both.

Our format (a directory):
    fusion_jax.json   format tag and version, the ModelConfig, the HF model_type and original config.json, and the
                      fingerprint of the tokenizer saved with the model
    params/           Orbax checkpoint of the params tree (sharded save and restore)
    tokenizer files   copied from the HF directory it came from

A GGUF file (llama.cpp's format) is read wherever a Hugging Face directory is: `gguf.GGUFCheckpoint` presents it
as one (config.json from its metadata, tensors dequantized to float32 under their HF names).

A Hugging Face directory we write carries `fusion_jax_export.json` (format tag, tokenizer fingerprint) beside
config.json: it marks the directory as ours, so that `overwrite` may replace it (and nothing else), and says which
tokenizer the model was saved with.

Every writer builds `<out>.partial` and renames it to `<out>` only when complete, so a crash never leaves something
that looks finished; `fusion_jax.json` is written last, and a directory without it is reported as incomplete.

Loading checks what it reads: damaged files and shapes that disagree with the config are one CheckpointError that
names the file or tensor, and so are NaN/inf parameters (`integrity.check_finite`).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from fusion_jax import mesh as mesh_lib
from fusion_jax.config import loader as config_loader
from fusion_jax.config.schema import DEFAULT_RULES
from fusion_jax.config.model import ModelConfig
from fusion_jax.convert import gguf, hf, integrity
from fusion_jax.convert.architectures import architecture
from fusion_jax.convert.hf import CheckpointError
from fusion_jax.errors import RunDirError, UserError
from fusion_jax.files import (AnyPath, as_path, check_output_path, check_replaceable, commit_directory, is_url,
                              staging_path, read_json, remove_tree)
from fusion_jax.models import decoder
from fusion_jax.tokenizers import Tokenizer, load_tokenizer
from fusion_jax.tokenizers.gguf import write_tokenizer as write_gguf_tokenizer

log = logging.getLogger("fusion_jax.convert")

META = "fusion_jax.json"
FORMAT = "fusion_jax.model"
VERSION = 1
EXPORT_MARKER = "fusion_jax_export.json"
EXPORT_FORMAT = "fusion_jax.hf_export"
RECONVERT = "convert it again from the original (python -m fusion_jax.convert SOURCE OUTPUT)"
OUR_OUTPUT = "a model directory written by fusion_jax"


def kind(path: str | os.PathLike) -> str:
    """'fusion_jax', 'hf' or 'gguf' (a file); a clear error for anything else, including a half-written directory."""
    p = Path(path)
    partial = Path(f"{p}.partial")
    if not p.exists():
        hint = f" ({partial} exists: an earlier write crashed; delete it and convert again)" if partial.exists() else ""
        raise CheckpointError(f"{p} does not exist{hint}")
    if p.is_file():
        if gguf.is_gguf(p):
            return "gguf"
        raise CheckpointError(f"{p} is a file but not a GGUF model (no GGUF magic); a model is a GGUF file or a "
                              "directory: fusion_jax, or Hugging Face config.json + *.safetensors")
    if (p / META).exists():
        return "fusion_jax"
    if (p / "config.json").exists():
        return "hf"
    if (p / "params").exists():
        raise CheckpointError(f"{p} is an incomplete fusion_jax checkpoint (no {META}): its write did not finish")
    raise CheckpointError(f"{p} is not a model checkpoint: expected {META} (fusion_jax) or config.json + *.safetensors (Hugging Face)")


def _read_meta(path: Path) -> dict:
    meta = read_json(path / META, CheckpointError, RECONVERT)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        found = meta if not isinstance(meta, dict) else f"format {meta.get('format')!r} version {meta.get('version')!r}"
        raise CheckpointError(f"{path / META} has {found}; this fusion_jax reads {FORMAT!r} version {VERSION}")
    if not isinstance(meta.get("model"), dict):
        raise CheckpointError(f"{path / META} has no model config (the \"model\" object); {RECONVERT}")
    return meta


def _foreign(p: Path) -> hf.HFCheckpoint | gguf.GGUFCheckpoint | None:
    """The Hugging Face directory or GGUF file at `p` (both read through `hf.load_hf_params`); None for ours."""
    k = kind(p)
    return hf.HFCheckpoint(p) if k == "hf" else gguf.GGUFCheckpoint(p) if k == "gguf" else None


def model_config(path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ModelConfig of any kind of checkpoint, without reading any weights (for abstract shapes)."""
    p = Path(path)
    if (ckpt := _foreign(p)) is not None:
        return architecture(ckpt.model_type).config_from_hf(ckpt.config, **{"param_dtype": ckpt.dtype(), **overrides})
    meta = _read_meta(p)
    return config_loader.from_dict(ModelConfig, {**meta["model"], **overrides}, source=str(p / META))


def load(
    path: str | os.PathLike,
    mesh: Mesh | None = None,
    rules: dict[str, tuple[str, ...]] | None = None,
    **overrides,
) -> tuple[ModelConfig, dict]:
    """Load a fusion_jax or Hugging Face model directory or a GGUF file → (ModelConfig, params) placed on `mesh`.

    `overrides` replace ModelConfig fields (e.g. param_dtype="bfloat16", compute_dtype="float32"); params are
    cast to the resulting param_dtype, which defaults to the dtype the checkpoint holds. Without a mesh, all
    devices form a data-parallel mesh (params replicated unless `rules` shard them). A parameter holding NaN or
    inf is an error naming the tensor.
    """
    p = Path(path)
    mesh = mesh if mesh is not None else mesh_lib.make_mesh(mesh_lib.MeshConfig())
    rules = rules if rules is not None else DEFAULT_RULES
    if (ckpt := _foreign(p)) is not None:
        overrides = {"param_dtype": ckpt.dtype(), **overrides}
        cfg = architecture(ckpt.model_type).config_from_hf(ckpt.config, **overrides)
        params = hf.load_hf_params(ckpt, cfg, decoder.param_shardings(cfg, mesh, rules))
        fix = gguf.REDOWNLOAD if isinstance(ckpt, gguf.GGUFCheckpoint) else hf.REDOWNLOAD
        integrity.check_finite(params, mesh, str(p), hf.tensor_namer(ckpt.model_type, cfg), _overflow_hint(cfg) + fix)
        return cfg, params
    meta = _read_meta(p)
    cfg = config_loader.from_dict(ModelConfig, {**meta["model"], **overrides}, source=str(p / META))
    shardings = decoder.param_shardings(cfg, mesh, rules)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), decoder.abstract_params(cfg), shardings
    )
    params = _restore(p, target)
    integrity.check_finite(params, mesh, str(p), fix=_overflow_hint(cfg) + RECONVERT)
    return cfg, params


def _overflow_hint(cfg: ModelConfig) -> str:
    return ("values beyond float16's range (65,504) become inf: load it with param_dtype=bfloat16 or float32; else "
            if cfg.param_dtype == "float16" else "")


def _stored_shapes(params_dir: Path) -> dict[str, tuple[int, ...]]:
    """{param name ("layers.mlp.up"): shape} as stored in params/ (its OCDBT database's zarr metadata). Read with
    TensorStore's synchronous API: Orbax's own metadata call, on a damaged database, leaves asyncio callbacks that
    print "Event loop is closed" tracebacks after the error."""
    import tensorstore as ts

    kv = ts.KvStore.open({"driver": "ocdbt", "base": f"file://{params_dir}"}).result()
    shapes = {}
    for key in (k.decode() for k in kv.list().result()):
        name, _, leaf = key.rpartition("/")
        if leaf in (".zarray", "zarr.json"):
            shapes[name] = tuple(json.loads(kv.read(key).result().value)["shape"])
    return shapes


def _check_stored_shapes(p: Path, have: dict[str, tuple[int, ...]], target) -> None:
    """The shapes in params/ against the ones fusion_jax.json implies: one error naming every tensor that differs
    (before Orbax reads anything, which would fail on the first one with its own message)."""
    want = {".".join(str(getattr(k, "key", k)) for k in path): tuple(v.shape)
            for path, v in jax.tree_util.tree_flatten_with_path(target)[0]}
    problems = [f"{n}: stored {list(have[n])}, {META} implies {list(want[n])}"
                for n in sorted(set(have) & set(want)) if have[n] != want[n]]
    if set(want) - set(have):
        problems.append(f"missing from params/: {', '.join(sorted(set(want) - set(have)))}")
    if set(have) - set(want):
        problems.append(f"in params/ but not in the model: {', '.join(sorted(set(have) - set(want)))}")
    if problems:
        raise CheckpointError(f"{p}: the stored params do not match the model config in {p / META} (was it "
                              f"edited?): {'; '.join(problems)}; restore {META}, or {RECONVERT}")


def _first_line(e: BaseException) -> str:
    while e.__cause__ is not None:  # TensorStore's own message is the innermost cause
        e = e.__cause__
    line = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return line if len(line) <= 300 else line[:300] + " …"


def _restore(p: Path, target):
    """params/ restored into `target`'s shapes and shardings; any failure to read it is a CheckpointError."""
    params_dir = (p / "params").absolute()
    if not params_dir.is_dir():
        raise CheckpointError(f"{p}: has {META} but no params/ directory; {RECONVERT}")
    try:
        stored = _stored_shapes(params_dir)
    except Exception as e:  # noqa: BLE001 - TensorStore raises ValueError and others for damaged files
        failure = f"its index cannot be read ({_first_line(e)})"
    else:
        if stored:  # (a layout we do not know lists nothing: Orbax checks the shapes itself then)
            _check_stored_shapes(p, stored, target)
        with ocp.StandardCheckpointer() as ckptr:
            try:
                return ckptr.restore(params_dir, target)
            except Exception as e:  # noqa: BLE001 - Orbax re-raises TensorStore errors as plain Exceptions
                failure = _first_line(e)
        # Orbax leaves the reads it abandoned as coroutines: finish them now, or they print tracebacks at exit.
        gc.collect()
    raise CheckpointError(f"{p}: the params cannot be read: {failure}. A file under {params_dir} is missing, "
                          f"truncated or corrupted; {RECONVERT}")


# ------------------------------------------------------------------------------------------------ writing


def check_output(out: str | os.PathLike, overwrite: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> None:
    """Refuse an output that would lose something: an existing one without `overwrite`; with it, anything but a
    model directory we wrote (or an empty directory); and, always, the input, a directory holding it, or a directory
    inside it."""
    check_output_path(out, inputs, RunDirError)
    check_replaceable(out, overwrite, markers=(META, EXPORT_MARKER), what=OUR_OUTPUT, error=RunDirError)


def _start(out: AnyPath, overwrite: bool, inputs: tuple[str | os.PathLike, ...]) -> Path:
    """Prepare the directory `out` is written in (`files.staging_path`: `<out>.partial` beside a local `out`),
    removing one left by a crash; refuse to replace `out` unless `check_output` allows."""
    check_output(out, overwrite, inputs)
    tmp = staging_path(out)
    if jax.process_index() == 0:
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    multihost_utils.sync_global_devices(f"fusion_jax:start:{out}")
    return tmp


def _finish(tmp: Path, out: AnyPath, overwrite: bool) -> None:
    multihost_utils.sync_global_devices(f"fusion_jax:finish:{out}")
    if jax.process_index() == 0:
        if out.exists():
            check_replaceable(out, overwrite, markers=(META, EXPORT_MARKER), what=OUR_OUTPUT, error=RunDirError)
            remove_tree(out)
        commit_directory(tmp, out, markers=(META, EXPORT_MARKER))
    multihost_utils.sync_global_devices(f"fusion_jax:renamed:{out}")


def _copy_tokenizer(src: Path | None, dst: Path) -> None:
    """The tokenizer files of the source directory into `dst`; from a GGUF file, the tokenizer rebuilt from its
    metadata (a file without one converts without a tokenizer, with a warning)."""
    if src is None or jax.process_index() != 0:
        return
    if src.is_file():
        try:
            write_gguf_tokenizer(src, dst)
        except CheckpointError as e:
            log.warning("%s: no tokenizer written (%s)", src, e)
        return
    for name in hf.TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copy2(src / name, dst / name)


def _has_tokenizer(path: Path) -> bool:
    """Tokenizer files in the directory, or a GGUF file (whose tokenizer `load_tokenizer` rebuilds from its metadata;
    one without a tokenizer fails to load and counts as none)."""
    return gguf.is_gguf(path) or (path / "tokenizer.json").is_file() or any(path.glob("*.model"))


def _tokenizer_record(tok: Tokenizer) -> dict:
    return {"fingerprint": tok.fingerprint, "name": tok.name, "vocab_size": tok.vocab_size}


def _saved_tokenizer(path: Path) -> dict | None:
    """The record of the tokenizer files written into `path` (None when there are none or they cannot be read: a
    model converts without a tokenizer we understand)."""
    if jax.process_index() != 0 or not _has_tokenizer(path):
        return None
    try:
        return _tokenizer_record(load_tokenizer(path))
    except (UserError, OSError) as e:
        log.warning("%s: tokenizer not recorded (%s); its users will not be checked against it", path, e)
        return None


def save(
    out: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    *,
    model_type: str,
    hf_config: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> Path:
    """Write our format atomically. `model_type`/`hf_config` let the model be exported back to HF later. `inputs`:
    directories the output must not be, contain or lie in (the model being converted)."""
    out = Path(out).absolute()
    architecture(model_type)
    tmp = _start(out, overwrite, inputs)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp / "params", params)
        ckpt.wait_until_finished()
    _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp)
    if jax.process_index() == 0:
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "model": config_loader.to_dict(cfg),
            "hf_model_type": model_type,
            "hf_config": hf_config,
            "tokenizer": _saved_tokenizer(tmp),
        }
        (tmp / META).write_text(json.dumps(meta, indent=2))  # (the whole directory is renamed into place)
    _finish(tmp, out, overwrite)
    return out


def save_hf(
    out: str | os.PathLike,
    cfg: ModelConfig,
    params: dict,
    *,
    model_type: str,
    hf_config: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    inputs: tuple[str | os.PathLike, ...] = (),
) -> AnyPath:
    """Write a Hugging Face directory (safetensors + config.json + tokenizer) that transformers loads; `out` may be
    in an object store (written locally, then uploaded with its marker last)."""
    out = as_path(out)
    out = out if is_url(out) else out.absolute()
    tmp = _start(out, overwrite, inputs)
    hf.write_hf_dir(tmp, cfg, params, model_type, hf_config, max_shard_bytes)
    _copy_tokenizer(Path(tokenizer_dir) if tokenizer_dir else None, tmp)
    if jax.process_index() == 0:
        marker = {"format": EXPORT_FORMAT, "version": VERSION, "tokenizer": _saved_tokenizer(tmp)}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2))
    _finish(tmp, out, overwrite)
    return out


def source_info(path: str | os.PathLike) -> tuple[str, dict]:
    """(HF model_type, original HF config) of any kind of checkpoint, for export (a GGUF file's: from its metadata)."""
    p = Path(path)
    if (ckpt := _foreign(p)) is not None:
        return ckpt.model_type, ckpt.config
    meta = _read_meta(p)
    return meta["hf_model_type"], meta.get("hf_config") or {}


# ------------------------------------------------------------------------------------------------ identity


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The files that hold the weights of either kind of directory (Orbax's own timestamped bookkeeping, files
    named `_*`, excluded)."""
    p = Path(path)
    k = kind(p)
    if k == "fusion_jax":
        return sorted(f for f in (p / "params").rglob("*") if f.is_file() and not f.name.startswith("_"))
    if k == "gguf":
        return [p]
    return sorted(p.glob("*.safetensors"))


def weights_fingerprint(path: str | os.PathLike) -> str:
    """A content fingerprint (sha256) of the weight files: it changes when any weight byte does. Each file is read
    once and its hash remembered by path, size and mtime, so this is cheap after the first time."""
    return integrity.on_process_0(lambda: integrity.fingerprint_files(path, weight_files(path)))


def own_tokenizer(path: str | os.PathLike) -> dict | None:
    """{"fingerprint", "name", "vocab_size"} of the tokenizer `path` was saved with: the record written when we
    converted or exported it, else (a model from elsewhere) the tokenizer files in the directory, or the tokenizer
    a GGUF file's metadata rebuilds; None when neither exists or they cannot be read."""
    p = Path(path)
    if (p / META).is_file():
        record = _read_meta(p).get("tokenizer")
    elif (p / EXPORT_MARKER).is_file():
        marker = read_json(p / EXPORT_MARKER, CheckpointError, f"delete {EXPORT_MARKER} or export the model again")
        record = marker.get("tokenizer") if isinstance(marker, dict) else None
    else:
        record = None
    if isinstance(record, dict) and record.get("fingerprint"):
        return record
    if not _has_tokenizer(p):
        return None
    try:
        return _tokenizer_record(load_tokenizer(p))
    except (UserError, OSError):
        return None


def check_tokenizer(
    path: str | os.PathLike,
    tokenizer: Tokenizer | None = None,
    tokenizer_path: str | os.PathLike | None = None,
    *,
    allow_mismatch: bool = False,
    setting: str = "tokenizer",
) -> None:
    """Refuse to pair the model at `path` with a tokenizer other than the one it was saved with (`own_tokenizer`):
    the ids would mean other text than the model learned, and nothing else notices when the vocabulary sizes agree.

    `tokenizer` (or the one at `tokenizer_path`) is what the run uses, `setting` the config key that chose it.
    With `allow_mismatch` (for a deliberate swap) a mismatch is a warning. A model saved without a tokenizer we can
    read is not checked."""
    p = Path(path)
    tok_path = Path(tokenizer_path) if tokenizer_path else p
    own = own_tokenizer(p)
    if own is None:
        return
    tok = tokenizer if tokenizer is not None else load_tokenizer(tok_path)
    if tok.fingerprint == own["fingerprint"]:
        return
    given = (f"the tokenizer now in {p} (its tokenizer files were replaced)" if tok_path.resolve() == p.resolve()
             else f"{setting}={tok_path}") + f" ({tok.name}, {tok.vocab_size:,} ids)"
    message = (f"{given} is not the tokenizer {p} was saved with ({own.get('name')}, {own.get('vocab_size', 0):,} "
               f"ids; fingerprint {tok.fingerprint[:12]} ≠ {own['fingerprint'][:12]}): the model would read token "
               f"ids that mean other text than it learned. Use the model's own tokenizer (leave {setting} empty or "
               "give the one it was saved with), or set allow_tokenizer_mismatch=true if the swap is intended")
    if allow_mismatch:
        log.warning("%s (allowed by allow_tokenizer_mismatch)", message.split(". Use the model's")[0])
        return
    raise CheckpointError(message)
