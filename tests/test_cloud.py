"""Run paths in an object store, against a local Cloud Storage emulator (gcp-storage-emulator, in memory): a whole run
(documents, teacher caches, checkpoints, metrics, export, report, lm-eval tasks) with ``run_dir=gs://…`` in one
process and in two (a TPU pod's way), each equal to test_multihost's run on local disk, and run again from the
bucket; ``evaluate`` on documents in the bucket; models downloaded from it; the file helpers and the lock on gs://
paths; the settings that refuse a URL."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from fusion_jax import files, hub
from fusion_jax.config import schema
from fusion_jax.errors import ConfigError, RunDirError
from fusion_jax.evaluate import bpb
from fusion_jax.experiments import run as experiment
from fusion_jax.train import checkpoint
from test_multihost import _assert_close_eval, _assert_same_cache, _cfg, _two_processes
from test_train import assets, config  # noqa: F401

pytest.importorskip("gcsfs", reason="gs:// paths need the gcs extra (gcsfs)")
pytest.importorskip("gcp_storage_emulator", reason="the Cloud Storage emulator (test extra gcp-storage-emulator)")

BUCKET = "fj-test-bucket"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def bucket():
    """gs://BUCKET served by an in-memory emulator of its own (the emulator lists by scanning every object it holds:
    a fresh one per test keeps that fast); gcsfs (epath) and TensorStore (Orbax) pointed at it."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
                             f"--port={port}", "--in-memory", f"--default-bucket={BUCKET}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                proc.kill()
                pytest.fail("the Cloud Storage emulator did not start")
            time.sleep(0.2)
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",
           "GOOGLE_CLOUD_PROJECT": "test", "NO_GCE_CHECK": "true"}  # no metadata-server probes: not on GCE
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    logging.getLogger("gcsfs").setLevel(logging.ERROR)  # "could not determine bucket type" without credentials
    try:
        yield f"gs://{BUCKET}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.kill()
        proc.wait()


def _read(url: str) -> bytes:
    return files.as_path(url).read_bytes()


# ------------------------------------------------------------------------------------------------ file helpers


def test_atomic_writes_commit_and_local_copy_on_gs(bucket, tmp_path):
    out = files.as_path(f"{bucket}/helpers/out")
    files.atomic_write_json(out / "a.json", {"x": 1})
    assert json.loads(_read(f"{bucket}/helpers/out/a.json")) == {"x": 1}
    with files.atomic_path(out / "b.bin") as tmp:
        assert not files.is_url(tmp)  # writers that need a local file (ArrayRecord, safetensors) get one
        tmp.write_bytes(b"payload")
    assert _read(f"{bucket}/helpers/out/b.bin") == b"payload"
    with pytest.raises(RuntimeError), files.atomic_path(out / "c.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert not (out / "c.bin").exists()  # a failed write leaves nothing

    partial = files.staging_path(files.as_path(f"{bucket}/helpers/dir"))
    assert not files.is_url(partial)
    partial.mkdir(parents=True)
    (partial / "sub").mkdir()
    (partial / "sub" / "data").write_bytes(b"1")
    (partial / "DONE").write_text("ok")
    files.commit_directory(partial, f"{bucket}/helpers/dir", markers=("DONE",))
    assert _read(f"{bucket}/helpers/dir/sub/data") == b"1" and _read(f"{bucket}/helpers/dir/DONE") == b"ok"
    assert not partial.exists()

    local = files.local_copy(f"{bucket}/helpers/out/b.bin")
    assert local.read_bytes() == b"payload" and files.local_copy(f"{bucket}/helpers/out/b.bin") == local
    files.atomic_write_bytes(out / "b.bin", b"changed!")  # another size: downloaded again
    assert files.local_copy(f"{bucket}/helpers/out/b.bin").read_bytes() == b"changed!"


def test_lock_in_a_bucket(bucket):
    directory = f"{bucket}/locked"
    with files.DirectoryLock(directory, "run directory"):
        assert b"pid %d" % os.getpid() in _read(f"{directory}/{files.LOCK_FILE}")
        with pytest.raises(RunDirError, match="in use by pid"):
            files.DirectoryLock(directory, "run directory").acquire()
    assert not files.as_path(f"{directory}/{files.LOCK_FILE}").exists()  # released: deleted

    # Left by a command of this host that is gone: taken over. By another host: refused, naming what to delete.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = f"pid {int(dead.stdout)} on {socket.gethostname()} since 2026-01-01 00:00:00 (train)"
    files.atomic_write_text(f"{directory}/{files.LOCK_FILE}", stale)
    files.DirectoryLock(directory).acquire().release()
    files.atomic_write_text(f"{directory}/{files.LOCK_FILE}", "pid 1 on another-host since 2026-01-01 00:00:00 (x)")
    with pytest.raises(RunDirError, match=r"another-host.*gcloud storage rm gs://"):
        files.DirectoryLock(directory).acquire()


def test_settings_that_take_no_url_are_refused(bucket):
    files.check_paths(schema.TrainConfig(run_dir=f"{bucket}/r", cache_dir=f"{bucket}/c"))
    with pytest.raises(ConfigError, match=r"target='gs://.*takes a local path.*gcsfuse"):
        files.check_paths(schema.TrainConfig(target=f"{bucket}/model"))
    with pytest.raises(ConfigError, match=r"s3:// is not a supported store"):
        files.check_paths(schema.TrainConfig(run_dir="s3://b/r"))


# ------------------------------------------------------------------------------------------------ a whole run


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory) -> Path:  # noqa: F811
    """test_multihost's 4-step run (lm-eval tasks at its end, an export), in one process on local disk."""
    run = tmp_path_factory.mktemp("reference") / "run"
    experiment.main(_cfg(assets, run, steps=4, export=True))
    return run


def _metrics(run, kind: str) -> dict[int, dict]:
    return {rec["step"]: rec for rec in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if rec["kind"] == kind}


def test_a_run_in_a_bucket_equals_the_local_run_and_resumes(assets, bucket, reference, tmp_path,  # noqa: F811
                                                             monkeypatch):
    monkeypatch.setattr(checkpoint, "USE_OCDBT", False)  # the emulator lacks the conditional writes OCDBT commits with
    remote = f"{bucket}/runs/one_host"
    got = experiment.main(_cfg(assets, remote, steps=4, export=True))
    run = files.as_path(remote)
    for p in ("run_config.json", "documents/documents.json", "cache/target/train/manifest.json",
              "cache/src/validation/manifest.json", "checkpoints/4", "metrics.jsonl", "export/config.json",
              "export/model.safetensors", "report.json", "lm_eval.json"):
        assert (run / p).exists(), p
    assert not (run / files.LOCK_FILE).exists()
    assert list((run / "tensorboard").iterdir())
    losses, want = _metrics(run, "train"), _metrics(reference, "train")
    np.testing.assert_allclose([losses[s]["loss"] for s in range(1, 5)], [want[s]["loss"] for s in range(1, 5)],
                               rtol=1e-6)
    _assert_close_eval(got["eval"], _metrics(reference, "eval")[4])
    assert (run / "export" / "model.safetensors").read_bytes() == \
        (reference / "export" / "model.safetensors").read_bytes()

    # Run again: every stage is found complete in the bucket, the step-4 checkpoint restores from it.
    again = experiment.main(_cfg(assets, remote, steps=4, export=True))
    assert again["resumed_from"] == 4
    _assert_close_eval(again["eval"], got["eval"])

    # python -m fusion_jax.evaluate on the documents in the bucket, its report written there: as on local disk.
    scores = [bpb.main(schema.EvaluateConfig(checkpoint=str(assets / "target"), documents=documents, output=output,
                                             batch_size=8, seq_len=32))
              for documents, output in ((f"{remote}/documents", f"{remote}/eval.json"),
                                        (str(reference / "documents"), str(tmp_path / "eval.json")))]
    assert scores[0]["bits_per_byte"] == pytest.approx(scores[1]["bits_per_byte"], rel=1e-6)
    assert json.loads((run / "eval.json").read_text())["bits_per_byte"] == scores[0]["bits_per_byte"]


def test_two_hosts_share_a_run_in_a_bucket(assets, bucket, reference, tmp_path, monkeypatch):  # noqa: F811
    """What a TPU pod does with ``run_dir=gs://…``: 2 JAX processes × 4 devices prepare the documents, capture the
    caches (each process its shards), train, checkpoint and evaluate in the bucket; the losses, the evaluation and
    the caches (byte for byte) equal one process's run on local disk."""
    remote = f"{bucket}/runs/two_hosts"
    results = _two_processes(_cfg(assets, remote, steps=4, export=False), tmp_path / "multi",
                             tmp_path / "fusion_jax_cache", ocdbt=False)
    assert [r["process_count"] for r in results] == [2, 2]
    run = files.as_path(remote)
    losses, want = _metrics(run, "train"), _metrics(reference, "train")
    np.testing.assert_allclose([losses[s]["loss"] for s in range(1, 5)], [want[s]["loss"] for s in range(1, 5)],
                               rtol=1e-5)
    _assert_close_eval(_metrics(run, "eval")[4], _metrics(reference, "eval")[4])
    for teacher in ("target", "src"):
        for split in ("train", "validation"):
            _assert_same_cache(reference / "cache" / teacher / split, run / "cache" / teacher / split)
    assert (run / "checkpoints" / "4").exists() and not (run / files.LOCK_FILE).exists()


def test_models_and_tokenizers_from_a_bucket_are_downloaded_once(assets, bucket, tmp_path):  # noqa: F811
    """``target``/``checkpoint``/``tokenizer`` as gs:// URLs: the commands resolve them to local copies (like hub
    ids), identical file for file, downloaded again only when an object changed; a missing one is a clear error."""
    for name in ("target", "source"):
        for f in (assets / name).rglob("*"):
            if f.is_file():
                files.atomic_write_bytes(f"{bucket}/models/{name}/{f.relative_to(assets / name)}", f.read_bytes())
    cfg = config(assets, tmp_path / "run", target=f"{bucket}/models/target",
                 sources=(schema.TeacherConfig(name="src", checkpoint=f"{bucket}/models/source"),))
    resolved = hub.resolve_config(cfg)
    for name, got in (("target", resolved.target), ("source", resolved.sources[0].checkpoint)):
        assert not files.is_url(got) and Path(got).name == name  # the name a cache's manifest records
        want = {p.relative_to(assets / name): p.read_bytes() for p in (assets / name).rglob("*") if p.is_file()}
        assert {p.relative_to(got): p.read_bytes() for p in Path(got).rglob("*")
                if p.is_file() and not p.name.endswith(".source.json")} == want
    files.check_paths(resolved)
    meta = next(p for p in Path(resolved.target).rglob("*") if p.is_file() and not p.name.startswith("."))
    before = meta.stat().st_mtime_ns
    assert hub.resolve_config(cfg) == resolved and meta.stat().st_mtime_ns == before  # not downloaded again
    with pytest.raises(ConfigError, match=r"target='gs://.*/nothing': no such file or directory in the bucket"):
        hub.resolve(f"{bucket}/nothing", "target")
