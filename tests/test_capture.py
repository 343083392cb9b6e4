"""Teacher capture: records equal a direct forward, resume after a crash (and after kill -9) with identical bytes,
refusal of a different capture, the estimate, and a two-process run equal to the one-process cache."""

from __future__ import annotations

import dataclasses
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from fusion_jax.data import capture, scoring
from fusion_jax.data.capture import CaptureConfig
from fusion_jax.convert import checkpoint
from fusion_jax.data import teacher_cache as tc
from fusion_jax.data.corpus import Document
from fusion_jax.data.documents import write_documents
from fusion_jax.mesh import MeshConfig
from fusion_jax.models import apply, decoder
from fusion_jax.config.model import ModelConfig
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_byte_level

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, hello there",
    "café naïve résumé — déjà vu",
    "numbers 0123456789 and tabs\tand newlines\n\nend",
    "fusion of large language models",
    "x",
    "the world is big and the fox is quick",
    "knowledge distillation by many teachers at once, sparse and fast",
    "ünïcödé text with emoji 😀 in it",
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("capture")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    train_byte_level(tok_dir / "tokenizer.json")
    tok = load_tokenizer(tok_dir)
    docs = [Document(f"d{i}", t, "prose") for i, t in enumerate(TEXTS)]
    write_documents(root / "docs", docs, docs[:2], {"test": True})
    cfg = ModelConfig(vocab_size=tok.vocab_size + 4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, compute_dtype="float32")  # a padded embedding, as Qwen2 has
    params = decoder.init_params(cfg, jax.random.key(0), std=0.5)
    checkpoint.save(root / "model", cfg, params, model_type="llama", tokenizer_dir=tok_dir)
    return {"root": root, "tok": tok, "cfg": cfg, "params": params, "docs": docs}


def config(setup, out, **kw) -> CaptureConfig:
    base = dict(documents=str(setup["root"] / "docs"), source=str(setup["root"] / "model"), output=str(out), k=5,
                seq_len=64, batch_size=8, docs_per_shard=2, logits_chunk=16, param_dtype="float32",
                compute_dtype="float32", mesh=MeshConfig(data=2, fsdp=4))
    return CaptureConfig(**{**base, **kw})


def test_records_equal_a_direct_forward(setup, tmp_path):
    report = capture.main(config(setup, tmp_path / "cache"))
    cache = tc.TeacherCache(tmp_path / "cache", expect={"k": 5, "tokenizer": setup["tok"].fingerprint})
    assert len(cache) == len(TEXTS) and report["shards_written"] == 5
    assert report["record_bytes_per_token"] < 40  # file sizes differ: ArrayRecord compresses and pads blocks
    tok, cfg, params = setup["tok"], setup["cfg"], setup["params"]
    # Each document alone (no packing), right-padded to one shape: causal attention keeps the padding out.
    alone = np.zeros((len(TEXTS), 64), np.int32)
    for i in range(len(TEXTS)):
        alone[i, :len(cache[i].ids)] = cache[i].ids
    all_logp = np.asarray(jax.nn.log_softmax(apply(cfg, params, alone), axis=-1))
    for i, text in enumerate(TEXTS):
        rec = cache[i]
        enc = tok.encode(text)
        np.testing.assert_array_equal(rec.ids, np.append(enc.ids, tok.eos_id))
        np.testing.assert_array_equal(rec.byte_end, np.append(enc.byte_end, len(text.encode())))
        assert rec.doc_id == f"d{i}" and rec.num_bytes == len(text.encode())
        logp = all_logp[i, :len(rec.ids)]
        order = np.argsort(-logp, axis=-1, kind="stable")[:, :5]
        np.testing.assert_array_equal(rec.topk_ids, order)
        expect = np.take_along_axis(logp, order, axis=-1)
        np.testing.assert_allclose(rec.topk_logprobs, expect, atol=1 / 64 + 4e-3)
        ce = -logp[np.arange(len(rec.ids) - 1), rec.ids[1:]]
        np.testing.assert_allclose(rec.token_ce[:-1], ce, rtol=2e-3, atol=2e-3)
        assert np.isnan(rec.token_ce[-1])
        np.testing.assert_allclose(rec.doc_ce, ce.mean(), rtol=1e-4)


def test_crash_then_resume_gives_identical_bytes(setup, tmp_path, monkeypatch):
    clean = tmp_path / "clean"
    capture.main(config(setup, clean))
    crashed = tmp_path / "crashed"
    real_write = tc.write_shard
    calls = []

    def crash_after_two(*args, **kwargs):
        if len(calls) == 2:
            Path(args[0], tc.shard_name(args[1]) + ".partial").write_bytes(b"torn")
            raise KeyboardInterrupt("simulated crash")
        calls.append(args[1])
        return real_write(*args, **kwargs)

    monkeypatch.setattr(tc, "write_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        capture.main(config(setup, crashed))
    monkeypatch.undo()
    assert not (crashed / tc.MANIFEST).exists()
    with pytest.raises(tc.CacheError, match="capture did not finish"):
        tc.TeacherCache(crashed)
    report = capture.main(config(setup, crashed))
    assert report["shards_written"] == 3  # the two finished shards are kept
    _assert_same_cache(clean, crashed)
    assert capture.main(config(setup, crashed))["skipped"]


def _assert_same_cache(a: Path, b: Path):
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for name in names:
        if name.endswith(".array_record"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_rows_fitted_to_documents_hold_the_same_records_as_seq_len_rows(setup, tmp_path):
    capture.main(config(setup, tmp_path / "fit", seq_len=512))
    capture.main(config(setup, tmp_path / "fixed", seq_len=512, fit_rows=False))
    fit, fixed = tc.TeacherCache(tmp_path / "fit"), tc.TeacherCache(tmp_path / "fixed")
    lengths = [int(n) for n in fit.doc_tokens()]
    assert max(lengths) <= 256 and scoring.row_lengths(512)[0] == 256  # so the fitted rows are 256, not 512, long
    for i in range(len(fixed)):
        a, b = fit[i], fixed[i]
        assert a.doc_id == b.doc_id and np.array_equal(a.ids, b.ids)  # the shard's document order is kept
        np.testing.assert_array_equal(a.topk_ids[:, 0], b.topk_ids[:, 0])
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1 / 32 + 2e-3)  # a gap step + float16 top-1
        np.testing.assert_allclose(a.token_ce, b.token_ce, rtol=1e-4, atol=1e-4, equal_nan=True)


def test_refuses_a_different_capture_in_the_same_output(setup, tmp_path):
    out = tmp_path / "cache"
    capture.main(config(setup, out, max_documents=4))
    with pytest.raises(tc.CacheError, match=r"with k=5, this run has k=3|k=5 but this run needs k=3"):
        capture.main(config(setup, out, max_documents=4, k=3))
    (out / tc.MANIFEST).unlink()  # an unfinished capture with other settings is refused too
    with pytest.raises(tc.CacheError, match=r"holds a capture with k=5, this run has k=3"):
        capture.main(config(setup, out, max_documents=4, k=3))


def test_bad_input(setup, tmp_path):
    with pytest.raises(ValueError, match="has .* tokens under this tokenizer .* seq_len is 8"):
        capture.main(config(setup, tmp_path / "c1", seq_len=8, logits_chunk=8))
    with pytest.raises(ValueError, match="documents is required"):
        CaptureConfig(source="x", output="y").validate()


def test_estimate(setup, tmp_path, capsys):
    report = capture.main(config(setup, tmp_path / "never", estimate=True))
    out = capsys.readouterr().out
    assert "estimate for" in out and "GB" in out and "tokens/s" in out
    assert report["bytes_per_token"] == tc.bytes_per_token(5, setup["cfg"].vocab_size)
    assert not (tmp_path / "never").exists()
    real = sum(len(setup["tok"].encode(t).ids) + 1 for t in TEXTS)
    assert abs(report["tokens"] - real) / real < 0.35


# ------------------------------------------------------------------------------------------ subprocesses

def _cli(setup, out, extra=(), devices=8, **kw) -> subprocess.Popen:
    cfg = config(setup, out, **kw)
    sets = [f"{f.name}={getattr(cfg, f.name)}" for f in dataclasses.fields(cfg)
            if f.name not in ("mesh", "estimate", "estimate_sample")]
    args = [sys.executable, "-m", "fusion_jax.capture", *sum((["--set", s] for s in sets), []),
            "--set", "mesh.data=2", "--set", "mesh.fsdp=-1", *extra]
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_then_rerun_gives_identical_bytes(setup, tmp_path):
    many = [Document(f"m{i}", f"{TEXTS[i % len(TEXTS)]} {i}", "prose") for i in range(600)]
    write_documents(tmp_path / "docs", many, many[:1], {"test": True})
    kw = dict(documents=str(tmp_path / "docs"), mesh=MeshConfig(data=2, fsdp=-1))
    clean = tmp_path / "clean"
    capture.main(config(setup, clean, **kw))
    out = tmp_path / "killed"
    proc = _cli(setup, out, **kw)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("shard-*.json"))) < 3:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)  # somewhere in the middle of the 300 shards
    proc.wait()
    assert list(out.glob("shard-*.json")) and not (out / tc.MANIFEST).exists()
    rerun = _cli(setup, out, **kw)
    output, _ = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, output
    _assert_same_cache(clean, out)


def test_two_processes_write_disjoint_shards_equal_to_one_process(setup, tmp_path):
    one = tmp_path / "one"  # seq_len rows, as every multi-process capture uses: the same bytes whatever ran beside
    capture.main(config(setup, one, mesh=MeshConfig(data=2, fsdp=-1), fit_rows=False))
    two = tmp_path / "two"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        _cli(setup, two, devices=4, extra=["--set", f"mesh.coordinator_address=127.0.0.1:{port}",
                                           "--set", "mesh.num_processes=2", "--set", f"mesh.process_id={i}"])
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    for i, text in enumerate(outputs):
        mine = [s for s in range(5) if s % 2 == i]
        assert f"process {i}/2: {len(mine)} of {len(mine)} shards to capture" in text, text
    _assert_same_cache(one, two)


# ------------------------------------------------------------------------------------------ bad inputs (issue 12)

def test_disk_full_is_one_error_line_and_the_rerun_resumes_identically(setup, tmp_path, monkeypatch):
    """ArrayRecord reports a full disk as a RuntimeError (a traceback before); now one `error:` line naming the shard
    and the fix, and the rerun completes the cache with the same bytes."""
    from array_record.python import array_record_module as arm

    from fusion_jax import cli

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to make a real write fail with ENOSPC")
    clean = tmp_path / "clean"
    capture.main(config(setup, clean))
    out = tmp_path / "full"
    real, opened = arm.ArrayRecordWriter, []

    def third_shard_hits_a_full_disk(path, options):
        opened.append(path)
        return real("/dev/full" if len(opened) == 3 else path, options)

    monkeypatch.setattr(arm, "ArrayRecordWriter", third_shard_hits_a_full_disk)
    with pytest.raises(SystemExit) as e:
        cli.run(capture.main, lambda: config(setup, out))
    monkeypatch.undo()
    message = str(e.value.code)
    assert message == (f"error: No space left on device: {out / 'shard-00002.array_record.partial'} (free some space "
                       "or choose another output, then run the same command again to resume)"), message
    assert len(list(out.glob("shard-*.json"))) == 2 and not (out / tc.MANIFEST).exists()
    assert capture.main(config(setup, out))["shards_written"] == 3
    _assert_same_cache(clean, out)


def _hf_source(setup, path: Path) -> Path:
    checkpoint.save_hf(path, setup["cfg"], setup["params"], model_type="llama", tokenizer_dir=setup["root"] / "model")
    return path


def test_source_changed_in_place_is_not_served_from_the_stale_cache(setup, tmp_path):
    """Issue 12, item 10: the cache's identity held the weights' byte count, so a checkpoint rewritten in place with
    other values (same shapes, same bytes) reused the stale cache as "capture already complete"."""
    from safetensors.numpy import load_file, save_file

    source = _hf_source(setup, tmp_path / "hf")
    out = tmp_path / "cache"
    capture.main(config(setup, out, source=str(source), max_documents=4))
    assert capture.main(config(setup, out, source=str(source), max_documents=4))["skipped"]

    weights = source / "model.safetensors"
    size = weights.stat().st_size
    tensors = load_file(weights)
    tensors["lm_head.weight"] = tensors["lm_head.weight"][::-1].copy()  # same shape and dtype, other values
    save_file(tensors, str(tmp_path / "edited.safetensors"), metadata={"format": "pt"})
    with open(weights, "r+b") as f:  # in place: same file, same size
        f.write((tmp_path / "edited.safetensors").read_bytes())
    assert weights.stat().st_size == size
    for finished in (True, False):
        with pytest.raises(tc.CacheError, match=rf"{out} was captured from a model named hf whose weights or config "
                                                rf"differ from {source} now .*Delete {out} to capture again"):
            capture.main(config(setup, out, source=str(source), max_documents=4))
        (out / tc.MANIFEST).unlink(missing_ok=True)  # an unfinished capture is refused the same way


def test_truncated_manifest_is_named_and_deleting_it_rebuilds_it(setup, tmp_path):
    out = tmp_path / "cache"
    capture.main(config(setup, out, max_documents=4))
    manifest = (out / tc.MANIFEST).read_bytes()
    (out / tc.MANIFEST).write_bytes(manifest[:100])
    with pytest.raises(tc.CacheError, match=r"manifest\.json: not valid JSON .*delete manifest\.json and run the "
                                            "capture again"):
        capture.main(config(setup, out, max_documents=4))
    (out / tc.MANIFEST).unlink()
    assert capture.main(config(setup, out, max_documents=4))["shards_written"] == 0
    assert (out / tc.MANIFEST).read_bytes() == manifest


def test_a_tokenizer_other_than_the_sources_is_refused(setup, tmp_path, caplog):
    """Issue 12, item 10: a tokenizer with a vocabulary that fits the model but is not the one it was saved with."""
    from tiny_tokenizers import CODE_CORPUS

    other = tmp_path / "other"
    other.mkdir()
    train_byte_level(other / "tokenizer.json", corpus=CODE_CORPUS, vocab_size=setup["tok"].vocab_size)
    assert load_tokenizer(other).vocab_size <= setup["cfg"].vocab_size
    with pytest.raises(checkpoint.CheckpointError, match=rf"tokenizer={other} .* is not the tokenizer "
                                                         rf"{setup['root'] / 'model'} was saved with"):
        capture.main(config(setup, tmp_path / "c1", tokenizer=str(other), max_documents=2))
    assert not list((tmp_path / "c1").glob("*.json"))  # refused before anything was captured
    capture.main(config(setup, tmp_path / "c2", tokenizer=str(other), max_documents=2, allow_tokenizer_mismatch=True))
    assert "allowed by allow_tokenizer_mismatch" in caplog.text
    capture.main(config(setup, tmp_path / "c3", tokenizer=str(setup["root"] / "model"), max_documents=2))
