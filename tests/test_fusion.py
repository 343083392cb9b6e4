"""fuse(): naive NumPy reference for every option, a torch re-statement of the official bf16 numerics, the FuseLLM
goldens bit for bit, and equality on 1 and 8 fake devices."""

from __future__ import annotations

import json
import math
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from fusion_jax import config_loader
from fusion_jax.align.transfer import ROW_EMPTY, ROW_ONEHOT, ROW_TEACHER
from fusion_jax.fusion import FusedTarget, FusionConfig, Teachers, fuse
from fusion_jax.mesh import MeshConfig, make_mesh

V = 14  # small vocabulary: ids collide across teachers
K, B, T = 3, 8, 6
KS = (4, 3, 5)  # per-teacher k (stacked to 5)

_fuse_jit = jax.jit(fuse, static_argnums=0)


# ----------------------------------------------------------------------------------------------- random teachers


def random_batch(seed: int, *, ks=KS, b=B, t=T, p_empty=0.2, p_onehot=0.15, base_full=False):
    """Loader-style teacher dicts (numpy) and labels; scores on a 0.25 grid (exact ties), some NaN bpb."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, V, (b, t)).astype(np.int32)
    teachers = []
    for j, k in enumerate(ks):
        ids = np.zeros((b, t, k), np.int32)
        lp = np.full((b, t, k), -np.inf, np.float32)
        kind = np.full((b, t), ROW_EMPTY, np.int8)
        for bi in range(b):
            for ti in range(t):
                u = rng.random()
                if base_full and j == 0:
                    u = 1.0
                if u < p_empty:
                    if rng.random() < 0.3:  # an EMPTY row with junk values must still count as empty
                        lp[bi, ti, 0] = 1.0
                    continue
                if u < p_empty + p_onehot:
                    ids[bi, ti, 0] = labels[bi, ti] if rng.random() < 0.7 else rng.integers(V)
                    lp[bi, ti, 0] = 0.0
                    kind[bi, ti] = ROW_ONEHOT
                    continue
                n = int(rng.integers(1, k + 1))
                row = rng.choice(V, n, replace=False)
                if rng.random() < 0.5 and labels[bi, ti] not in row:
                    row[rng.integers(n)] = labels[bi, ti]
                ids[bi, ti, :n] = row
                lp[bi, ti, :n] = np.sort(rng.normal(0, 2, n))[::-1] - 3.0
                kind[bi, ti] = ROW_TEACHER
        seq_ce = rng.integers(6, 12, b).astype(np.float32) * 0.25
        seq_bpb = rng.integers(2, 6, b).astype(np.float32) * 0.25
        seq_bpb[rng.random(b) < 0.15] = np.nan
        teachers.append(dict(ids=ids, logprobs=lp, kind=kind, seq_ce=seq_ce, seq_bpb=seq_bpb))
    return teachers, labels


# ----------------------------------------------------------------------------------------------- naive reference


def naive_fuse(cfg: FusionConfig, tea: Teachers, labels):
    """Loops over b, t, j in float64; returns per position {id: prob}, weights [B,T,K], has_target [B,T]."""
    ids, lp, kind = (np.asarray(a) for a in (tea.ids, tea.logprobs, tea.kind))
    seq = np.asarray(tea.seq_bpb if cfg.score == "bpb" else tea.seq_ce, np.float64)
    Kn, Bn, Tn, _ = ids.shape
    tw = np.ones(Kn) if not cfg.teacher_weights else np.asarray(cfg.teacher_weights, np.float64)
    first_teacher = cfg.empty_rows == "first_teacher"
    targets = [[None] * Tn for _ in range(Bn)]
    weights = np.zeros((Bn, Tn, Kn))
    has_target = np.zeros((Bn, Tn), bool)
    for b in range(Bn):
        for t in range(Tn):
            rows = []
            for j in range(Kn):
                fin = np.isfinite(lp[j, b, t])
                if kind[j, b, t] == ROW_EMPTY or not fin.any():
                    rows.append(None)
                    continue
                x = lp[j, b, t][fin].astype(np.float64) / cfg.teacher_temperature
                p = np.exp(x - x.max())
                p /= p.sum()
                row = defaultdict(float)
                for i, pp in zip(ids[j, b, t][fin], p):
                    row[int(i)] += pp
                rows.append(dict(row))
            scores = []
            for j in range(Kn):
                if cfg.granularity == "sequence":
                    s = seq[j, b]
                else:
                    pl = rows[j].get(int(labels[b, t]), 0.0) if rows[j] is not None else 0.0
                    s = -math.log(pl) if pl > 0 else math.inf
                scores.append(math.inf if math.isnan(s) else s)
            part = [j for j in range(Kn) if tw[j] > 0 and (rows[j] is not None or first_teacher)]
            slot = [rows[j] if rows[j] is not None else (rows[0] if first_teacher else None) for j in range(Kn)]
            lent = [rows[j] is None and first_teacher and rows[0] is not None for j in range(Kn)]
            w = np.zeros(Kn)
            if part:
                if cfg.method == "min_ce":
                    keys = {j: -scores[j] + math.log(tw[j]) for j in part}
                    best = max(keys.values())
                    win = part[0] if best == -math.inf else min(j for j in part if keys[j] == best)
                    w[win] = 1.0
                else:
                    ell = {j: (math.exp(-scores[j]) if cfg.avg_weights == "official" else -scores[j] / cfg.temperature)
                           for j in part}
                    top = max(ell.values())
                    for j in part:
                        w[j] = tw[j] * (1.0 if top == -math.inf else math.exp(ell[j] - top))
                    w /= w.sum()
            dropped = any(w[j] > 0 and slot[j] is None for j in range(Kn))
            for j in range(Kn):
                if slot[j] is None:
                    w[j] = 0.0
            if dropped and w.sum() > 0:
                w /= w.sum()
            target = defaultdict(float)
            for j in range(Kn):
                if w[j] > 0:
                    for i, pp in slot[j].items():
                        target[i] += w[j] * pp
            own = w.copy()
            for j in range(Kn):
                if lent[j]:
                    own[0] += own[j]
                    own[j] = 0.0
            targets[b][t] = dict(target)
            weights[b, t] = own
            has_target[b, t] = w.sum() > 0
    return targets, weights, has_target


def as_dicts(out: FusedTarget):
    ids, probs = np.asarray(out.ids), np.asarray(out.probs)
    res = []
    for b in range(ids.shape[0]):
        res.append([])
        for t in range(ids.shape[1]):
            sel = probs[b, t] > 0
            assert len(set(ids[b, t][sel].tolist())) == sel.sum(), "duplicate ids among fused entries"
            assert np.all(ids[b, t][~sel] == 0) and np.all(probs[b, t] >= 0)
            res[-1].append(dict(zip(ids[b, t][sel].tolist(), probs[b, t][sel].tolist())))
    return res


def check_against_naive(cfg, tea, labels, out, atol=2e-6):
    targets, weights, has = naive_fuse(cfg, tea, labels)
    np.testing.assert_array_equal(np.asarray(out.has_target), has)
    np.testing.assert_allclose(np.asarray(out.weights), weights, rtol=1e-5, atol=atol)
    got = as_dicts(out)
    for b in range(len(targets)):
        for t in range(len(targets[b])):
            exp = {i: p for i, p in targets[b][t].items() if p > 0}
            assert sorted(got[b][t]) == sorted(exp), (b, t, got[b][t], exp)
            for i, p in exp.items():
                assert abs(got[b][t][i] - p) <= atol + 1e-5 * p, (b, t, i, got[b][t][i], p)
            if has[b, t]:
                assert abs(sum(got[b][t].values()) - 1.0) < 1e-5
            else:
                assert not got[b][t]


CONFIGS = [
    FusionConfig(),  # min_ce, sequence, bpb, skip
    FusionConfig(score="ce"),
    FusionConfig(score="ce", empty_rows="first_teacher"),
    FusionConfig(granularity="token"),
    FusionConfig(granularity="token", empty_rows="first_teacher"),
    FusionConfig(score="ce", teacher_weights=(1.0, 2.0, 0.5)),
    FusionConfig(granularity="token", teacher_weights=(0.0, 1.0, 3.0), teacher_temperature=2.0),
    FusionConfig(method="avg_ce"),
    FusionConfig(method="avg_ce", score="ce", temperature=0.5, empty_rows="first_teacher"),
    FusionConfig(method="avg_ce", avg_weights="official", score="ce"),
    FusionConfig(method="avg_ce", avg_weights="official", score="ce", empty_rows="first_teacher"),
    FusionConfig(method="avg_ce", granularity="token", temperature=2.0),
    FusionConfig(method="avg_ce", granularity="token", avg_weights="official", empty_rows="first_teacher"),
    FusionConfig(method="avg_ce", teacher_weights=(2.0, 0.0, 1.0), teacher_temperature=0.7),
    FusionConfig(method="avg_ce", score="ce", teacher_weights=(1.0, 1.0, 4.0), empty_rows="first_teacher"),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: (
    f"{c.method}-{c.granularity}-{c.score}-{c.avg_weights}-{c.empty_rows}-w{len(c.teacher_weights)}"))
def test_fuse_matches_naive(cfg):
    cfg.validate()
    for seed in (0, 1):
        teachers, labels = random_batch(seed)
        tea = Teachers.stack(teachers)
        out = _fuse_jit(cfg, tea, jnp.asarray(labels))
        check_against_naive(cfg, tea, labels, out)
        if cfg.method == "min_ce":
            w = np.asarray(out.weights)
            assert set(np.unique(w)) <= {0.0, 1.0}
            np.testing.assert_array_equal(w.sum(-1), np.asarray(out.has_target))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31 - 1), which=st.sampled_from(range(len(CONFIGS))),
       p_empty=st.sampled_from([0.0, 0.3, 0.9]))
def test_fuse_matches_naive_hypothesis(seed, which, p_empty):
    cfg = CONFIGS[which]
    teachers, labels = random_batch(seed, p_empty=p_empty)
    tea = Teachers.stack(teachers)
    check_against_naive(cfg, tea, labels, _fuse_jit(cfg, tea, jnp.asarray(labels)))


def _approx(rows):
    return [[pytest.approx(r, rel=1e-6, abs=1e-7) for r in row] for row in rows]


def test_specific_semantics():
    """Hand-made positions: ties, +inf scores, label missing, skip vs first_teacher, teacher weight 0."""
    ninf = -np.inf
    ids = np.array([[[[3, 5]], [[5, 0]]],  # teacher 0: b0 row {3,5}; b1 row {5}
                    [[[5, 7]], [[0, 0]]]], np.int32)  # teacher 1: b0 row {5,7}; b1 empty
    lp = np.array([[[[0.0, 0.0]], [[0.0, ninf]]],
                   [[[0.0, np.log(3.0)]], [[ninf, ninf]]]], np.float32)
    kind = np.array([[[ROW_TEACHER], [ROW_ONEHOT]], [[ROW_TEACHER], [ROW_EMPTY]]], np.int8)
    ce = np.array([[2.0, 1.0], [2.0, 0.5]], np.float32)  # b0: tie → teacher 0; b1: teacher 1 better but empty
    tea = Teachers(ids, lp, kind, ce, ce)
    labels = np.array([[7], [5]], np.int32)
    out = _fuse_jit(FusionConfig(score="ce"), tea, labels)
    assert as_dicts(out) == _approx([[{3: 0.5, 5: 0.5}], [{5: 1.0}]])
    np.testing.assert_array_equal(np.asarray(out.weights)[:, 0], [[1, 0], [1, 0]])
    # first_teacher: b1 picks teacher 1 (lower CE), whose empty row is teacher 0's; the share counts for teacher 0
    out = _fuse_jit(FusionConfig(score="ce", empty_rows="first_teacher"), tea, labels)
    assert as_dicts(out)[1] == [{5: 1.0}]
    np.testing.assert_array_equal(np.asarray(out.weights)[1, 0], [1, 0])
    # token: b0 label 7 only in teacher 1 (CE = −log 3/4) → teacher 1; duplicate id 5 merged in avg_ce
    out = _fuse_jit(FusionConfig(granularity="token"), tea, labels)
    assert as_dicts(out)[0] == _approx([[{5: 0.25, 7: 0.75}]])[0]
    out = _fuse_jit(FusionConfig(method="avg_ce", score="ce", temperature=1e-3), tea, labels)
    got = as_dicts(out)[0][0]
    assert set(got) == {3, 5, 7} and abs(got[5] - 0.375) < 1e-6 and abs(got[3] - 0.25) < 1e-6
    # teacher weight 0 excludes teacher 0 everywhere: b1 then has no target under skip
    out = _fuse_jit(FusionConfig(score="ce", teacher_weights=(0.0, 1.0)), tea, labels)
    assert as_dicts(out) == _approx([[{5: 0.25, 7: 0.75}], [{}]])
    np.testing.assert_array_equal(np.asarray(out.has_target), [[True], [False]])
    # NaN bpb → +inf: the other teacher wins; all +inf → first teacher (min_ce) / uniform (avg_ce)
    bpb = np.array([[np.nan, np.nan], [1.0, np.nan]], np.float32)
    out = _fuse_jit(FusionConfig(), Teachers(ids, lp, kind, ce, bpb), labels)
    np.testing.assert_array_equal(np.asarray(out.weights)[:, 0], [[0, 1], [1, 0]])
    out = _fuse_jit(FusionConfig(method="avg_ce"), Teachers(ids, lp, kind, ce, np.full((2, 2), np.nan, np.float32)),
                    labels)
    np.testing.assert_allclose(np.asarray(out.weights)[:, 0], [[0.5, 0.5], [1.0, 0.0]])


def test_teachers_stack_and_config():
    teachers, _ = random_batch(3)
    tea = Teachers.stack(teachers)
    assert tea.ids.shape == (K, B, T, max(KS)) and isinstance(tea.ids, np.ndarray) and tea.num_teachers == K
    assert np.all(np.isneginf(tea.logprobs[1, ..., KS[1]:]))
    tj = Teachers.stack([{k: jnp.asarray(v) for k, v in t.items()} for t in teachers])
    assert isinstance(tj.ids, jax.Array)
    for a, b in zip(tea, tj):
        np.testing.assert_array_equal(np.asarray(b), a)
    no_kind = Teachers.stack([{k: v for k, v in t.items() if k not in ("kind", "seq_bpb")} for t in teachers])
    np.testing.assert_array_equal(no_kind.kind == ROW_EMPTY, ~np.isfinite(tea.logprobs).any(-1))
    assert np.isnan(no_kind.seq_bpb).all()
    with pytest.raises(ValueError, match="teacher_weights has 2 entries"):
        fuse(FusionConfig(teacher_weights=(1.0, 1.0)), tea)
    with pytest.raises(ValueError, match="needs labels"):
        fuse(FusionConfig(granularity="token"), tea)
    cfg = config_loader.from_dict(FusionConfig, {"method": "avg_ce", "teacher_weights": [1, 0.5, 2],
                                                 "empty_rows": "first_teacher", "compat_bf16": True})
    assert cfg.teacher_weights == (1.0, 0.5, 2.0) and cfg.compat_bf16
    for bad in ({"method": "max"}, {"temperature": 0.0}, {"teacher_weights": [0, 0]},
                {"teacher_weights": [-1.0]}, {"teacher_temperature": -2}):
        with pytest.raises(config_loader.ConfigError):
            config_loader.from_dict(FusionConfig, bad)
    assert all("help" in f.metadata for f in FusionConfig.__dataclass_fields__.values())


# ----------------------------------------------------------------------------------------------- 1 vs 8 devices


@pytest.mark.parametrize("cfg", [CONFIGS[0], CONFIGS[4], CONFIGS[10], CONFIGS[12],
                                 FusionConfig.official("avg_ce", teacher_temperature=0.5)],
                         ids=["min_seq", "min_tok_first", "avg_official_first", "avg_tok", "compat_avg"])
def test_fuse_sharded_equals_single_device(cfg):
    teachers, labels = random_batch(7)
    tea = Teachers.stack(teachers)
    one = jax.devices()[0]
    ref = _fuse_jit(cfg, jax.device_put(tea, one), jax.device_put(labels, one))
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    batch = ("data", "fsdp")
    shard = Teachers(*(NamedSharding(mesh, P(None, batch)) for _ in range(5)))
    tea8 = jax.device_put(tea, shard)
    lab8 = jax.device_put(labels, NamedSharding(mesh, P(batch)))
    out = _fuse_jit(cfg, tea8, lab8)
    assert len(out.probs.sharding.device_set) == 8
    np.testing.assert_array_equal(np.asarray(out.ids), np.asarray(ref.ids))
    np.testing.assert_array_equal(np.asarray(out.has_target), np.asarray(ref.has_target))
    # XLA may fuse differently per shard shape: float32 values agree to an ulp
    np.testing.assert_allclose(np.asarray(out.probs), np.asarray(ref.probs), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(np.asarray(out.weights), np.asarray(ref.weights), rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------------------------- official numerics


def torch_official(tea: Teachers, lengths, method: str, temperature: float = 1.0, vocab: int = V):
    """The official collator + compute_loss target, re-stated with torch on dense bf16 [B, L, V] rows: softmax of
    bf16 values / T in bf16, empty aligned rows ← the base row, rewards 1/exp(bf16(CE)), first argmax or
    softmax-weighted sum in bf16. Teacher 0 is the base (its rows exist for t < length)."""
    import torch

    ids, lp = np.asarray(tea.ids), np.asarray(tea.logprobs)
    Kn, Bn, Tn, _ = ids.shape
    dense = torch.zeros(Kn, Bn, Tn, vocab, dtype=torch.bfloat16)
    for b in range(Bn):
        for t in range(lengths[b]):
            for j in range(Kn):
                fin = np.isfinite(lp[j, b, t]) & (np.asarray(tea.kind)[j, b, t] != ROW_EMPTY)
                if not fin.any():
                    assert j > 0
                    dense[j, b, t] = dense[0, b, t]
                    continue
                x = torch.tensor(lp[j, b, t][fin].astype(np.float64).tolist(), dtype=torch.bfloat16) / temperature
                dense[j, b, t] = dense[j, b, t].scatter(-1, torch.tensor(ids[j, b, t][fin].astype(np.int64)),
                                                        torch.softmax(x, -1))
    rewards = 1 / torch.exp(torch.tensor(np.asarray(tea.seq_ce).T.tolist(), dtype=torch.bfloat16))  # [B, K]
    if method == "min_ce":
        sel = torch.argmax(rewards, dim=-1)
        target = torch.stack([dense[int(sel[b]), b] for b in range(Bn)])
        return target.float().numpy(), sel.numpy(), None
    w = torch.softmax(rewards, dim=1)
    target = w[:, 0, None, None] * dense[0]
    for j in range(1, Kn):
        target = target + w[:, j, None, None] * dense[j]
    return target.float().numpy(), None, w.float().numpy()


def densify(out: FusedTarget, vocab: int = V):
    ids, probs = np.asarray(out.ids), np.asarray(out.probs)
    dense = np.zeros(ids.shape[:2] + (vocab,), np.float32)
    np.put_along_axis(dense, ids, probs, axis=-1)  # ids unique where probs > 0; pads write 0 on id 0 first…
    for b, t in zip(*np.nonzero((probs > 0).any(-1))):
        dense[b, t, 0] = probs[b, t][(ids[b, t] == 0) & (probs[b, t] > 0)].sum()
    return dense


@pytest.mark.parametrize("method", ["min_ce", "avg_ce"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_compat_bf16_matches_torch_official(method, temperature):
    import torch  # noqa: F401

    teachers, _ = random_batch(11, p_empty=0.25, base_full=True)
    # bf16 ties: equal CEs, different fp16 CEs that round to the same bf16, and different bf16 CEs whose bf16
    # rewards are equal (the README's three tie kinds); the rest random
    ce = np.array([[2.25, 2.0078125, 1.7890625, 2.5, 1.5, 2.0, 3.0, 2.75],
                   [2.25, 2.0, 1.78125, 2.25, 1.75, 2.0, 2.9, 2.5],
                   [2.5, 2.0078125, 1.78125, 2.0, 1.5, 1.9, 2.9, 2.5]], np.float32)
    for j in range(K):
        teachers[j]["seq_ce"] = ce[j]
    lengths = [T, T - 1, T, 2, T, T - 3, T, 1]
    for t in teachers:  # padding: every teacher empty at t >= length
        for b, n in enumerate(lengths):
            t["kind"][b, n:] = ROW_EMPTY
            t["logprobs"][b, n:] = -np.inf
    tea = Teachers.stack(teachers)
    cfg = FusionConfig.official(method, teacher_temperature=temperature)
    out = _fuse_jit(cfg, tea, None)
    expected, sel, w = torch_official(tea, lengths, method, temperature)
    got = densify(out)
    valid = np.arange(T)[None, :] < np.asarray(lengths)[:, None]
    np.testing.assert_array_equal(np.asarray(out.has_target), valid)
    np.testing.assert_array_equal(got[valid], expected[valid])  # bit for bit
    weights = np.asarray(out.weights)
    own = np.asarray(tea.kind) != ROW_EMPTY  # [K,B,T]
    for b in range(B):
        for t in range(lengths[b]):
            if method == "min_ce":
                assert weights[b, t, sel[b]] == 1.0 or (not own[sel[b], b, t] and weights[b, t, 0] == 1.0)
            elif own[:, b, t].all():
                np.testing.assert_array_equal(weights[b, t], w[b])
    if method == "min_ce":
        assert list(sel[:3]) == [0, 0, 0]  # the three tie kinds go to the first teacher


# ----------------------------------------------------------------------------------------------- goldens


def golden_teachers(case: dict, T: int = 48) -> Teachers:
    feats = case["features_in"]

    def rows(lk, ik, ck):
        Bn, k = len(feats), 10
        ids = np.zeros((Bn, T, k), np.int32)
        lp = np.full((Bn, T, k), -np.inf, np.float32)
        kind = np.full((Bn, T), ROW_EMPTY, np.int8)
        for b, f in enumerate(feats):
            for t, (logits, idx) in enumerate(zip(f[lk], f[ik])):
                ids[b, t, :len(idx)] = idx
                lp[b, t, :len(idx)] = logits  # raw logits: the softmax over kept entries is shift-invariant
                kind[b, t] = ROW_TEACHER if idx else ROW_EMPTY
        return dict(ids=ids, logprobs=lp, kind=kind, seq_ce=np.array([f[ck] for f in feats], np.float32))

    return Teachers.stack([rows("per_step_logits", "per_step_indices", "metric_ce"),
                           rows("per_step_aligned_logits_0", "per_step_aligned_indices_0", "metric_ce_aligned_0")])


def load_golden_cases(shared_dir):
    path = shared_dir / "golden" / "fusellm" / "fusion_cases.jsonl"
    if not path.is_file():
        pytest.skip(f"{path} is absent")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_golden_fusion_targets(shared_dir):
    cases = load_golden_cases(shared_dir)
    names = {"MinCE": "min_ce", "AvgCE": "avg_ce"}
    for case in cases:
        tea = golden_teachers(case)
        if case["metric_override"]:  # the overrides are already in features_in
            for b, o in enumerate(case["metric_override"]):
                assert float(tea.seq_ce[0, b]) == o["metric_ce"] and float(tea.seq_ce[1, b]) == o["metric_ce_aligned_0"]
        n_empty = int((np.asarray(tea.kind)[1] == ROW_EMPTY).sum() - sum(48 - b["block_len"] for b in case["blocks"]))
        assert (n_empty > 0) == (case["case"] == "hard_em_blocks_with_empty_rows")
        for method, res in case["results"].items():
            out = _fuse_jit(FusionConfig.official(names[method]), tea, None)
            got = as_dicts(out)
            weights = np.asarray(out.weights)
            for b, blk in enumerate(case["blocks"]):
                L = blk["block_len"]
                assert np.asarray(out.has_target)[b].tolist() == [True] * L + [False] * (48 - L)
                for t in range(L):
                    g = res["target"][b][t]
                    assert sorted(got[b][t]) == g["ids"], (case["case"], method, b, t)
                    # bit for bit: the official dense bf16 target, incl. AvgCE's bf16 sums of duplicate ids
                    assert [got[b][t][i] for i in g["ids"]] == g["probs"], (case["case"], method, b, t)
                own = np.asarray(tea.kind)[:, b, :L] != ROW_EMPTY
                if method == "MinCE":
                    sel = res["selected_candidate"][b]
                    at = own[sel]
                    assert np.all(weights[b, :L][at, sel] == 1.0)
                    assert np.all(weights[b, :L][~at, 0] == 1.0)  # an empty aligned row is the base row
                else:
                    both = own.all(0)
                    want = np.tile(res["weights_bf16"][b], (both.sum(), 1))
                    np.testing.assert_array_equal(weights[b, :L][both], want)
