"""Teacher cache: record encoding round trip and precision, shards, sidecars, manifest checks, corruption."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fusion_jax.data import teacher_cache as tc
from fusion_jax.data.teacher_cache import CacheError, TeacherCache, TeacherRecord


def make_record(rng, doc_index=0, n=7, k=4, vocab=300, pad_last=0, doc_id=None):
    logits = rng.normal(size=(n, vocab)) * 3
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
    order = np.argsort(-lp, axis=1)[:, :k]
    topk_lp = np.take_along_axis(lp, order, axis=1).astype(np.float32)
    if pad_last:
        topk_lp[:, k - pad_last:] = -np.inf
    ids = rng.integers(0, vocab, n).astype(np.int32)
    token_ce = np.append(-lp[np.arange(n - 1), ids[1:]], np.nan).astype(np.float32)
    lengths = rng.integers(0, 9, n)
    return TeacherRecord(
        doc_index=doc_index, doc_id=doc_id or f"doc-{doc_index}", ids=ids,
        byte_end=np.cumsum(lengths).astype(np.int32), topk_ids=order.astype(np.int32), topk_logprobs=topk_lp,
        token_ce=token_ce, doc_ce=float(np.nanmean(token_ce)) if n > 1 else 0.0, num_bytes=int(lengths.sum()),
    )


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), k=st.integers(1, 12), big_vocab=st.booleans(), fmt=st.sampled_from(tc.LOGPROB_FORMATS),
       pad=st.integers(0, 3), seed=st.integers(0, 2**31))
def test_round_trip_and_precision(n, k, big_vocab, fmt, pad, seed):
    rng = np.random.default_rng(seed)
    vocab = 70_000 if big_vocab else 300
    k = min(k, vocab)
    pad = min(pad, k - 1)
    rec = make_record(rng, doc_index=seed % 1000, n=n, k=k, vocab=vocab, pad_last=pad, doc_id="dé/ü#3")
    data = tc.encode_record(rec, vocab, fmt)
    header = tc.record_overhead(rec.doc_id)
    assert len(data) == header + n * tc.bytes_per_token(k, vocab, fmt)
    out = tc.decode_record(data)
    assert (out.doc_index, out.doc_id, out.num_bytes, out.k) == (rec.doc_index, rec.doc_id, rec.num_bytes, k)
    np.testing.assert_array_equal(out.ids, rec.ids)
    np.testing.assert_array_equal(out.byte_end, rec.byte_end)
    np.testing.assert_array_equal(out.topk_ids, rec.topk_ids)
    assert out.doc_ce == np.float32(rec.doc_ce)
    np.testing.assert_array_equal(out.token_ce, rec.token_ce.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(np.isneginf(out.topk_logprobs), np.isneginf(rec.topk_logprobs))
    finite = np.isfinite(rec.topk_logprobs)
    top1 = rec.topk_logprobs[:, 0].astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(out.topk_logprobs[:, 0], top1)  # top-1 exact to float16
    err = np.abs(out.topk_logprobs[finite] - rec.topk_logprobs[finite])
    if fmt == "quantized":
        gaps = (rec.topk_logprobs[:, :1] - rec.topk_logprobs)[finite]
        fp16_err = np.abs(top1[:, None] - rec.topk_logprobs[:, :1]).repeat(k, axis=1)[finite]
        bound = np.where(gaps <= 254 / 32, 1 / 64, gaps - 254 / 32 + 1 / 64) + fp16_err + 1e-6
        assert (err <= bound).all()
    else:
        assert (err <= np.abs(rec.topk_logprobs[finite]) * 2**-11 + 1e-7).all()
    assert (np.diff(np.where(finite, out.topk_logprobs, -1e9), axis=1) <= 0).all()  # still descending


def test_size_target():
    # ≤ 40 bytes per token per teacher at k = 10 for vocabularies ≤ 65,536 (the budget).
    assert tc.bytes_per_token(10, 65_536, "quantized") == 37
    assert tc.bytes_per_token(10, 65_536, "float16") == 46
    assert tc.bytes_per_token(10, 151_936, "quantized") == 4 + 2 + 40 + 11 + 2


def test_encode_rejects_bad_records():
    rng = np.random.default_rng(0)
    rec = make_record(rng)
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        tc.encode_record(rec, 100)
    unsorted = TeacherRecord(**{**rec.__dict__, "topk_logprobs": rec.topk_logprobs[:, ::-1].copy()})
    with pytest.raises(ValueError, match="descending"):
        tc.encode_record(unsorted, 300)
    with pytest.raises(ValueError, match="do not agree"):
        tc.encode_record(TeacherRecord(**{**rec.__dict__, "ids": rec.ids[:-1]}), 300)
    with pytest.raises(CacheError, match="bad magic"):
        tc.decode_record(b"XXXX" + tc.encode_record(rec, 300)[4:])


def _write_cache(path, rng, num_docs=5, per_shard=2, spec=None):
    path.mkdir(parents=True, exist_ok=True)
    records = [make_record(rng, doc_index=i, n=3 + i) for i in range(num_docs)]
    sidecars = []
    for s in range(tc.num_shards(num_docs, per_shard)):
        docs = [records[i] for i in tc.shard_docs(s, num_docs, per_shard)]
        sidecars.append(tc.write_shard(path, s, (tc.encode_record(r, 300) for r in docs), [len(r.ids) for r in docs]))
    spec = spec or {"model": "m", "tokenizer": "fp", "k": 4, "docs_per_shard": per_shard}
    tc.write_manifest(path, spec, sidecars)
    return records


def test_cache_round_trip_and_determinism(tmp_path):
    records = _write_cache(tmp_path / "a", np.random.default_rng(1))
    _write_cache(tmp_path / "b", np.random.default_rng(1))
    for name in ("shard-00000.array_record", "shard-00002.array_record", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()  # identical bytes
    cache = TeacherCache(tmp_path / "a", expect={"model": "m", "k": 4})
    assert len(cache) == 5 and cache.k == 4
    np.testing.assert_array_equal(cache.doc_tokens(), [3, 4, 5, 6, 7])
    for i in (4, 0, 3):  # random access, any order
        np.testing.assert_array_equal(cache[i].ids, records[i].ids)
    clone = pickle.loads(pickle.dumps(cache))
    np.testing.assert_array_equal(clone[2].topk_ids, records[2].topk_ids)
    with pytest.raises(IndexError):
        cache[5]
    assert not list((tmp_path / "a").glob("*.partial"))


def test_mismatched_manifest_names_the_field(tmp_path):
    _write_cache(tmp_path, np.random.default_rng(2))
    with pytest.raises(CacheError, match=r"captured with k=4 but this run needs k=10"):
        TeacherCache(tmp_path, expect={"k": 10})
    with pytest.raises(CacheError, match=r"tokenizer='fp' but this run needs tokenizer='other'"):
        TeacherCache(tmp_path, expect={"tokenizer": "other"})


def test_corrupted_and_truncated_shards(tmp_path):
    _write_cache(tmp_path, np.random.default_rng(3))
    shard = tmp_path / "shard-00001.array_record"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"shard 1 \(shard-00001.array_record\) fails its sha256"):
        TeacherCache(tmp_path)
    TeacherCache(tmp_path, verify="size")  # sizes agree: only the full check sees it
    shard.write_bytes(bytes(data[:-10]))
    with pytest.raises(CacheError, match=r"shard 1 .* truncated"):
        TeacherCache(tmp_path, verify="size")
    shard.unlink()
    with pytest.raises(CacheError, match="shard 1 .* is missing"):
        TeacherCache(tmp_path, verify="size")


def test_incomplete_cache_and_resume_bookkeeping(tmp_path):
    rng = np.random.default_rng(4)
    rec = make_record(rng)
    tc.write_shard(tmp_path, 0, [tc.encode_record(rec, 300)], [len(rec.ids)])
    # A crash mid-shard: a .partial shard file, and a finished shard whose sidecar never got written.
    (tmp_path / "shard-00001.array_record.partial").write_bytes(b"half")
    (tmp_path / "shard-00002.array_record").write_bytes(b"whole but unrecorded")
    with pytest.raises(CacheError, match="capture did not finish"):
        TeacherCache(tmp_path)
    done = tc.done_shards(tmp_path, range(3))
    assert list(done) == [0] and done[0]["num_docs"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.array_record", "shard-00000.json"]
    # A sidecar that disagrees with its shard (size) is not trusted either.
    side = json.loads((tmp_path / "shard-00000.json").read_text())
    (tmp_path / "shard-00000.json").write_text(json.dumps({**side, "size": side["size"] + 1}))
    assert tc.done_shards(tmp_path, [0]) == {}
    with pytest.raises(CacheError, match="not a teacher cache"):
        TeacherCache(tmp_path / "nowhere")


@pytest.mark.parametrize("fmt", tc.LOGPROB_FORMATS)
def test_empty_rows_round_trip(fmt):
    rec = make_record(np.random.default_rng(5), n=4, k=3)
    lp = rec.topk_logprobs.copy()
    lp[1] = -np.inf  # an empty row (imported official `hard` rows can be empty)
    out = tc.decode_record(tc.encode_record(TeacherRecord(**{**rec.__dict__, "topk_logprobs": lp}), 300, fmt))
    assert np.isneginf(out.topk_logprobs[1]).all() and np.isfinite(out.topk_logprobs[[0, 2, 3], 0]).all()


def test_truncated_manifest_names_the_file_and_the_fix(tmp_path):
    """Issue 12, item 11: a truncated manifest.json was a bare JSONDecodeError that named no file."""
    _write_cache(tmp_path, np.random.default_rng(6))
    manifest = tmp_path / tc.MANIFEST
    manifest.write_bytes(manifest.read_bytes()[:40])
    with pytest.raises(CacheError, match=r"manifest\.json: not valid JSON .*truncated or corrupted; delete "
                                         r"manifest\.json and run the capture again"):
        TeacherCache(tmp_path)
    manifest.write_text("[1, 2]")
    with pytest.raises(CacheError, match=r"manifest\.json: expected a JSON object"):
        TeacherCache(tmp_path)


def test_disk_full_while_writing_a_shard_is_an_os_error_naming_it(tmp_path, monkeypatch):
    """Issue 12, item 11: ArrayRecord reports a full disk as a RuntimeError (at close); it becomes OSError(ENOSPC)
    naming our file, which the CLI prints as one line with the fix."""
    import errno
    import os

    from array_record.python import array_record_module as arm

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux) to make a real write fail with ENOSPC")
    real = arm.ArrayRecordWriter
    monkeypatch.setattr(arm, "ArrayRecordWriter", lambda path, options: real("/dev/full", options))
    rec = make_record(np.random.default_rng(7))
    with pytest.raises(OSError) as e:
        tc.write_shard(tmp_path, 0, [tc.encode_record(rec, 300)], [len(rec.ids)])
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "shard-00000.array_record.partial")
    assert not (tmp_path / "shard-00000.json").exists()
    assert tc.done_shards(tmp_path, [0]) == {}  # redone by the next run
