"""Damaged and inconsistent checkpoints (issue 12, items 10 and 11): each is one CheckpointError that names the file or
tensor and the fix, in process and through the CLI as a single `error:` line, with no traceback and no asyncio
noise. Also: the content fingerprint that notices a checkpoint changed in place, and a read-only output directory.

One case per bad input; the models are tiny and built here (no hub).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import jax.numpy as jnp  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

import hf_models  # noqa: E402
from fusion_jax import files  # noqa: E402
from fusion_jax.convert import checkpoint  # noqa: E402
from fusion_jax.cli.convert import parse as convert_parse, run as convert_main  # noqa: E402
from fusion_jax.errors import CheckpointError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Traceback", "Exception ignored", "Event loop is closed")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("bad") / "hf"
    hf_models.build("llama").save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fj_dir(hf_dir) -> Path:
    out = hf_dir.parent / "fj"
    convert_main(convert_parse([str(hf_dir), str(out)]))
    return out


def damaged(src: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(src, tmp_path / src.name))


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:int(len(data) * keep)])


def data_files(fj: Path) -> list[Path]:
    """The OCDBT files under params/ (where the values and their index live depends on the device count)."""
    return sorted(f for f in (fj / "params").rglob("*") if f.is_file() and f.parent.name == "d")


def run_convert(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusion_jax.convert", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def assert_one_error_line(r: subprocess.CompletedProcess, pattern: str) -> None:
    assert r.returncode == 1, r.stderr
    noise = [n for n in NOISE if n in r.stderr]
    assert not noise, r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr
    assert re.search(pattern, errors[0]), errors[0]


# ------------------------------------------------------------------------------------------ Hugging Face directories


def _nan_in_up_proj(d: Path) -> None:
    tensors = load_file(d / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    tensors["model.layers.1.mlp.up_proj.weight"][4, 5] = np.inf
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})


def _damage_header(d: Path) -> None:
    data = bytearray((d / "model.safetensors").read_bytes())
    data[8:40] = b"\xff" * 32  # inside the JSON header
    (d / "model.safetensors").write_bytes(bytes(data))


HF_CASES = {
    # name: (damage, the error's pattern)
    "truncated model.safetensors": (lambda d: truncate(d / "model.safetensors"),
                                    r"model\.safetensors: cannot be read as safetensors \(.*\): the file is truncated "
                                    r"or corrupted; download the model again"),
    "corrupted safetensors header": (_damage_header, r"model\.safetensors: cannot be read as safetensors .*truncated "
                                                     r"or corrupted; download the model again"),
    "tiny model.safetensors": (lambda d: (d / "model.safetensors").write_bytes(b"\x01\x00"),
                               r"model\.safetensors: cannot be read as safetensors"),
    "truncated config.json": (lambda d: truncate(d / "config.json"),
                              r"config\.json: not valid JSON \(.*\): the file is truncated or corrupted; download the "
                              r"model again"),
    "NaN and inf in a tensor": (_nan_in_up_proj,
                                r"2 parameter values are NaN or inf \(layers\.mlp\.up layer 1 \(from "
                                r"model\.layers\.1\.mlp\.up_proj\.weight\): 2\)"),
}


@pytest.mark.parametrize("case", list(HF_CASES))
def test_damaged_hugging_face_checkpoint(hf_dir, tmp_path, case):
    damage, pattern = HF_CASES[case]
    src = damaged(hf_dir, tmp_path)
    damage(src)
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.load(src)


# ------------------------------------------------------------------------------------------ our Orbax format


def _edit_meta(d: Path, **model) -> None:
    meta = json.loads((d / checkpoint.META).read_text())
    meta["model"].update(model)
    (d / checkpoint.META).write_text(json.dumps(meta))


def _flip_bytes(d: Path) -> None:
    for f in data_files(d):
        data = bytearray(f.read_bytes())
        data[len(data) // 2:len(data) // 2 + 64] = b"\xff" * 64
        f.write_bytes(bytes(data))


def _each_data_file(d: Path, damage) -> None:
    assert data_files(d)
    for f in data_files(d):
        damage(f)


ORBAX_CASES = {
    "missing data files": (lambda d: _each_data_file(d, Path.unlink),
                          r"fj: the params cannot be read: .*A file under .*fj/params is missing, truncated or "
                          r"corrupted; convert it again from the original"),
    "truncated data files": (lambda d: _each_data_file(d, truncate),
                            r"fj: the params cannot be read: .*missing, truncated or corrupted; convert it again"),
    "edited intermediate_size": (lambda d: _edit_meta(d, intermediate_size=40),
                                 r"fj: the stored params do not match the model config in .*fusion_jax\.json \(was it "
                                 r"edited\?\): layers\.mlp\.down: stored \[2, 48, 32\], fusion_jax\.json implies "
                                 r"\[2, 40, 32\]; .*restore fusion_jax\.json, or convert it again"),
    "truncated fusion_jax.json": (lambda d: truncate(d / checkpoint.META),
                                  r"fusion_jax\.json: not valid JSON .*truncated or corrupted; convert it again"),
    # The case: 64 flipped bytes in a param file; whichever way they land, never a silent exit 0.
    "64 flipped bytes": (_flip_bytes, r"parameter values are NaN or inf|the params cannot be read"),
}


@pytest.mark.parametrize("case", list(ORBAX_CASES))
def test_damaged_orbax_checkpoint(fj_dir, tmp_path, case):
    damage, pattern = ORBAX_CASES[case]
    src = damaged(fj_dir, tmp_path)
    damage(src)
    with pytest.raises(CheckpointError, match=pattern):
        checkpoint.load(src)


def test_nan_params_saved_in_our_format_name_the_tensor_and_layer(fj_dir, tmp_path):
    cfg, params = checkpoint.load(fj_dir)
    q = np.asarray(params["layers"]["attn"]["q"]).copy()
    q[1, 0, 0, 0] = np.nan
    bad = {**params, "layers": {**params["layers"], "attn": {**params["layers"]["attn"], "q": jnp.asarray(q)}}}
    checkpoint.save(tmp_path / "nan", cfg, bad, model_type="llama")
    with pytest.raises(CheckpointError, match=r"nan: 1 parameter values are NaN or inf \(layers\.attn\.q \(layer 1\): "
                                              r"1\); the checkpoint is corrupted or the model diverged"):
        checkpoint.load(tmp_path / "nan")


@pytest.mark.parametrize("case", ["truncated data files", "missing data files", "edited intermediate_size"])
def test_cli_prints_one_error_line_without_orbax_noise(fj_dir, tmp_path, case):
    """The Orbax cases printed a TensorStore traceback, and five "Event loop is closed" tracebacks at exit."""
    damage, pattern = ORBAX_CASES[case]
    src = damaged(fj_dir, tmp_path)
    damage(src)
    assert_one_error_line(run_convert(src, tmp_path / "out"), "^error: .*" + pattern)
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_cli_truncated_safetensors_is_one_error_line(hf_dir, tmp_path):
    src = damaged(hf_dir, tmp_path)
    truncate(src / "model.safetensors")
    assert_one_error_line(run_convert(src, tmp_path / "out"),
                          "^error: .*/hf/" + HF_CASES["truncated model.safetensors"][1])


def test_read_only_output_directory_is_one_error_line(fj_dir, tmp_path):
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    prefix: list[str] = []
    if os.geteuid() == 0:  # root ignores permissions unless it gives up the capability to
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
        if not shutil.which("setpriv") or subprocess.run([*prefix, "true"]).returncode != 0:
            pytest.skip("running as root without setpriv: a read-only directory cannot be made")
    r = subprocess.run([*prefix, sys.executable, "-m", "fusion_jax.convert", str(fj_dir), str(read_only / "out")],
                       cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert_one_error_line(r, rf"^error: Permission denied: {read_only / 'out.partial'} \(check the permissions")


# ------------------------------------------------------------------------------------------ content fingerprints


def test_content_hash_is_remembered_and_notices_a_change_in_place(tmp_path, monkeypatch):
    """What the teacher cache's identity uses: read once, then remembered by path + size + mtime (+ ctime, inode),
    so a file rewritten in place with the same size and the same mtime is still hashed again."""
    monkeypatch.setenv("FUSION_JAX_CACHE", str(tmp_path / "hashes"))
    reads = []
    real = files.file_sha256
    monkeypatch.setattr(files, "file_sha256", lambda p: reads.append(p) or real(p))
    f = tmp_path / "weights.bin"
    f.write_bytes(b"a" * 4096)
    first = files.cached_file_sha256(f)
    assert first == hashlib.sha256(b"a" * 4096).hexdigest()
    assert files.cached_file_sha256(f) == first and len(reads) == 1  # remembered
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime
    assert files.cached_file_sha256(f) == hashlib.sha256(b"b" + b"a" * 4095).hexdigest() and len(reads) == 2


def test_weights_fingerprint_changes_with_any_weight_byte(fj_dir, hf_dir, tmp_path):
    for src in (fj_dir, hf_dir):
        copy = damaged(src, tmp_path)
        before = checkpoint.weights_fingerprint(copy)
        assert checkpoint.weights_fingerprint(copy) == before == checkpoint.weights_fingerprint(src)
        weights = data_files(copy)[0] if src == fj_dir else copy / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        assert checkpoint.weights_fingerprint(copy) != before


def test_check_tokenizer_without_a_recorded_tokenizer(hf_dir, tmp_path):
    """An HF model from elsewhere: its directory's tokenizer files are its own; no tokenizer at all: nothing to
    check."""
    from tiny_tokenizers import CODE_CORPUS, train_byte_level

    checkpoint.check_tokenizer(hf_dir, tokenizer_path=tmp_path)  # the model has no tokenizer: not checked
    src = damaged(hf_dir, tmp_path)
    train_byte_level(src / "tokenizer.json")
    other = tmp_path / "other"
    other.mkdir()
    train_byte_level(other / "tokenizer.json", corpus=CODE_CORPUS)
    checkpoint.check_tokenizer(src, tokenizer_path=src)
    checkpoint.check_tokenizer(src, tokenizer_path=src / "tokenizer.json")
    with pytest.raises(CheckpointError, match=rf"target_tokenizer={other} .* is not the tokenizer {src} was saved "
                                              r"with"):
        checkpoint.check_tokenizer(src, tokenizer_path=other, setting="target_tokenizer")
    checkpoint.check_tokenizer(src, tokenizer_path=other, allow_mismatch=True)


def test_nonfinite_counts_stay_on_the_mesh(fj_dir):
    """The check returns counts only (per layer for stacked params), from params sharded over 8 devices."""
    from fusion_jax.convert import integrity
    from fusion_jax.mesh import MeshConfig, make_mesh
    from fusion_jax.config.schema import DEFAULT_RULES

    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    _, params = checkpoint.load(fj_dir, mesh, DEFAULT_RULES)
    assert not params["embed"].is_fully_replicated
    counts = integrity.nonfinite_counts(params, mesh)
    assert counts[("layers", "mlp", "up")].shape == (2,) and counts[("embed",)].shape == ()
    assert all(int(c.sum()) == 0 for c in counts.values())
    up = params["layers"]["mlp"]["up"]
    bad = {**params, "layers": {**params["layers"], "mlp": {**params["layers"]["mlp"],
                                                            "up": up.at[1, 0, 0].set(jnp.inf)}}}
    np.testing.assert_array_equal(integrity.nonfinite_counts(bad, mesh)[("layers", "mlp", "up")], [0, 1])
