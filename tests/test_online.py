"""Online teachers: the jnp merge equals the host one; the rows the step builds online equal the cached path's
(capture + loader transfer) wherever the contexts are the same; a 2-step run with one online and one cached teacher;
the errors and the source-block overflow counter."""

from __future__ import annotations

import dataclasses
import json
import types

import jax
import numpy as np
import pytest

from fusion_jax.data import capture
from fusion_jax.fusion import online
from fusion_jax.experiments import run as experiment
from fusion_jax.config import schema
from fusion_jax import pipeline
from fusion_jax.align.transfer import ROW_EMPTY, ROW_ONEHOT, ROW_TEACHER, merge_rows
from fusion_jax.data.capture import CaptureConfig
from fusion_jax.convert import checkpoint
from fusion_jax.data.corpus import Document
from fusion_jax.data.documents import DocumentStore, write_documents
from fusion_jax.data.loader import FusionLoader, LoaderConfig, TeacherConfig
from fusion_jax.mesh import MeshConfig
from fusion_jax.models import decoder
from fusion_jax.config.model import ModelConfig
from fusion_jax.tokenizers import load_tokenizer
from test_train import assets, config as train_config  # noqa: F401  (the module fixture of the train tests)
from tiny_tokenizers import train_byte_level, train_sentencepiece

T, B, K = 16, 8, 4
TEXTS = [
    "the quick brown fox jumps over the lazy dog, and the dog sleeps",
    "hello world, hello there; the world is big",
    "café naïve résumé — déjà vu",
    "numbers 0123456789 and tabs\tand newlines\n\nend",
    "fusion of large language models by knowledge distillation",
    "x",
    "the world is big and the fox is quick",
    "knowledge distillation by many teachers at once, sparse and fast",
    "hello there, the quick fox",
    "tabs\tand more tabs and the lazy dog",
]
TOL = 2 / 64 + 2e-3  # cache quantization: ≤ 1/64 nat per entry, the renormalisation can add as much again


# ------------------------------------------------------------------------------------------------ 1. merge


@pytest.mark.parametrize("k_out", [3, 6, 9])
def test_jnp_merge_equals_merge_rows(k_out):
    rng = np.random.default_rng(0)
    r, k = 400, 6
    ids = rng.integers(-1, 5, size=(r, k))  # many duplicates and drops
    probs = rng.random((r, k)) * (rng.random((r, k)) > 0.15)  # some zero-mass entries
    probs[:5] = 0.0  # rows with no mass at all
    want_ids, want_lp = merge_rows(ids, probs, k_out)
    got_ids, got_lp = jax.jit(online.merge_rows, static_argnums=2)(ids, probs.astype(np.float32), k_out)
    got_ids, got_lp = np.asarray(got_ids), np.asarray(got_lp)
    assert got_ids.shape == (r, k_out) and got_lp.shape == (r, k_out)
    np.testing.assert_array_equal(np.isfinite(got_lp), np.isfinite(want_lp))
    np.testing.assert_array_equal(got_ids, want_ids)
    fin = np.isfinite(want_lp)
    np.testing.assert_allclose(got_lp[fin], want_lp[fin], rtol=1e-5, atol=1e-6)
    # a leading [B, T] shape works the same
    got2, _ = online.merge_rows(ids.reshape(20, 20, k), probs.reshape(20, 20, k), k_out)
    np.testing.assert_array_equal(np.asarray(got2).reshape(r, k_out), want_ids)


# ------------------------------------------------------------------------------------------------ 2. equivalence


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    w = types.SimpleNamespace(root=root)
    w.target_path = train_sentencepiece(root / "target")
    src_dir = root / "src"
    src_dir.mkdir()
    train_byte_level(src_dir / "tokenizer.json")
    w.src_dir = src_dir
    w.src = load_tokenizer(src_dir)
    docs = [Document(f"d{i}", t, "prose") for i, t in enumerate(TEXTS)]
    write_documents(root / "docs", docs, docs[:2])
    w.store = DocumentStore(root / "docs", "train")
    w.model_cfg = ModelConfig(vocab_size=w.src.vocab_size, hidden_size=32, intermediate_size=64, num_layers=2,
                              num_heads=4, num_kv_heads=2, compute_dtype="float32")
    w.params = decoder.init_params(w.model_cfg, jax.random.key(3), std=0.5)
    checkpoint.save(root / "model", w.model_cfg, w.params, model_type="llama", tokenizer_dir=src_dir)
    capture.main(CaptureConfig(documents=str(root / "docs"), split="train", source=str(root / "model"),
                               output=str(root / "cache"), k=K, seq_len=64, batch_size=8, docs_per_shard=4,
                               logits_chunk=16, param_dtype="float32", compute_dtype="float32",
                               mesh=MeshConfig(data=2, fsdp=4)))
    w.cache_dir = str(root / "fj_cache")
    return w


def _loader(w, spec: TeacherConfig, **kw) -> FusionLoader:
    cfg = LoaderConfig(teachers=(spec,), seq_len=T, global_batch_size=B, k=K, cache_dir=w.cache_dir, **kw)
    return FusionLoader(cfg, w.store, w.target_path, progress=False)


def _teacher(**kw) -> TeacherConfig:
    """The TeacherConfig of the online teacher a step test builds by hand."""
    return TeacherConfig(name="src", mode="online", **kw)


def _online_spec(w, **kw) -> TeacherConfig:
    return TeacherConfig(cache="", tokenizer=str(w.src_dir), name="src", mode="online", **kw)


def _rows_fn(w, teacher: online.OnlineTeacher):
    vmap = online.padded_vocab_map(_loader(w, _online_spec(w)).vocab_maps()["src"], w.model_cfg.vocab_size)
    fn = jax.jit(lambda p, inputs: online.online_rows(teacher, p, vmap, inputs))
    return lambda t: jax.device_get(fn(w.params, {key: t[key] for key in online.ONLINE_INPUTS}))


def _fresh_pieces(loader: FusionLoader, step: int) -> np.ndarray:
    """bool[B, T]: positions of document pieces that start at their document's start (same context both ways)."""
    out = np.zeros((B, T), bool)
    for r in range(B):
        segs = loader.plan.segments(step * B + r)
        for s, e, o in zip(segs.start, segs.end, segs.offset):
            if s == 0:
                out[r, o:o + e - s] = True
    return out


def test_online_rows_equal_the_cached_path(world):
    w = world
    cached = _loader(w, TeacherConfig(cache=str(w.root / "cache"), tokenizer=str(w.src_dir), name="src"))
    live = _loader(w, _online_spec(w, seq_len=64))
    assert live.plan.fingerprint == cached.plan.fingerprint
    rows = _rows_fn(w, online.OnlineTeacher(_teacher(), model=w.model_cfg, k=K, topk=K, logits_chunk=16))
    steps = -(-cached.plan.blocks_per_epoch // B)
    compared = teacher_rows = near_ties = 0
    for step in range(steps):
        want = cached.local_batch(step)["teachers"][0]
        batch = live.local_batch(step)
        t = batch["teachers"][0]
        assert set(t) == set(online.ONLINE_INPUTS) | {"src_overflow", "src_positions"}
        assert (t["src_overflow"] == 0).all()
        np.testing.assert_array_equal(t["src_positions"], np.asarray(decoder.segment_positions(t["src_segment_ids"]))
                                      * (t["src_segment_ids"] > 0))
        got = rows(t)
        fresh = _fresh_pieces(live, step)
        assert fresh.any()
        np.testing.assert_array_equal(got["kind"][fresh], want["kind"][fresh])
        compared += int(fresh.sum())
        for b, p in zip(*np.nonzero(fresh & (want["kind"] == ROW_TEACHER))):
            teacher_rows += 1
            g = {int(i): float(v) for i, v in zip(got["ids"][b, p], got["logprobs"][b, p]) if np.isfinite(v)}
            c = {int(i): float(v) for i, v in zip(want["ids"][b, p], want["logprobs"][b, p]) if np.isfinite(v)}
            for i in g.keys() & c.keys():
                assert abs(g[i] - c[i]) <= TOL, (step, b, p, g, c)
            if g.keys() != c.keys():  # near-ties at the k-th entry reordered by the quantization
                near_ties += 1
                floor = min(min(g.values()), min(c.values()))
                for i in g.keys() ^ c.keys():
                    assert (g.get(i) if i in g else c[i]) <= floor + TOL, (step, b, p, g, c)
        onehot = fresh & (want["kind"] == ROW_ONEHOT)
        np.testing.assert_array_equal(got["ids"][onehot][:, 0], want["ids"][onehot][:, 0])
        # outside the fresh pieces the contexts differ a little (a piece starting mid-document), the kinds hardly
        assert (got["kind"] == want["kind"]).mean() > 0.9
        # the sequence scores: a proper mean CE and bits per byte of the teacher on the block's text
        assert np.isfinite(got["seq_ce"]).all() and (got["seq_ce"] > 0).all()
        assert np.isfinite(got["seq_bpb"]).all() and (got["seq_bpb"] > 0).all()
    assert compared > 100 and teacher_rows > 50 and near_ties <= 0.05 * teacher_rows


def test_micro_batched_teachers_equal_one_pass(world):
    w = world
    live = _loader(w, _online_spec(w))
    teacher = online.OnlineTeacher(_teacher(fallback="mask"), model=w.model_cfg, k=K, topk=6)
    vmap = online.padded_vocab_map(live.vocab_maps()["src"], w.model_cfg.vocab_size)
    frozen = ({"params": w.params, "vocab_map": vmap},)
    batch = live.local_batch(1)
    one = jax.jit(lambda b, f: online.stack_teachers(b, (teacher,), f))(batch["teachers"], frozen)
    four = jax.jit(lambda b, f: online.stack_teachers(b, (teacher,), f, accumulation=4))(batch["teachers"], frozen)
    for a, b in zip(jax.device_get(one), jax.device_get(four)):
        np.testing.assert_allclose(np.asarray(a, np.float64), np.asarray(b, np.float64), rtol=1e-5, atol=1e-5)
    # fallback=mask: no one-hot rows; every row with mass is a teacher row
    kind = np.asarray(one.kind)
    assert not (kind == ROW_ONEHOT).any() and (kind == ROW_TEACHER).any()


# ------------------------------------------------------------------------------------------------ 3. experiment.main


def test_train_with_one_online_and_one_cached_teacher(assets, tmp_path):  # noqa: F811
    run = tmp_path / "run"
    cfg = train_config(assets, run, sources=(schema.TeacherConfig(name="src", checkpoint=str(assets / "source"),
                                                                mode="online"),),
                       optimizer=schema.OptimizerConfig(learning_rate=1e-2, warmup_ratio=0.0, accumulation=2),
                       train=schema.LoopConfig(steps=2, checkpoint_every=2, log_every=1, eval_batches=1,
                                              progress=False, export=False))
    report = experiment.main(cfg)
    assert (run / "cache" / "target" / "train" / "manifest.json").exists()
    assert not (run / "cache" / "src").exists()  # an online teacher is never captured
    tr, ev = report["train"], report["eval"]
    assert np.isfinite([tr["loss"], tr["clm"], tr["fusion"], ev["clm"], ev["fusion"]]).all()
    assert set(tr["win_rate"]) == set(ev["win_rate"]) == {"target", "src"}
    assert tr["src_overflow"] == {"src": 0}
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines if x["kind"] == "train"] == [1, 2]
    dry = experiment.main(dataclasses.replace(cfg, run_dir=str(tmp_path / "dry"), dry_run=True))
    assert dry["bytes_per_device"]["online/src"] > 0


# ------------------------------------------------------------------------------------------------ 4. errors, overflow


def test_online_needs_bytes_alignment(assets, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="align=bytes only.*cached path"):
        train_config(assets, tmp_path, sources=(schema.TeacherConfig(name="src", checkpoint="x", mode="online",
                                                                   align="fusellm"),)).validate()
    with pytest.raises(ValueError, match="mode must be one of"):
        train_config(assets, tmp_path, sources=(schema.TeacherConfig(name="src", checkpoint="x", mode="live"),)
                     ).validate()
    with pytest.raises(ValueError, match="align=bytes only.*cached path"):  # one check, for the loader's teachers too
        TeacherConfig(cache="", tokenizer="t", name="s", mode="online", align="fusellm").validate()
    with pytest.raises(ValueError, match="cache is required unless online"):
        schema.LoaderConfig(teachers=(TeacherConfig(cache="", tokenizer="t", name="s"),)).validate()


def test_a_short_source_block_is_counted_not_fatal(world):
    w = world
    short = _loader(w, _online_spec(w, seq_len=8))
    full = _loader(w, _online_spec(w, seq_len=64))
    rows = _rows_fn(w, online.OnlineTeacher(_teacher(), model=w.model_cfg, k=K))
    batch, ref = short.local_batch(0)["teachers"][0], full.local_batch(0)["teachers"][0]
    assert batch["src_tokens"].shape == (B, 8) and batch["gather"].shape == (B, T)
    assert (batch["src_overflow"] > 0).any() and (ref["src_overflow"] == 0).all()
    assert batch["gather"].max() < 8
    np.testing.assert_array_equal(batch["src_overflow"], np.maximum((ref["src_segment_ids"] > 0).sum(1) - 8, 0))
    got = rows(batch)
    lost = (ref["gather"] >= 0) & (batch["gather"] < 0)
    assert lost.any() and not (got["kind"][lost] == ROW_TEACHER).any()  # fallback where the source did not fit
    assert ((got["kind"] == ROW_ONEHOT) | (got["kind"] == ROW_EMPTY) | (got["kind"] == ROW_TEACHER)).all()
    spec = short.element_spec()["teachers"][0]
    assert spec["src_tokens"].shape == (B, 8) and spec["src_overflow"].shape == (B,)


def test_the_target_teacher_can_run_online(assets, tmp_path):  # noqa: F811
    cfg = train_config(assets, tmp_path, target_teacher_mode="online")
    cfg.validate()
    specs = pipeline.loader_config(cfg, pipeline.teacher_list(cfg), "train").teachers
    assert [s.online for s in specs] == [True, False] and specs[0].vocab_map == "identity" and specs[0].cache == ""
    with pytest.raises(ValueError, match="target_teacher_mode"):
        train_config(assets, tmp_path, target_teacher_mode="live").validate()
