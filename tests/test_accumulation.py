"""Gradient accumulation does not change the train step: loss, metrics, gradient and update are those of the whole
batch in one pass, for both reductions, with blocks that have no counted position (a padding block, a block without
any teacher row). The sharded, donated, jitted step of ``train_step`` on a 2×2 mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from chunk_batches import random_chunks
from fusion_jax.align.transfer import ROW_EMPTY, ROW_ONEHOT, ROW_TEACHER
from fusion_jax.fusion import FusionConfig, LossConfig
from fusion_jax.mesh import MeshConfig, make_mesh
from fusion_jax.config.schema import DEFAULT_RULES
from fusion_jax.models import decoder
from fusion_jax.config.model import ModelConfig
from fusion_jax.train.optim import OptimizerConfig
from fusion_jax.train.step import abstract_state, host_metrics, init_state, jit_train_step, make_train_step

B, T, V, k = 8, 12, 48, 3
MODEL = ModelConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                    compute_dtype="float32")
PADDING_BLOCK, NO_TEACHER_BLOCK = 1, 3  # both in micro-batch 1 of 2 (rows 1, 3, 5, 7)


def batch_with_empty_blocks(seed: int = 0) -> dict:
    """Packed blocks (two documents each, a padded tail), one teacher; block PADDING_BLOCK is all padding (nothing
    counted by either mask) and block NO_TEACHER_BLOCK has CLM labels but no teacher row (no fusion target)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, V, (B, T)).astype(np.int32)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cut, end = int(rng.integers(3, T - 4)), int(rng.integers(T - 3, T + 1))
        seg[b, :cut], seg[b, cut:end] = 1, 2
    seg[PADDING_BLOCK] = 0
    tokens[seg == 0] = 0
    positions = np.zeros((B, T), np.int32)
    for b in range(B):
        for s in (1, 2):
            at = np.flatnonzero(seg[b] == s)
            positions[b, at] = np.arange(len(at))
    loss_mask = (seg != 0) & (np.roll(seg, -1, axis=1) == seg)
    loss_mask[:, -1] = False
    labels = np.concatenate([tokens[:, 1:], np.zeros((B, 1), np.int32)], axis=1)

    ids = rng.integers(0, V, (B, T, k)).astype(np.int32)
    lp = np.log(rng.dirichlet(np.ones(k), (B, T))).astype(np.float32)
    kind = np.full((B, T), ROW_TEACHER, np.int8)
    hot = rng.random((B, T)) < 0.2
    ids[hot, 0], lp[hot, 0], lp[hot, 1:], kind[hot] = labels[hot], 0.0, -np.inf, ROW_ONEHOT
    empty = (seg == 0) | ~loss_mask
    empty[NO_TEACHER_BLOCK] = True
    lp[empty], kind[empty] = -np.inf, ROW_EMPTY
    chunk_start, chunk_logprob = random_chunks(rng, loss_mask)
    teacher = {"ids": ids, "logprobs": lp, "kind": kind, "seq_ce": rng.uniform(1, 3, B).astype(np.float32),
               "seq_bpb": rng.uniform(0.5, 1.5, B).astype(np.float32), "chunk_start": chunk_start,
               "chunk_logprob": chunk_logprob}
    return {"tokens": tokens, "segment_ids": seg, "positions": positions, "loss_mask": loss_mask,
            "teachers": [teacher]}


def host_params(seed: int = 0) -> dict:
    """Random params made on the host (no init compile): normal(0.02) matrices, unit norms, zero biases."""
    rng = np.random.default_rng(seed)

    def one(spec):
        if spec.init in ("ones", "zeros"):
            return np.full(spec.shape, 1.0 if spec.init == "ones" else 0.0, np.float32)
        return rng.normal(0.0, 0.02, spec.shape).astype(np.float32)

    return jax.tree.map(one, decoder.param_specs(MODEL), is_leaf=lambda x: isinstance(x, decoder.ParamSpec))


def one_step(loss_cfg: LossConfig, accumulation: int):
    """(params after one step, metrics) of the jitted, donated step on a 2×2 mesh, from the same params and batch."""
    mesh = make_mesh(MeshConfig(data=2, fsdp=2), jax.devices()[:4])
    rules = dict(DEFAULT_RULES)
    opt_cfg = OptimizerConfig(learning_rate=1e-4, warmup_ratio=0.0, accumulation=accumulation)
    step_fn, opt = make_train_step(MODEL, FusionConfig(), loss_cfg, opt_cfg, 10, rules)
    abstract = abstract_state(MODEL, opt, mesh, rules)
    params = jax.device_put(host_params(), decoder.param_shardings(MODEL, mesh, rules))
    state = init_state(params, opt, abstract)
    batch = jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp")))),
                         batch_with_empty_blocks())
    spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), batch)
    state, metrics = jit_train_step(step_fn, abstract, spec, mesh)(state, batch)
    return jax.device_get(state["params"]), host_metrics(metrics)


def naive_blocks_loss(loss_cfg: LossConfig) -> tuple[float, float]:
    """(clm, fusion) of the ``blocks`` reduction by hand, float64: the mean over the batch's non-empty blocks of
    each block's mean."""
    from fusion_jax.fusion import TeacherRows, fuse
    from fusion_jax.train.step import next_labels

    batch = batch_with_empty_blocks()
    labels = np.asarray(next_labels(jnp.asarray(batch["tokens"])))
    target = fuse(FusionConfig(), TeacherRows.stack(batch["teachers"]), labels)
    logits = np.asarray(jax.jit(decoder.apply, static_argnums=0)(
        MODEL, host_params(), batch["tokens"], batch["segment_ids"], batch["positions"]), np.float64)
    top = logits.max(-1, keepdims=True)
    logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
    clm_tok = -np.take_along_axis(logp, labels[..., None], -1)[..., 0]
    fus_tok = -np.sum(np.asarray(target.probs) * np.take_along_axis(logp, np.asarray(target.ids), -1), -1)
    fmask = batch["loss_mask"] if loss_cfg.fusion_mask == "next_label" else batch["segment_ids"] > 0
    fmask = fmask & np.asarray(target.has_target)
    assert not batch["loss_mask"][PADDING_BLOCK].any() and not fmask[PADDING_BLOCK].any()
    assert batch["loss_mask"][NO_TEACHER_BLOCK].any() and not fmask[NO_TEACHER_BLOCK].any()

    def blocks(per_token, mask):
        return float(np.mean([per_token[b][mask[b]].mean() for b in range(B) if mask[b].any()]))

    return blocks(clm_tok, batch["loss_mask"]), blocks(fus_tok, fmask)


@pytest.mark.parametrize("reduction,fusion_mask,likelihood", [("blocks", "attention", 0.0), ("tokens", "next_label", 0.0),
                                                              ("blocks", "next_label", 0.5), ("tokens", "attention", 0.5)])
def test_accumulation_gives_the_same_step_with_empty_blocks(reduction, fusion_mask, likelihood):
    """Accumulation 2 gives accumulation 1's loss, gradient and update. With ``blocks`` each micro-batch used to
    average over its own non-empty blocks and then be scaled by B_micro/B, so the micro-batch holding the empty
    blocks weighed its other blocks more (the issue saw 1.85513 vs 1.93501); the step's ``blocks`` value is checked
    against a float64 hand computation too."""
    loss_cfg = LossConfig(reduction=reduction, fusion_mask=fusion_mask, likelihood_weight=likelihood,
                          likelihood_temperature=2.0)
    p1, m1 = one_step(loss_cfg, 1)
    p2, m2 = one_step(loss_cfg, 2)
    assert (m1["likelihood"] > 0) == (likelihood > 0)
    for key in ("loss", "clm", "fusion", "likelihood", "grad_norm"):
        np.testing.assert_allclose(m2[key], m1[key], rtol=2e-6, err_msg=key)
    np.testing.assert_array_equal(m2["teacher_wins"], m1["teacher_wins"])
    for x, y in zip(jax.tree.leaves(p2), jax.tree.leaves(p1)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)
    if reduction == "blocks":
        np.testing.assert_allclose([m1["clm"], m1["fusion"]], naive_blocks_loss(loss_cfg), rtol=1e-5)
