"""sparse_losses(): naive dense reference, chunked vs unchunked (values, gradients, no [B,T,V] buffer), λ schedules,
1 vs 8 devices, and the FuseLLM goldens (official losses from fixed student logits)."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fusion_jax.config import loader as config_loader
from fusion_jax.fusion import FusedTarget, FusionConfig, LossConfig, fuse, lm_weight, make_fusion_mask, sparse_losses
from fusion_jax.fusion import block_means, total_loss
from fusion_jax.mesh import MeshConfig, make_mesh

B, T, D, V, E = 4, 12, 8, 40, 6


def random_problem(seed: int, b=B, t=T, d=D, v=V, e=E):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(0, 1, (b, t, d)).astype(np.float32)
    w = rng.normal(0, 1, (d, v)).astype(np.float32)
    labels = rng.integers(0, v, (b, t)).astype(np.int32)
    segment_ids = np.ones((b, t), np.int32)
    segment_ids[1, t // 2:] = 2
    if b > 2:
        segment_ids[2, t - 3:] = 0  # padding
    if b > 3:
        segment_ids[3, :] = 0  # an all-padding block (excluded from the blocks mean)
    loss_mask = (segment_ids != 0) & (np.roll(segment_ids, -1, 1) == segment_ids)
    loss_mask[:, -1] = False
    ids = np.zeros((b, t, e), np.int32)
    probs = np.zeros((b, t, e), np.float32)
    for bi in range(b):
        for ti in range(t):
            n = int(rng.integers(1, e + 1))
            ids[bi, ti, :n] = rng.choice(v, n, replace=False)
            p = rng.dirichlet(np.ones(n))
            probs[bi, ti, :n] = p
    has_target = rng.random((b, t)) > 0.15
    probs[~has_target] = 0.0
    ids[~has_target] = 0
    target = FusedTarget(ids, probs, np.zeros((b, t, 2), np.float32), has_target)
    return hidden, w, labels, loss_mask, segment_ids, target


def naive_losses(cfg: LossConfig, logits, labels, clm_mask, target, fusion_mask):
    """Dense float64: −log softmax at the label; −Σ_v P_v log q_v (KL: Σ P log P/q) over a dense target."""
    z = np.asarray(logits, np.float64)
    logq = z - np.log(np.exp(z - z.max(-1, keepdims=True)).sum(-1, keepdims=True)) - z.max(-1, keepdims=True)
    b, t, v = z.shape
    clm = np.zeros((b, t))
    fus = np.zeros((b, t))
    fmask = np.asarray(fusion_mask) & np.asarray(target.has_target)
    for bi in range(b):
        for ti in range(t):
            clm[bi, ti] = -logq[bi, ti, labels[bi, ti]] if clm_mask[bi, ti] else 0.0
            if fmask[bi, ti]:
                dense = np.zeros(v)
                np.add.at(dense, np.asarray(target.ids)[bi, ti], np.asarray(target.probs, np.float64)[bi, ti])
                nz = dense > 0
                fus[bi, ti] = -(dense * logq[bi, ti]).sum()
                if cfg.fusion_loss == "kl":
                    fus[bi, ti] += (dense[nz] * np.log(dense[nz])).sum()

    def reduce(x, m):
        if cfg.reduction == "tokens":
            return x.sum() / max(m.sum(), 1)
        means = [x[i].sum() / m[i].sum() for i in range(b) if m[i].sum() > 0]
        return float(np.mean(means)) if means else 0.0

    return dict(clm=reduce(clm, clm_mask), fusion=reduce(fus, fmask), clm_per_token=clm, fusion_per_token=fus,
                clm_tokens=clm_mask.sum(), fusion_tokens=fmask.sum())


def _losses_fn(cfg):
    def fn(hidden, w, labels, clm_mask, target, fusion_mask):
        return sparse_losses(lambda h: h @ w, hidden, labels, clm_mask, target, fusion_mask, cfg)

    return jax.jit(fn)


@pytest.mark.parametrize("fusion_loss", ["ce", "kl"])
@pytest.mark.parametrize("fusion_mask", ["next_label", "attention"])
@pytest.mark.parametrize("reduction", ["tokens", "blocks"])
def test_losses_match_naive(fusion_loss, fusion_mask, reduction):
    cfg = LossConfig(fusion_loss=fusion_loss, fusion_mask=fusion_mask, reduction=reduction)
    cfg.validate()
    hidden, w, labels, loss_mask, seg, target = random_problem(0)
    fmask = make_fusion_mask(cfg, loss_mask, seg)
    got = _losses_fn(cfg)(hidden, w, labels, loss_mask, target, fmask)
    exp = naive_losses(cfg, hidden @ w, labels, loss_mask, target, np.asarray(fmask))
    for key in ("clm", "fusion", "clm_tokens", "fusion_tokens"):
        np.testing.assert_allclose(float(got[key]), exp[key], rtol=2e-6, err_msg=key)
    for key in ("clm_per_token", "fusion_per_token"):
        np.testing.assert_allclose(np.asarray(got[key]), exp[key], rtol=2e-5, atol=2e-5, err_msg=key)
    np.testing.assert_allclose(np.asarray(got["clm_block_sum"]), exp["clm_per_token"].sum(1), rtol=1e-5, atol=1e-5)
    assert float(got["fusion_tokens"]) == np.asarray(got["fusion_block_tokens"]).sum()
    total = total_loss(LossConfig(lm_weight=0.9), got)
    np.testing.assert_allclose(float(total), 0.9 * exp["clm"] + 0.1 * exp["fusion"], rtol=2e-6)


@pytest.mark.parametrize("fusion_mask", ["next_label", "attention"])
def test_blocks_reduction_combines_over_micro_batches(fusion_mask):
    """``blocks`` over micro-batches (as the train step accumulates): each micro-batch's Σ block_means divided by
    the *whole* batch's count of non-empty blocks sums to the full batch's value. Rows 1 and 3 hold the padding: the
    second micro-batch has fewer non-empty blocks, so its own mean scaled by its share of the rows would not."""
    cfg = LossConfig(reduction="blocks", fusion_mask=fusion_mask)
    hidden, w, labels, loss_mask, seg, target = random_problem(4)
    fmask = np.asarray(make_fusion_mask(cfg, loss_mask, seg)) & target.has_target
    full = _losses_fn(cfg)(hidden, w, labels, loss_mask, target, fmask)
    n_clm, n_fus = loss_mask.any(1).sum(), fmask.any(1).sum()
    clm = fus = own_means = 0.0
    for rows in ([0, 2], [1, 3]):
        part = _losses_fn(cfg)(hidden[rows], w, labels[rows], loss_mask[rows],
                               FusedTarget(*(np.asarray(a)[rows] for a in target)), fmask[rows])
        clm += float(jnp.sum(block_means(part["clm_block_sum"], part["clm_block_tokens"]))) / n_clm
        fus += float(jnp.sum(block_means(part["fusion_block_sum"], part["fusion_block_tokens"]))) / n_fus
        own_means += float(part["clm"]) * len(rows) / B
    np.testing.assert_allclose([clm, fus], [float(full["clm"]), float(full["fusion"])], rtol=2e-6)
    assert abs(own_means - float(full["clm"])) > 1e-3  # the per-micro-batch mean is not the batch's


def test_fusion_mask_and_config():
    loss_mask = np.array([[True, True, False, False]])
    seg = np.array([[1, 1, 1, 0]])
    assert make_fusion_mask(LossConfig(), loss_mask, seg).tolist() == [[True, True, False, False]]
    assert make_fusion_mask(LossConfig(fusion_mask="attention"), loss_mask, seg).tolist() == [[True, True, True, False]]
    cfg = config_loader.from_dict(LossConfig, {"lm_weight_schedule": "hard_and_decay", "chunk_size": 256})
    assert cfg.chunk_size == 256 and cfg.lm_weight == 0.9
    for bad in ({"lm_weight": 1.5}, {"chunk_size": -1}, {"reduction": "mean"}, {"fusion_loss": "js"}):
        with pytest.raises(config_loader.ConfigError):
            config_loader.from_dict(LossConfig, bad)
    assert all("help" in f.metadata for f in dataclasses.fields(LossConfig))


def test_lm_weight_schedules():
    const = LossConfig(lm_weight=0.9)
    assert float(lm_weight(const, 50, 100)) == pytest.approx(0.9)
    decay = LossConfig(lm_weight=0.9, lm_weight_schedule="hard_and_decay")
    for step, want in ((0, 0.9), (25, 0.925), (100, 1.0), (250, 1.0)):
        assert float(lm_weight(decay, step, 100)) == pytest.approx(want, rel=1e-6)
    jitted = jax.jit(lambda s: lm_weight(decay, s, 100))
    assert float(jitted(jnp.int32(50))) == pytest.approx(0.95, rel=1e-6)
    losses = {"clm": jnp.float32(2.0), "fusion": jnp.float32(4.0)}
    assert float(total_loss(decay, losses, 50, 100)) == pytest.approx(0.95 * 2 + 0.05 * 4, rel=1e-6)
    assert float(total_loss(LossConfig(lm_weight=1.0), losses)) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="max_steps"):
        lm_weight(decay, 1, 0)


@pytest.mark.parametrize("fusion_loss,reduction,chunks", [("ce", "tokens", (1, 4, 5)), ("kl", "blocks", (7, 100))])
def test_chunked_equals_unchunked(fusion_loss, reduction, chunks):
    hidden, w, labels, loss_mask, seg, target = random_problem(1)
    fmask = make_fusion_mask(LossConfig(fusion_mask="attention"), loss_mask, seg)
    base = LossConfig(fusion_loss=fusion_loss, reduction=reduction, lm_weight=0.7)

    def make(cfg):
        def loss(hidden, w):
            out = sparse_losses(lambda h: h @ w, hidden, labels, loss_mask, target, fmask, cfg)
            return total_loss(cfg, out), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))

    (ref_total, ref_out), ref_grads = make(base)(hidden, w)
    for chunk in chunks:  # 5 and 7 do not divide T = 12; 100 > T is one chunk
        (tot, out), grads = make(dataclasses.replace(base, chunk_size=chunk))(hidden, w)
        np.testing.assert_allclose(float(tot), float(ref_total), rtol=1e-6)
        for key in ("clm", "fusion", "clm_tokens", "fusion_tokens"):
            np.testing.assert_allclose(float(out[key]), float(ref_out[key]), rtol=1e-6, err_msg=f"{chunk} {key}")
        for key in ("clm_per_token", "fusion_per_token"):
            np.testing.assert_allclose(np.asarray(out[key]), np.asarray(ref_out[key]), rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7, err_msg=f"chunk {chunk}")


def test_chunked_never_holds_full_logits():
    """The compiled forward+backward holds [B, C, V] logits only (no f32[B, T, V] buffer anywhere)."""
    b, t, d, v, c = 2, 64, 8, 1024, 16
    hidden, w, labels, loss_mask, seg, target = random_problem(2, b=b, t=t, d=d, v=v, e=4)

    def hlo(chunk):
        cfg = LossConfig(chunk_size=chunk)

        def loss(hidden, w):
            out = sparse_losses(lambda h: h @ w, hidden, labels, loss_mask, target, loss_mask, cfg)
            return total_loss(cfg, out)

        return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(hidden, w).compile().as_text()

    assert f"f32[{b},{t},{v}]" in hlo(0)
    text = hlo(c)
    assert f"f32[{b},{t},{v}]" not in text and f"[{b},{c},{v}]" in text


def test_losses_sharded_equal_single_device():
    hidden, w, labels, loss_mask, seg, target = random_problem(3, b=8)
    cfg = LossConfig(fusion_mask="attention", chunk_size=5, fusion_loss="kl")
    fmask = np.asarray(make_fusion_mask(cfg, loss_mask, seg))

    def loss(hidden, w, labels, loss_mask, target, fmask):
        out = sparse_losses(lambda h: h @ w, hidden, labels, loss_mask, target, fmask, cfg)
        return total_loss(cfg, out), out

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))
    args = (hidden, w, labels, loss_mask, target, fmask)
    one = jax.devices()[0]
    (ref_tot, ref_out), ref_g = step(*jax.device_put(args, one))
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    bs = NamedSharding(mesh, P(("data", "fsdp")))
    shard = (bs, NamedSharding(mesh, P("fsdp", None)), bs, bs, FusedTarget(bs, bs, bs, bs), bs)
    (tot, out), g = step(*jax.device_put(args, shard))
    assert len(g[0].sharding.device_set) == 8
    np.testing.assert_allclose(float(tot), float(ref_tot), rtol=1e-6)
    for key in ("clm", "fusion"):
        np.testing.assert_allclose(float(out[key]), float(ref_out[key]), rtol=1e-6)
    for a, r in zip(g, ref_g):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------------------------- goldens


def _golden(shared_dir):
    root = shared_dir / "golden" / "fusellm"
    if not (root / "fusion_cases.jsonl").is_file() or not (root / "fusion_student_logits.npz").is_file():
        pytest.skip(f"FuseLLM fusion goldens absent under {root}")
    cases = [json.loads(line) for line in (root / "fusion_cases.jsonl").read_text().splitlines() if line.strip()]
    with np.load(root / "fusion_student_logits.npz") as z:
        logits = z["student_logits"]
    return cases, logits


def _golden_target(res_target, t=48, width=20) -> FusedTarget:  # width K·k, as fuse() gives
    b = len(res_target)
    ids = np.zeros((b, t, width), np.int32)
    probs = np.zeros((b, t, width), np.float32)
    for bi, row in enumerate(res_target):
        for ti, entry in enumerate(row):
            n = len(entry["ids"])
            ids[bi, ti, :n] = entry["ids"]
            probs[bi, ti, :n] = entry["probs"]
    return FusedTarget(ids, probs, np.zeros((b, t, 2), np.float32), np.ones((b, t), bool))


def test_golden_losses(shared_dir):
    """Official losses from the fixed student logits: with the official targets and with fuse()'s own targets."""
    from test_fusion import golden_teachers

    cases, logits = _golden(shared_dir)
    logits = jnp.asarray(logits)
    cfg = LossConfig(lm_weight=0.9, fusion_mask="attention", reduction="tokens")  # one mean over the B = 3 batch
    names = {"MinCE": "min_ce", "AvgCE": "avg_ce"}
    worst = {"abs": 0.0, "rel": 0.0, "per_position_abs": 0.0}
    run = {chunk: jax.jit(lambda logits, target, labels, clm_mask, fmask, c=dataclasses.replace(cfg, chunk_size=chunk):
                          sparse_losses(lambda h: h, logits, labels, clm_mask, target, fmask, c))
           for chunk in (0, 20)}  # 20 does not divide T = 48
    for case in cases:
        col = case["collated"]
        attention = np.asarray(col["attention_mask"], np.int32)
        official_labels = np.asarray(col["labels"])
        labels = np.zeros_like(official_labels, dtype=np.int32)
        labels[:, :-1] = np.where(official_labels[:, 1:] == -100, 0, official_labels[:, 1:])  # HF's shift
        clm_mask = np.zeros(labels.shape, bool)
        clm_mask[:, :-1] = official_labels[:, 1:] != -100
        fmask = make_fusion_mask(cfg, clm_mask, attention)
        teachers = golden_teachers(case)
        for method, res in case["results"].items():
            ours = jax.jit(fuse, static_argnums=0)(FusionConfig.official(names[method]), teachers)
            for target in (_golden_target(res["target"]), ours):
                for chunk in (0, 20):
                    out = run[chunk](logits, target, labels, clm_mask, fmask)
                    got = {"clm": out["clm"], "fusion": out["fusion"], "total": total_loss(cfg, out)}
                    for key, value in got.items():
                        want = res["losses"][key]
                        err = abs(float(value) - want)
                        worst["abs"] = max(worst["abs"], err)
                        worst["rel"] = max(worst["rel"], err / abs(want))
                        assert err <= 1e-5 * abs(want), (case["case"], method, key, float(value), want)
                    per_pos = np.asarray(out["fusion_per_token"])
                    want_pp = np.asarray(res["fusion_ce_per_position"]).reshape(per_pos.shape)  # stored flat [B·T]
                    on = attention.astype(bool)
                    np.testing.assert_allclose(per_pos[on], want_pp[on], rtol=1e-5, atol=1e-5)
                    pp_err = float(np.abs(per_pos[on] - want_pp[on]).max())
                    worst["per_position_abs"] = max(worst["per_position_abs"], pp_err)
    print("golden loss errors:", worst)
