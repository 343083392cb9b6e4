"""Fuse K teachers' sparse rows into one sparse target per position (FuseLLM's MinCE and AvgCE), never densified.

Inputs are the loader's per-teacher rows (``fusion_jax/data/loader.py``), stacked by :meth:`TeacherRows.stack`:
``ids int32[K,B,T,k]``, ``logprobs float32[K,B,T,k]`` (−inf pads; the row's distribution is the softmax over its
non-pad entries), ``kind int8[K,B,T]`` (``ROW_TEACHER | ROW_ONEHOT | ROW_EMPTY``), ``seq_ce``/``seq_bpb float32[K,B]``.
The output :class:`FusedTarget` holds ``ids int32[B,T,K·k]``, ``probs float32[B,T,K·k]``, the teachers' shares
``weights float32[B,T,K]`` and ``has_target bool[B,T]``. Memory is O(B·T·(K·k)²) at most (the duplicate merge);
nothing is [B,T,V].

Per position (b, t), :func:`fuse` does:

1. **Rows.** Teacher j *has a row* when ``kind != ROW_EMPTY`` and at least one entry is finite. Its distribution is
   ``p_j = softmax(logprobs / teacher_temperature)`` over the finite entries. ``granularity="token"``: a *fallback*
   row (``ROW_ONEHOT``: the loader's one-hot where the teacher has no transferred row, ``fallback: onehot_next``)
   carries no teacher information and would score −log 1 = 0, better than any real row; so it counts as a row only
   at positions where no teacher taking part has a real (``ROW_TEACHER``) row. There the fallback rows make the
   target (as ``onehot_next`` promises: probability 1 on the next token; with ``fallback: mask`` the rows are empty
   and there is no target), and no teacher is credited for it (``weights`` 0).
2. **Scores** (lower is better). ``granularity="sequence"``: the block's ``seq_bpb`` (``score="bpb"``, comparable
   across tokenizers) or ``seq_ce`` (``score="ce"``, the official score: each teacher's CE on its own tokens).
   ``granularity="token"``: ``−log p_j(label)`` with ``p_j`` as in 1 (the row renormalised over its kept entries),
   +inf when the row lacks the label. A NaN score (``seq_bpb`` of a block without bytes) counts as +inf.
3. **Who takes part.** A teacher with ``teacher_weights[j] == 0`` never does. ``empty_rows="skip"``: a teacher
   without a row at the position does not take part there (the others' weights are renormalised).
   ``empty_rows="first_teacher"`` (official collator): every teacher takes part, and one without a row lends teacher
   0's row (teacher 0 is the target/base model in the paper); where teacher 0 has no row either, such shares are
   dropped and the rest renormalised (no target at all when nothing is left, e.g. on padding).
4. **Shares.** ``method="min_ce"``: one-hot on ``argmin_j score_j − log teacher_weights[j]`` among the teachers taking
   part; ties go to the lowest index (official ``torch.argmax`` behaviour; a teacher whose score is +inf wins only
   when all are +inf). ``method="avg_ce"``: ``w_j ∝ teacher_weights[j] · exp(ℓ_j)`` over the teachers taking part,
   with ``ℓ_j = exp(−score_j)`` (``avg_weights="official"``: the code's ``softmax_j(1/exp(CE_j))``, nearly uniform)
   or ``ℓ_j = −score_j / temperature`` (``avg_weights="softmax"``; all +inf → uniform).
5. **Target.** ``Σ_j w_j · p_j``. Entries stay in per-teacher slots (teacher j's k entries at ``[j·k, (j+1)·k)``),
   but an id present in several slots is merged into its first occurrence (the others get prob 0 and id 0), so ``(ids,
   probs)`` with ``probs > 0`` is a proper sparse distribution with unique ids: the fusion CE is linear in ``p`` and
   would not care, but the target entropy (KL loss) would.

``weights`` reports each teacher's *own* share: a ``first_teacher`` substitute counts for teacher 0 (whose row it
is), so ``weights`` is one-hot for min_ce and serves win rates directly (except at the token-level fallback-only
positions of 1, where it is 0: a fallback is nobody's win).

``compat_bf16=True`` reproduces the official numerics (``DataCollatorForDistill`` + ``DistillTrainer.compute_loss``):
teacher values rounded to bf16, divided by the temperature in bf16, softmaxed (float internally) to bf16; rewards
``bf16(1 / bf16(exp(bf16(score))))``; min_ce is the first argmax of the bf16 rewards (bf16 ties → the first
teacher); avg_ce weights are ``bf16(softmax(rewards))``; each teacher's ``bf16(w_j · p_j)`` is added in teacher order
with bf16 rounding after each addition. With the official settings (``compat_bf16=True, empty_rows="first_teacher",
score="ce", avg_weights="official", granularity="sequence"``, unit teacher weights) the target equals the official
dense bf16 target entry for entry (``tests/test_fusion.py`` checks this on the FuseLLM goldens).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax.align.transfer import ROW_EMPTY, ROW_TEACHER
from fusion_jax.config.schema import FusionConfig


class TeacherRows(NamedTuple):
    """K teachers' rows, stacked on a leading axis (a pytree)."""

    ids: Any  # int32[K, B, T, k]
    logprobs: Any  # float32[K, B, T, k], −inf pads
    kind: Any  # int8[K, B, T]
    seq_ce: Any  # float32[K, B]
    seq_bpb: Any  # float32[K, B]

    @property
    def num_teachers(self) -> int:
        return self.ids.shape[0]

    @classmethod
    def stack(cls, teachers: Sequence[Mapping[str, Any]]) -> "TeacherRows":
        """Loader teacher dicts (``batch["teachers"]``) → TeacherRows; k is padded to the largest (id 0, −inf).

        numpy inputs give numpy arrays, anything else (``jax.Array``, also global sharded ones) jnp arrays. A dict
        without ``kind`` gets ROW_TEACHER where a row has a finite entry, else ROW_EMPTY; missing ``seq_ce`` /
        ``seq_bpb`` are NaN (that score then counts as +inf).
        """
        if not teachers:
            raise ValueError("TeacherRows.stack needs at least one teacher")
        xp = np if all(isinstance(t["ids"], np.ndarray) for t in teachers) else jnp
        k = max(t["ids"].shape[-1] for t in teachers)
        B = teachers[0]["ids"].shape[0]
        ids, lps, kinds, ces, bpbs = [], [], [], [], []
        for j, t in enumerate(teachers):
            i, lp = xp.asarray(t["ids"], xp.int32), xp.asarray(t["logprobs"], xp.float32)
            if i.shape != lp.shape or i.ndim != 3:
                raise ValueError(f"teacher {j}: ids {tuple(i.shape)} and logprobs {tuple(lp.shape)} must both be "
                                 "[B, T, k]")
            if i.shape[:2] != teachers[0]["ids"].shape[:2]:
                raise ValueError(f"teacher {j}: [B, T] = {tuple(i.shape[:2])} differs from teacher 0's "
                                 f"{tuple(teachers[0]['ids'].shape[:2])}")
            pad = [(0, 0), (0, 0), (0, k - i.shape[-1])]
            ids.append(xp.pad(i, pad))
            lps.append(xp.pad(lp, pad, constant_values=-np.inf))
            if "kind" in t:
                kinds.append(xp.asarray(t["kind"], xp.int8))
            else:
                kinds.append(xp.where(xp.isfinite(lp).any(-1), ROW_TEACHER, ROW_EMPTY).astype(xp.int8))
            nan = xp.full((B,), np.nan, xp.float32)
            ces.append(xp.asarray(t["seq_ce"], xp.float32) if "seq_ce" in t else nan)
            bpbs.append(xp.asarray(t["seq_bpb"], xp.float32) if "seq_bpb" in t else nan)
        return cls(xp.stack(ids), xp.stack(lps), xp.stack(kinds), xp.stack(ces), xp.stack(bpbs))


class FusedTarget(NamedTuple):
    """The fused sparse target (a pytree)."""

    ids: Any  # int32[B, T, K·k]; 0 where probs is 0
    probs: Any  # float32[B, T, K·k]; unique ids among probs > 0; sums to 1 where has_target (to bf16 in compat)
    weights: Any  # float32[B, T, K]: each teacher's own share (one-hot for min_ce; 0 at a token-level fallback)
    has_target: Any  # bool[B, T]

    @classmethod
    def empty(cls, labels: jax.Array) -> "FusedTarget":
        """No teachers (CLM-only training): one zero-probability candidate per position, no target anywhere."""
        B, T = labels.shape
        return cls(jnp.zeros((B, T, 1), jnp.int32), jnp.zeros((B, T, 1), jnp.float32),
                   jnp.zeros((B, T, 0), jnp.float32), jnp.zeros((B, T), bool))


def _bf16(x: jax.Array) -> jax.Array:
    """Round float32 to the nearest bf16 value (ties to even), kept as float32.

    Not ``x.astype(bfloat16).astype(float32)``: under ``jax.jit`` XLA may drop that round trip ("excess
    precision"), so the official numerics would hold op by op but not jitted. ``reduce_precision`` is never elided.
    """
    return jax.lax.reduce_precision(jnp.asarray(x, jnp.float32), exponent_bits=8, mantissa_bits=7)


def _ident(x: jax.Array) -> jax.Array:
    return x


_LOWEST = float(np.finfo(np.float32).min)


def fuse(cfg: FusionConfig, teachers: TeacherRows, labels: jax.Array | None = None) -> FusedTarget:
    """K teachers' rows → one sparse target per position (see the module docstring). Pure and jittable
    (``jax.jit(fuse, static_argnums=0)``); any batch sharding carries through, every op is per position.

    ``labels int32[B, T]``: the next target token at each position; needed only for ``granularity="token"``.
    """
    ids = jnp.asarray(teachers.ids, jnp.int32)
    K, B, T, k = ids.shape
    tw = cfg.weights_for(K)
    rnd = _bf16 if cfg.compat_bf16 else _ident
    first_teacher = cfg.empty_rows == "first_teacher"

    # 1. rows and their distributions
    x = jnp.asarray(teachers.logprobs, jnp.float32)
    has_row, valid, takes_part, fallback_only = _rows(cfg, x, jnp.asarray(teachers.kind), tw)
    xs, mx, zs, p = _distributions(cfg, x, valid, has_row, rnd)

    # 2. scores [K,B,T] (lower is better)
    s, reward = _scores(cfg, teachers, ids, labels, valid, xs, mx, zs, rnd)

    # 3. who takes part; which slots end up with a row
    elig = takes_part & has_row if not first_teacher else jnp.broadcast_to(takes_part, (K, B, T))
    sub = ~has_row & first_teacher  # slot j lends teacher 0's row
    slot_row = has_row | (sub & has_row[0:1])

    # 4. shares [K,B,T]
    w = _shares(cfg, tw, s, reward, elig, rnd)
    w = _drop_missing_rows(w, slot_row, rnd)
    has_target = jnp.sum(w, 0) > 0

    # 5. the target: slot rows (teacher 0's where lent), weighted, duplicates merged
    ids_out, probs = _target(cfg, ids, p, w, sub, rnd)
    own = _own_shares(w, sub, fallback_only)
    return FusedTarget(ids_out, probs, jnp.moveaxis(own, 0, -1), has_target)


def _rows(cfg: FusionConfig, x: jax.Array, kind: jax.Array, tw: np.ndarray):
    """Step 1, which teachers have a row: ``has_row bool[K,B,T]``, ``valid bool[K,B,T,k]`` (the entries that count),
    ``takes_part bool[K,1,1]`` (teacher weight > 0) and, for ``granularity="token"``, ``fallback_only bool[B,T]``
    (None otherwise)."""
    finite = jnp.isfinite(x)
    has_row = (kind != ROW_EMPTY) & finite.any(-1)  # [K,B,T]
    takes_part = jnp.asarray(tw > 0)[:, None, None]
    fallback_only = None
    if cfg.granularity == "token":
        # A fallback row (p = 1 on the label, no teacher information) would score −log 1 = 0 and beat every real
        # row: it takes part only where no teacher has a real one.
        real = has_row & (kind == ROW_TEACHER)
        fallback_only = ~jnp.any(real & takes_part, 0)  # [B,T]
        has_row = jnp.where(fallback_only[None], has_row, real)
    valid = finite & has_row[..., None]
    return has_row, valid, takes_part, fallback_only


def _distributions(cfg: FusionConfig, x: jax.Array, valid: jax.Array, has_row: jax.Array, rnd):
    """Step 1, each row's distribution ``p float32[K,B,T,k]`` (0 on pads and empty rows), with the tempered logits
    ``xs [K,B,T,k]``, their row max ``mx [K,B,T,1]`` and shifted normaliser ``zs [K,B,T,1]`` the token scores reuse."""
    tt = float(cfg.teacher_temperature)
    xs = rnd(rnd(x) / tt) if cfg.compat_bf16 else x / tt
    xs = jnp.where(valid, xs, -jnp.inf)
    mx = jnp.where(has_row, jnp.max(xs, -1), 0.0)[..., None]
    ex = jnp.where(valid, jnp.exp(xs - mx), 0.0)
    zs = jnp.sum(ex, -1, keepdims=True)
    zs = jnp.where(zs > 0, zs, 1.0)
    p = rnd(ex / zs)
    return xs, mx, zs, p


def _scores(cfg: FusionConfig, teachers: TeacherRows, ids: jax.Array, labels: jax.Array | None, valid: jax.Array,
            xs: jax.Array, mx: jax.Array, zs: jax.Array, rnd):
    """Step 2: each teacher's score ``s float32[K,B,T]`` (lower is better, NaN → +inf) and its reward (exp(−s), or
    the official bf16 ``1/exp(CE)``)."""
    K, B, T, _ = ids.shape
    if cfg.granularity == "sequence":
        seq = teachers.seq_bpb if cfg.score == "bpb" else teachers.seq_ce
        s = jnp.broadcast_to(jnp.asarray(seq, jnp.float32)[:, :, None], (K, B, T))
    else:
        if labels is None:
            raise ValueError("granularity='token' needs labels (the next target token at each position)")
        logp = xs - mx - jnp.log(zs)
        hit = valid & (ids == jnp.asarray(labels, jnp.int32)[None, :, :, None])
        s = -jnp.max(jnp.where(hit, logp, -jnp.inf), -1)
    s = jnp.where(jnp.isnan(s), jnp.inf, s)
    if cfg.compat_bf16:
        s = rnd(s)
        reward = rnd(1.0 / rnd(jnp.exp(s)))  # official 1/exp(bf16(CE)) in bf16
    else:
        reward = jnp.exp(-s)
    return s, reward


def _shares(cfg: FusionConfig, tw: np.ndarray, s: jax.Array, reward: jax.Array, elig: jax.Array, rnd) -> jax.Array:
    """Step 4: the shares ``w float32[K,B,T]`` of the teachers taking part (``elig``), min_ce or avg_ce."""
    K = s.shape[0]
    log_tw = jnp.asarray(np.log(np.where(tw > 0, tw, 1.0)), jnp.float32)[:, None, None]
    if cfg.method == "min_ce":
        key = (jnp.log(reward) if cfg.compat_bf16 else -s) + log_tw
        key = jnp.where(elig, jnp.where(jnp.isnan(key) | (key == -jnp.inf), _LOWEST, key), -jnp.inf)
        win = jnp.argmax(key, axis=0)  # first index on ties
        w = (jnp.arange(K)[:, None, None] == win[None]) & elig.any(0, keepdims=True)
        return w.astype(jnp.float32)
    ell = reward if cfg.avg_weights == "official" else -s / float(cfg.temperature)
    ell = jnp.where(elig, ell, -jnp.inf)
    top = jnp.max(ell, 0, keepdims=True)
    ell = jnp.where(jnp.isfinite(top), ell - top, jnp.where(elig, 0.0, -jnp.inf))  # all +inf scores → uniform
    w = jnp.exp(ell)
    if not np.all(tw == 1.0):
        w = w * jnp.asarray(tw, jnp.float32)[:, None, None]
    tot = jnp.sum(w, 0, keepdims=True)
    return rnd(w / jnp.where(tot > 0, tot, 1.0))


def _drop_missing_rows(w: jax.Array, slot_row: jax.Array, rnd) -> jax.Array:
    """Step 4: shares of slots without a row (``first_teacher`` where teacher 0 has none either) are dropped and the
    rest renormalised: ``w float32[K,B,T]``."""
    dropped = jnp.any((w > 0) & ~slot_row, 0, keepdims=True)
    w = jnp.where(slot_row, w, 0.0)
    tot = jnp.sum(w, 0, keepdims=True)
    return jnp.where(dropped & (tot > 0), rnd(w / jnp.where(tot > 0, tot, 1.0)), w)


def _target(cfg: FusionConfig, ids: jax.Array, p: jax.Array, w: jax.Array, sub: jax.Array, rnd):
    """Step 5: ``Σ_j w_j · p_j`` in per-teacher slots with duplicate ids merged into their first occurrence:
    ``ids int32[B,T,K·k]`` (0 where merged away) and ``probs float32[B,T,K·k]``."""
    K, B, T, k = ids.shape
    E = K * k
    ids_s = jnp.where(sub[..., None], ids[0:1], ids)
    p_s = jnp.where(sub[..., None], p[0:1], p)
    q = rnd(w[..., None] * p_s)  # [K,B,T,k]; bf16·bf16 is exact in f32, so one rounding as in torch
    ids_f = jnp.moveaxis(ids_s, 0, 2).reshape(B, T, E)
    q_f = jnp.moveaxis(q, 0, 2).reshape(B, T, E)
    pos = q_f > 0
    same = ids_f[..., :, None] == ids_f[..., None, :]  # [B,T,E,E]
    before = jnp.arange(E)[None, :] < jnp.arange(E)[:, None]
    first = pos & ~jnp.any(same & pos[..., None, :] & before, -1)
    if cfg.compat_bf16:  # torch's w0·p0 + w1·p1 + …: bf16 rounding after each addition, in teacher order
        acc = jnp.zeros((B, T, E), jnp.float32)
        for j in range(K):
            sl = slice(j * k, (j + 1) * k)
            acc = rnd(acc + jnp.sum(jnp.where(same[..., sl], q_f[..., None, sl], 0.0), -1))
    else:
        acc = jnp.sum(jnp.where(same, q_f[..., None, :], 0.0), -1)
    probs = jnp.where(first, acc, 0.0)
    return jnp.where(first, ids_f, 0), probs


def _own_shares(w: jax.Array, sub: jax.Array, fallback_only: jax.Array | None) -> jax.Array:
    """Each teacher's own share ``float32[K,B,T]``: a lent row counts for teacher 0; a fallback target is nobody's
    win."""
    lent = jnp.where(sub, w, 0.0)
    own = jnp.where(sub, 0.0, w)
    own = own.at[0].add(jnp.sum(lent, 0))
    if fallback_only is not None:
        own = jnp.where(fallback_only[None], 0.0, own)
    return own
