"""The fusion loader on a tiny document store, tiny tokenizers and hand-written teacher caches.

Teacher caches are written here from the teachers' real encodings (+EOS) with random sorted top-k log-probs, then
every batch is checked against calling ``transfer_topk`` / ``FuseLLMPair.transfer`` directly on the whole document
and slicing; plus determinism, resume, workers, meshes, simulated hosts and the error messages.
"""

from __future__ import annotations

import dataclasses
import math
import types
from pathlib import Path

import jax
import numpy as np
import pytest

from fusion_jax.align.fusellm import FuseLLMPair
from fusion_jax.align.transfer import ROW_EMPTY, ROW_TEACHER, transfer_topk
from fusion_jax.align.vocab import vocab_map
from fusion_jax.data import teacher_cache as tc
from fusion_jax.data.corpus import Document
from fusion_jax.data.documents import DocumentStore, write_documents
from fusion_jax.config.loader import from_dict
from fusion_jax.data.loader import FusionLoader, LoaderConfig, LoaderError, TeacherConfig, target_lengths
from fusion_jax.data.teacher_cache import TeacherCache, TeacherRecord
from fusion_jax.mesh import MeshConfig, make_mesh
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

T, B = 16, 8
TEXTS = [
    "the quick brown fox jumps over the lazy dog. the quick brown fox jumps again.",
    "café naïve résumé — déjà vu, 日本語のテキスト and an emoji 🙂!",
    "numbers 0123456789 and tabs\tand newlines\n\nend",
    "hello world",
    "fusion of large language models by knowledge distillation, fusion of large language models",
    "Ünïcödé ß ø å — ∑ x² ≤ ∞",
    "a",
    "hello there; the world is big and the dog is lazy",
    "  leading spaces and trailing  ",
    "tabs\tand\tmore tabs",
]


def write_cache(path, store, tok, k, seed, *, per_shard=3, append_eos=True, fingerprint=None, bad_id_at=None,
                num_docs=None, model_rows=None):
    """A teacher cache for the first ``num_docs`` (all) documents of ``store``: the teacher's real encoding (+EOS),
    random sorted top-k log-probs over ``model_rows`` (default: the tokenizer's size) ids."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(len(store) if num_docs is None else num_docs):
        doc = store[i]
        enc = tok.encode(doc.text)
        nbytes = len(doc.text.encode("utf-8"))
        ids, be = enc.ids, enc.byte_end
        if append_eos:
            ids, be = np.append(ids, tok.eos_id).astype(np.int32), np.append(be, nbytes).astype(np.int32)
        n, V = len(ids), model_rows or tok.vocab_size
        logits = rng.normal(size=(n, V)) * 3
        lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        order = np.argsort(-lp, axis=1)[:, :k]
        top = np.take_along_axis(lp, order, axis=1).astype(np.float32)
        ce = np.append(-lp[np.arange(n - 1), ids[1:]], np.nan).astype(np.float32)
        records.append(TeacherRecord(
            doc_index=i, doc_id=doc.id if i != bad_id_at else "someone-else", ids=ids, byte_end=be,
            topk_ids=order.astype(np.int32), topk_logprobs=top, token_ce=ce,
            doc_ce=float(np.nanmean(ce)) if n > 1 else 0.0, num_bytes=nbytes))
    path.mkdir(parents=True)
    sidecars = []
    for s in range(tc.num_shards(len(records), per_shard)):
        recs = [records[i] for i in tc.shard_docs(s, len(records), per_shard)]
        sidecars.append(tc.write_shard(path, s, (tc.encode_record(r, model_rows or tok.vocab_size) for r in recs),
                                       [len(r.ids) for r in recs]))
    spec = {"model": f"teacher-{seed}", "tokenizer": fingerprint or tok.fingerprint, "k": k,
            "docs_per_shard": per_shard, "append_eos": append_eos,
            "documents": {"fingerprint": store.fingerprint, "split": "train", "num_docs": len(records)}}
    tc.write_manifest(path, spec, sidecars)
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    w = types.SimpleNamespace(root=root)
    w.target_path = train_sentencepiece(root / "target")
    w.bpe_path = train_byte_level(root / "bpe.json")
    w.sp_path = train_sentencepiece(root / "sp", vocab_size=360)
    w.target, w.bpe, w.sp = (load_tokenizer(p) for p in (w.target_path, w.bpe_path, w.sp_path))
    docs = [Document(f"doc-{i}", t, "code" if i % 3 == 0 else "web") for i, t in enumerate(TEXTS)]
    write_documents(root / "docs", docs, [Document("val-0", "validation text", "web")])
    w.store = DocumentStore(root / "docs", "train")
    w.cache_sp = write_cache(root / "cache_sp", w.store, w.sp, k=6, seed=1)
    w.cache_bpe = write_cache(root / "cache_bpe", w.store, w.bpe, k=4, seed=2)
    w.cache_dir = str(root / "fj_cache")
    w.teachers = (
        TeacherConfig(cache=str(w.cache_sp), tokenizer=str(w.sp_path), name="sp"),
        TeacherConfig(cache=str(w.cache_bpe), tokenizer=str(w.bpe_path), name="bpe", align="fusellm",
                    vocab_align="soft", onehot_target="current"),
    )
    return w


def config(w, **kw):
    base = dict(teachers=w.teachers, seq_len=T, global_batch_size=B, seed=0, k=4, cache_dir=w.cache_dir)
    return LoaderConfig(**{**base, **kw})


def loader(w, mesh=None, **kw):
    state = kw.pop("state", None)
    pi, pc = kw.pop("process_index", None), kw.pop("process_count", None)
    return FusionLoader(config(w, **kw), w.store, w.target_path, mesh=mesh, state=state, process_index=pi,
                        process_count=pc, progress=False)


def assert_tree_equal(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(la) == len(lb) and jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# ------------------------------------------------------------------------------------------ reference per block


def naive_chunks(src_end: list, src_ce: list, tgt_end: list) -> list[tuple[int, int, float]]:
    """Byte chunks by hand: each token joins the first common end offset at or after its own end; a group is a chunk
    when no token in it is a document's first, spans no bytes or lacks a CE → (first, last target token, −Σ CE)."""
    common = sorted(set(src_end) & set(tgt_end))
    group = lambda end: next(i for i, c in enumerate(common) if c >= end)
    out = []
    for g in range(len(common)):
        src = [i for i, end in enumerate(src_end) if group(end) == g]
        tgt = [i for i, end in enumerate(tgt_end) if group(end) == g]
        empty = any(src_end[i] == (src_end[i - 1] if i else 0) for i in src) or \
            any(tgt_end[i] == (tgt_end[i - 1] if i else 0) for i in tgt)
        if empty or 0 in src or 0 in tgt or not all(math.isfinite(src_ce[i - 1]) for i in src):
            continue
        out.append((tgt[0], tgt[-1], -sum(src_ce[i - 1] for i in src)))
    return out


def reference_block(w, ld, g):
    """Block g rebuilt from the plan's segments by direct calls on whole documents."""
    caches = [TeacherCache(w.cache_sp), TeacherCache(w.cache_bpe)]
    vmap = vocab_map(w.sp, w.target, "prefix", w.cache_dir)
    pair = FuseLLMPair(w.bpe, w.target, mined=vocab_map(w.bpe, w.target, "mined", w.cache_dir))
    segs = ld.plan.segments(g)
    out = {"tokens": np.zeros(T, np.int32), "token_bytes": np.zeros(T, np.int32),
           "teachers": [{"ids": np.zeros((T, 4), np.int32), "logprobs": np.full((T, 4), -np.inf, np.float32),
                         "kind": np.full(T, ROW_EMPTY, np.int8), "ce": 0.0, "nats": 0.0, "bytes": 0,
                         "chunk_start": np.full(T, -1, np.int32), "chunk_logprob": np.zeros(T, np.float32)}
                        for _ in caches]}
    for d, s, e, o in zip(segs.doc, segs.start, segs.end, segs.offset):
        text = w.store[d].text
        enc = w.target.encode(text)
        nbytes = len(text.encode())
        ids = np.append(enc.ids, w.target.eos_id).astype(np.int32)
        be = np.append(enc.byte_end, nbytes).astype(np.int32)
        dst = slice(o, o + e - s)
        out["tokens"][dst] = ids[s:e]
        out["token_bytes"][dst] = np.diff(be, prepend=0)[s:e]
        owned = set(range(([0] + be.tolist())[s], be[e - 1]))
        for j, cache in enumerate(caches):
            rec = cache[d]
            if j == 0:
                rows = transfer_topk(rec.byte_end, be, ids, rec.topk_ids, rec.topk_logprobs, vmap, "onehot_next", 4)
            else:
                rows = pair.transfer(rec.ids, ids, rec.topk_ids, rec.topk_logprobs, "soft", "current")
            t = out["teachers"][j]
            t["ids"][dst], t["logprobs"][dst], t["kind"][dst] = rows.ids[s:e], rows.logprobs[s:e], rows.kind[s:e]
            t["ce"] += rec.doc_ce * (e - s)
            starts = np.concatenate([[0], rec.byte_end[:-1]])
            for jj in range(1, len(rec.ids)):
                a, b = int(starts[jj]), int(rec.byte_end[jj])
                inside = set(range(a, b)) <= owned if b > a else e == len(ids)
                if inside:
                    t["nats"] += float(rec.token_ce[jj - 1])
                    t["bytes"] += b - a
            for first, last, lp in naive_chunks(rec.byte_end.tolist(), rec.token_ce.tolist(), be.tolist()):
                if first > s and last < e:  # every token of the chunk predicted inside this piece
                    t["chunk_start"][o + first - s - 1] = -2  # marks the chunk's inner positions as visited
                    t["chunk_start"][o + last - s - 1] = o + first - s - 1
                    t["chunk_logprob"][o + last - s - 1] = lp
    n = segs.length
    for t in out["teachers"]:
        t["seq_ce"] = np.float32(t["ce"] / n)
        t["seq_bpb"] = np.float32(t["nats"] / (math.log(2) * t["bytes"])) if t["bytes"] else np.float32(np.nan)
    return out


def test_batches_match_direct_transfer(world):
    w = world
    ld = loader(w)
    assert ld.plan.blocks_per_epoch > B  # several batches, documents straddle blocks
    assert any(len(ld.plan.segments(g)) > 1 for g in range(B))
    steps = -(-ld.plan.blocks_per_epoch // B) + 1  # one epoch and into the next
    chunks = chunked_tokens = 0
    for step in range(steps):
        batch = ld.local_batch(step)
        assert {k: (v.shape, v.dtype) for k, v in batch.items() if k != "teachers"} == {
            "tokens": ((B, T), np.int32), "segment_ids": ((B, T), np.int32), "positions": ((B, T), np.int32),
            "loss_mask": ((B, T), np.bool_), "doc_index": ((B, T), np.int32), "token_bytes": ((B, T), np.int32)}
        assert len(batch["teachers"]) == 2
        for t in batch["teachers"]:
            assert {k: (v.shape, v.dtype) for k, v in t.items()} == {
                "ids": ((B, T, 4), np.int32), "logprobs": ((B, T, 4), np.float32), "kind": ((B, T), np.int8),
                "seq_ce": ((B,), np.float32), "seq_bpb": ((B,), np.float32),
                "chunk_start": ((B, T), np.int32), "chunk_logprob": ((B, T), np.float32)}
        for r in range(B):
            g = step * B + r
            ref = reference_block(w, ld, g)
            np.testing.assert_array_equal(batch["tokens"][r], ref["tokens"])
            np.testing.assert_array_equal(batch["token_bytes"][r], ref["token_bytes"])
            pad = batch["segment_ids"][r] == 0
            np.testing.assert_array_equal(pad, batch["doc_index"][r] == -1)
            for j, rt in enumerate(ref["teachers"]):
                bt = batch["teachers"][j]
                np.testing.assert_array_equal(bt["ids"][r], rt["ids"])
                np.testing.assert_array_equal(bt["logprobs"][r], rt["logprobs"])
                np.testing.assert_array_equal(bt["kind"][r], rt["kind"])
                np.testing.assert_allclose(bt["seq_ce"][r], rt["seq_ce"], rtol=1e-6)
                np.testing.assert_allclose(bt["seq_bpb"][r], rt["seq_bpb"], rtol=1e-5)
                np.testing.assert_array_equal(bt["chunk_start"][r], np.maximum(rt["chunk_start"], -1))
                np.testing.assert_allclose(bt["chunk_logprob"][r], rt["chunk_logprob"], rtol=1e-5)
                chunks += int((bt["chunk_start"][r] >= 0).sum())
                chunked_tokens += int((bt["chunk_start"][r] >= 0).sum() + (rt["chunk_start"] == -2).sum())
    assert chunks > 0 and chunked_tokens > chunks  # chunks of one token and of several
    # every document's bytes are counted once per epoch (token_bytes), and the epoch covers all documents
    epoch = [ld.local_batch(s) for s in range(ld.plan.blocks_per_epoch // B)]
    seen = set(np.concatenate([b["doc_index"].ravel() for b in epoch]).tolist()) - {-1}
    assert seen <= set(range(len(TEXTS)))


def test_official_mode_and_lengths_cache(world):
    w = world
    ld = loader(w, mask_documents=False)
    batch = ld.local_batch(0)
    nonpad = batch["doc_index"] >= 0
    np.testing.assert_array_equal(batch["segment_ids"], nonpad.astype(np.int32))
    masked = loader(w).local_batch(0)
    np.testing.assert_array_equal(batch["tokens"], masked["tokens"])  # same packing, other masks
    assert (batch["loss_mask"] >= masked["loss_mask"]).all() and (batch["loss_mask"] != masked["loss_mask"]).any()
    files = list((w.root / "fj_cache" / "doc_lengths").glob("*.npy"))
    assert len(files) == 1
    lengths = np.load(files[0])
    np.testing.assert_array_equal(lengths, [len(w.target.encode(t).ids) for t in TEXTS])
    np.testing.assert_array_equal(ld.plan.lengths, lengths + 1)  # EOS


def test_determinism_seed_and_resume(world):
    w = world
    a, b, other = loader(w), loader(w), loader(w, seed=1)
    first = [next(a) for _ in range(3)]
    assert_tree_equal(first, [next(b) for _ in range(3)])
    assert not np.array_equal(next(other)["tokens"], first[0]["tokens"])
    # resume: a state taken after 1 step continues with steps 1, 2
    c = loader(w)
    next(c)
    state = c.state()
    assert state["step"] == 1
    resumed = loader(w, state=state)
    assert_tree_equal([next(resumed), next(resumed)], first[1:])
    c.restore(a.state())  # restore in place, mid-iteration
    assert c.step == 3
    assert_tree_equal(next(c), a.local_batch(3))
    with pytest.raises(LoaderError, match=r"loader state: plan=.*seed"):
        loader(w, seed=1).restore(state)
    with pytest.raises(LoaderError, match=r"global_batch_size=8 was saved but this loader has global_batch_size=4"):
        loader(w, global_batch_size=4).restore(state)


def test_workers_give_identical_batches(world):
    w = world
    ref = loader(w, worker_count=0)
    par = loader(w, worker_count=2, prefetch=1)
    try:
        assert_tree_equal([next(par) for _ in range(4)], [next(ref) for _ in range(4)])
    finally:
        par.close()


def test_mesh_2x4_equals_one_device(world):
    w = world
    mesh8 = make_mesh(MeshConfig(data=2, fsdp=4))
    mesh1 = make_mesh(MeshConfig(data=1), devices=jax.devices()[:1])
    ld8, ld1 = loader(w, mesh=mesh8), loader(w, mesh=mesh1)
    assert ld8.rows == (0, B)
    g8, g1 = next(ld8), next(ld1)
    assert isinstance(g8["tokens"], jax.Array) and g8["tokens"].shape == (B, T)
    assert g8["tokens"].sharding.spec[0] == ("data", "fsdp")
    assert g8["teachers"][1]["ids"].shape == (B, T, 4) and len(g8["tokens"].sharding.device_set) == 8
    assert_tree_equal(g8, g1)
    assert_tree_equal(g8, ld8.local_batch(0))
    spec = ld8.element_spec()
    assert jax.tree.structure(spec) == jax.tree.structure(g8)
    assert all(s.shape == x.shape and s.dtype == x.dtype and s.sharding == x.sharding
               for s, x in zip(jax.tree.leaves(spec), jax.tree.leaves(g8)))


def test_two_simulated_processes(world):
    w = world
    full = loader(w)
    halves = [loader(w, process_index=p, process_count=2) for p in (0, 1)]
    assert [h.rows for h in halves] == [(0, B // 2), (B // 2, B)]
    for step in range(2):
        parts = [next(h) for h in halves]
        whole = next(full)
        joined = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
        assert_tree_equal(joined, whole)
    with pytest.raises(LoaderError, match="process_index 2 not in"):
        loader(w, process_index=2, process_count=2)


def test_errors_name_teacher_and_field(world, tmp_path):
    w = world
    wrong_tok = (TeacherConfig(cache=str(w.cache_sp), tokenizer=str(w.bpe_path), name="sp"),)
    with pytest.raises(LoaderError, match=r"teacher sp: tokenizer: the cache was captured with tokenizer fingerprint"):
        loader(w, teachers=wrong_tok)
    with pytest.raises(LoaderError, match=r"teacher bpe: k: the cache holds top-4 per position but the loader needs "
                                          r"k=5"):
        loader(w, k=5)
    no_eos = write_cache(tmp_path / "no_eos", w.store, w.sp, k=6, seed=3, append_eos=False)
    with pytest.raises(LoaderError, match=r"teacher x: append_eos: the cache was captured with append_eos=False"):
        loader(w, teachers=(TeacherConfig(cache=str(no_eos), tokenizer=str(w.sp_path), name="x"),))
    bad = write_cache(tmp_path / "bad_ids", w.store, w.sp, k=6, seed=4, bad_id_at=3)
    ld = loader(w, teachers=(TeacherConfig(cache=str(bad), tokenizer=str(w.sp_path), name="odd"),))
    g = next(g for g in range(ld.plan.blocks_per_epoch) if 3 in ld.plan.segments(g).doc)
    with pytest.raises(LoaderError, match=r"teacher odd: cache record 3 is document 'someone-else' but the document "
                                          r"store has 'doc-3'"):
        ld.builder(g)
    with pytest.raises(ValueError, match="teacher names must be unique"):
        loader(w, teachers=(w.teachers[0], w.teachers[0]))


def test_caches_of_a_prefix_and_config_from_dict(world, tmp_path, caplog):
    w = world
    short = write_cache(tmp_path / "short", w.store, w.sp, k=4, seed=5, num_docs=6)
    cfg = from_dict(LoaderConfig, {"teachers": [{"cache": str(short), "tokenizer": str(w.sp_path), "name": "s"}],
                                   "seq_len": T, "global_batch_size": B, "k": 4, "cache_dir": w.cache_dir})
    assert cfg.teachers[0].align == "bytes" and cfg.teachers[0].vocab_map == "prefix"
    ld = FusionLoader(cfg, w.store, w.target_path, progress=False)
    assert ld.num_docs == 6 and len(ld.plan.lengths) == 6
    assert "packing the first 6 of 10 documents" in caplog.text
    assert set(ld.local_batch(0)["doc_index"].ravel().tolist()) <= set(range(-1, 6))


def test_target_lengths_in_worker_processes(world, tmp_path):
    w = world
    seq = target_lengths(w.store, w.target, cache_dir=tmp_path / "a", progress=False)
    par = target_lengths(w.store, w.target, w.target_path, cache_dir=tmp_path / "b", workers=2, progress=False,
                         chunk=3)
    np.testing.assert_array_equal(seq, par)
    np.testing.assert_array_equal(seq, [len(w.target.encode(t).ids) for t in TEXTS])


_CHILD = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
args = json.loads(sys.argv[1])
jax.distributed.initialize(coordinator_address=args["coordinator"], num_processes=2, process_id=args["pid"])
import numpy as np
from jax.experimental import multihost_utils
from fusion_jax.config.loader import from_dict
from fusion_jax.data.loader import FusionLoader, LoaderConfig
from fusion_jax.mesh import MeshConfig, make_mesh
ld = FusionLoader(from_dict(LoaderConfig, args["cfg"]), args["docs"], args["target"],
                  mesh=make_mesh(MeshConfig(data=2, fsdp=4)), progress=False)
batch = next(ld)
full = multihost_utils.process_allgather(batch, tiled=True)
if args["pid"] == 0:
    np.savez(args["out"], rows=np.asarray(ld.rows), **{
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(full)})
print("rows", ld.rows)
'''


def test_two_real_processes_make_the_global_batch(world, tmp_path):
    """Two JAX processes (4 CPU devices each, gloo) on a 2×4 mesh: each loads its half, the global batch equals the
    single-process one."""
    import json
    import os
    import socket
    import subprocess
    import sys

    from fusion_jax.config.loader import to_dict

    w = world
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = []
    for pid in range(2):
        args = {"coordinator": f"127.0.0.1:{port}", "pid": pid, "cfg": to_dict(config(w)), "docs": str(w.root / "docs"),
                "target": str(w.target_path), "out": str(tmp_path / "out.npz")}
        procs.append(subprocess.Popen([sys.executable, str(script), json.dumps(args)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=180)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(logs)[-3000:]
    assert "rows (0, 4)" in logs[0] and "rows (4, 8)" in logs[1]
    got = np.load(tmp_path / "out.npz")
    ref = loader(w).local_batch(0)
    for path, x in jax.tree_util.tree_leaves_with_path(ref):
        np.testing.assert_array_equal(got[jax.tree_util.keystr(path)], x)


def test_ids_beyond_the_tokenizer_are_dropped_like_online():
    """A model with more embedding rows than tokenizer ids: captured top-k ids past the map are dropped (mass
    renormalised over the rest), not an error — the cached path does what online.padded_vocab_map does."""
    from fusion_jax.align.transfer import transfer_topk
    from fusion_jax.align.transfer import covering
    from fusion_jax.fusion.online import padded_vocab_map

    table = np.array([0, 1, 2, -1], np.int32)
    assert covering(table, np.array([[0, 3]])) is table
    np.testing.assert_array_equal(covering(table, np.array([[5, 1]])), padded_vocab_map(table, 6))
    ids = np.array([[5, 1], [2, 4]], np.int32)
    lp = np.log(np.array([[0.6, 0.4], [0.7, 0.3]], np.float32))
    end = np.array([1, 2], np.int32)
    rows = transfer_topk(end, end, np.array([1, 2], np.int32), ids, lp, covering(table, ids), k_out=2)
    np.testing.assert_array_equal(rows.ids[:, 0], [1, 2])
    np.testing.assert_allclose(rows.logprobs[:, 0], [0.0, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match="vocab sizes differ"):
        transfer_topk(end, end, np.array([1, 2], np.int32), ids, lp, table, k_out=2)


@pytest.mark.parametrize("vocab_align", ["hard", "soft"])
def test_fusellm_teacher_with_more_model_rows_than_tokenizer_ids(world, tmp_path, vocab_align):
    """An MPT-7B-like teacher (embedding 50,432 rows, tokenizer 50,277 ids) puts ids past its tokenizer in the captured
    top-k. The cached `fusellm` path drops them like unmapped candidates (the row's softmax renormalises over the
    rest), as the `bytes` path does, instead of failing with "top-k ids must lie in [0, V)"."""
    w = world
    V = w.bpe.vocab_size
    cache = write_cache(tmp_path / "mpt_like", w.store, w.bpe, k=6, seed=7, model_rows=V + 40)
    spec = TeacherConfig(cache=str(cache), tokenizer=str(w.bpe_path), name="mpt", align="fusellm",
                       vocab_align=vocab_align)
    ld = loader(w, teachers=(spec,))
    pair = FuseLLMPair(w.bpe, w.target, mined=vocab_map(w.bpe, w.target, "mined", w.cache_dir))
    beyond_rows = teacher_rows = 0
    for d in range(ld.num_docs):
        rec, doc = TeacherCache(cache)[d], ld.builder.document(d)
        ids, lp = rec.topk_ids[:, :4], rec.topk_logprobs[:, :4]
        beyond = ids >= V
        beyond_rows += int(beyond.any(axis=1).sum())
        # the reference: those candidates given as pads (−inf), which the transfer never keeps
        want = pair.transfer(rec.ids, doc.ids, np.where(beyond, 0, ids), np.where(beyond, -np.inf, lp), vocab_align)
        got = doc.teachers[0].rows
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.logprobs, want.logprobs)
        np.testing.assert_array_equal(got.kind, want.kind)
        assert (got.ids[np.isfinite(got.logprobs)] < w.target.vocab_size).all()
        teacher_rows += int((got.kind == ROW_TEACHER).sum())
    assert beyond_rows > 10 and teacher_rows > 10  # the case occurs, and real rows remain
    batch = ld.local_batch(0)
    assert batch["teachers"][0]["ids"].shape == (B, T, 4)
    with pytest.raises(ValueError, match=rf"top-k ids must lie in \[0, {V}\)"):  # the pair alone still refuses
        pair.transfer(rec.ids, doc.ids, rec.topk_ids, rec.topk_logprobs, vocab_align)


@pytest.mark.parametrize("extra", [{}, {"in_context": True, "tail": "next_token"}], ids=["plain", "in_context"])
def test_continuation_rows_in_the_batches(world, extra):
    """A bytes-mode teacher with ``continuation``: each block's rows are the direct transfer with the pair's
    continuation tables, and more positions get teacher rows than without."""
    from fusion_jax.align.continuation import continuation_tables

    w = world
    spec = TeacherConfig(cache=str(w.cache_bpe), tokenizer=str(w.bpe_path), name="bpe", continuation=True, **extra)
    with_, without = (loader(w, teachers=(spec if c else TeacherConfig(cache=spec.cache, tokenizer=spec.tokenizer,
                                                                        name="bpe"),)) for c in (True, False))
    cache, tables = TeacherCache(w.cache_bpe), continuation_tables(w.bpe, w.target)
    vmap = vocab_map(w.bpe, w.target, "prefix", w.cache_dir)
    counts = [0, 0]
    for step in range(2):
        got, plain = with_.local_batch(step)["teachers"][0], without.local_batch(step)["teachers"][0]
        counts[0] += int((got["kind"] == ROW_TEACHER).sum())
        counts[1] += int((plain["kind"] == ROW_TEACHER).sum())
        for r in range(B):
            segs = with_.plan.segments(step * B + r)
            for d, s, e, o in zip(segs.doc, segs.start, segs.end, segs.offset):
                text = w.store[d].text
                enc = w.target.encode(text)
                ids = np.append(enc.ids, w.target.eos_id).astype(np.int32)
                be = np.append(enc.byte_end, len(text.encode())).astype(np.int32)
                rec = cache[d]
                rows = transfer_topk(rec.byte_end, be, ids, rec.topk_ids, rec.topk_logprobs, vmap, "onehot_next", 4,
                                     continuation=tables, src_ids=rec.ids, src_next_logprob=-rec.token_ce, **extra)
                dst = slice(o, o + e - s)
                np.testing.assert_array_equal(got["ids"][r, dst], rows.ids[s:e])
                np.testing.assert_array_equal(got["logprobs"][r, dst], rows.logprobs[s:e])
                np.testing.assert_array_equal(got["kind"][r, dst], rows.kind[s:e])
    assert counts[0] > counts[1]


def test_tail_needs_in_context():
    from fusion_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="tail='next_token' needs in_context=true"):
        TeacherConfig(name="x", checkpoint="m", tail="next_token").validate()
    with pytest.raises(ConfigError, match="in_context needs align=bytes and mode=cached"):
        TeacherConfig(name="x", checkpoint="m", in_context=True, mode="online").validate()


def test_continuation_needs_cached_bytes_mode():
    from fusion_jax.errors import ConfigError

    with pytest.raises(ConfigError, match="continuation needs align=bytes and mode=cached"):
        TeacherConfig(name="x", checkpoint="m", continuation=True, align="fusellm").validate()
