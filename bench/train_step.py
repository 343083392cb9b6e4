"""One fusion train step: our jitted sparse step vs the official FuseLLM pipeline (dense collator + HF + torch), on CPU.

Both sides train the same tiny Llama (our random init, exported with ``convert.save_hf`` and loaded by transformers)
on the same batch: B blocks of T tokens and K teachers (teacher 0 = the target itself, like the paper's base model,
then K−1 aligned sources) with k candidates per position, in the loader's format (``fusion_jax/data/loader.py``):
random distinct ids, sorted random log-probs, a share of one-hot rows (``--onehot``, §12 of fusellm.md saw 43 %) and
of empty rows (``--empty``) for the aligned teachers, random per-block CE scores.

* **ours**: ``train_step.make_train_step`` jitted on a one-device mesh: ``fuse`` (official MinCE, bf16-compatible
  numerics) → forward → ``sparse_losses`` with ``--chunk-size`` positions of logits at a time → clip → AdamW.
* **baseline**, following the official code (``DataCollatorForDistill`` and ``DistillTrainer.compute_loss``): per
  position, in a Python loop on the CPU, the softmax of each candidate's top-k scattered into a zero [V] bf16 row →
  K dense [B, T, V] bf16 tensors; MinCE per block from bf16 rewards ``1/exp(bf16(CE))`` via the official
  stack/argmax/gather; ``LlamaForCausalLM`` in fp32 with ``labels`` (the HF CLM loss) and
  ``F.cross_entropy(logits, dense_target)`` masked by ``attention_mask``; ``λ = 0.9``; backward; clip; torch AdamW.

Each side runs in its own process (so that each has its own peak memory); the parent drives them step by step,
alternating ours and the baseline, so that both see the same machine noise (shared machines are noisy: quote the
ratios). Step time is the median of ``--repeats`` steps after ``--warmup`` untimed ones (ours: after compilation),
collation included for the baseline and the fusion included for ours (it is inside the jitted step); the ratio of
the fastest steps is printed too. Data loading is excluded on both sides: the baseline's features are Python lists
(what ``datasets`` hands the collator), ours are device arrays. The step-1 and step-2 losses of both sides are
printed and must agree (fp32): both compute the same step on the same weights.

**Fused step vs CLM step** (``fusion_over_clm_step`` in the JSON): in our process, the same model and batch trained
three ways from the same weights, on the demo's fusion settings (MinCE per block, bpb scores, next-label mask): a plain
CLM step (no teachers, λ = 1), the paper recipe's fused step (λ = 0.9, top-k CE) and the shipped recipe's (the loss
section of ``configs/demo.yaml``, which may add likelihood matching on byte chunks: the batch carries every teacher's
chunks as the loader ships them). Steps alternate (clm, paper, shipped, …) after a warm-up; the ratios are of the
median step times. The transfer options (``continuation``, ``in_context``) run on the host in the loader and cost
the step nothing.

**Loss-side memory** = the memory of everything between the final hidden states [B, T, D] and the gradient with
respect to them and to the unembedding: building the target from the teachers' rows (collation + MinCE for the
baseline; ``fuse`` for ours), the logits, both losses and their backward — i.e. what the loss needs beyond the
trunk's activations and the model/optimizer state. Each side runs exactly that part (same random hidden states, the
model's unembedding) in its process, after the timed steps, and we measure the **peak resident-memory increase**
while it runs (``/proc/self/clear_refs`` resets ``VmHWM``; peak = ``VmHWM`` after − ``VmRSS`` before). The inputs
(teacher rows / Python lists, hidden states, weights) exist before and are not counted on either side; glibc is told
to return freed memory at once (``mallopt(M_MMAP_THRESHOLD)``) so that a warm-up run's freed heap cannot hide the
peak. For ours we also report XLA's own figure (``compiled.memory_analysis()``: temporaries + outputs) and count the
larger of the two. Whole-step figures (peak RSS increase during the timed steps; whole-process ``ru_maxrss``) are
printed too.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py                     # B=4, T=512, V=32000, hidden 128
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py --chunk-size 64 --hidden 64
    HF_HUB_OFFLINE=1 .venv/bin/python bench/train_step.py --model /path/to/hf_llama --batch 1 --seq 2048

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One device: the Makefile exports 8 fake CPU devices, which would not matter on a one-device mesh but would split
# the CPU's threads between 8 XLA devices. Must happen before jax is imported (here or in a child process).
os.environ["XLA_FLAGS"] = (re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
                           + " --xla_force_host_platform_device_count=1").strip()
os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]

import numpy as np  # noqa: E402

# fusion_jax.align.transfer's row kinds (not imported: the baseline's process stays torch-only)
ROW_TEACHER, ROW_ONEHOT, ROW_EMPTY = 0, 1, 2
MiB = 2**20


# ------------------------------------------------------------------------------------------------ memory probes


def _status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def release_freed_memory() -> None:
    """Make glibc serve every allocation ≥ 128 KiB by mmap and return it on free (no dynamic threshold), so that the
    resident set follows the live buffers and a warm-up run's freed heap cannot hide the next run's peak. Called
    after the timed steps, before the loss-side measurement, in both processes."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except OSError:
        pass


def reset_peak() -> int:
    """Reset the peak-RSS mark (Linux ≥ 4.0) and return the current RSS."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status("VmRSS")


def peak_since(rss_before: int) -> int:
    return _status("VmHWM") - rss_before


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------------ the data


def make_batch(a: argparse.Namespace, vocab: int) -> dict:
    """Tokens and K teachers' sparse rows in the loader's format (numpy), deterministic in --seed."""
    rng = np.random.default_rng(a.seed)
    B, T, k, K = a.batch, a.seq, a.k, a.teachers
    tokens = rng.integers(1, vocab, (B, T), dtype=np.int32)
    nxt = np.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)
    teachers = []
    for j in range(K):
        # k distinct ids per row: a start plus increasing offsets below V; half the rows start at the next token
        start = np.where(rng.random((B, T)) < 0.5, nxt, rng.integers(0, vocab, (B, T)))
        steps = rng.integers(1, max(2, vocab // k), (B, T, k - 1))
        ids = np.concatenate([start[..., None], (start[..., None] + np.cumsum(steps, -1)) % vocab], -1)
        x = np.sort(rng.normal(0.0, 2.0, (B, T, k)), -1)[..., ::-1]
        lse = np.log(np.exp(x - x[..., :1]).sum(-1, keepdims=True)) + x[..., :1]
        logprobs = (x - lse - rng.uniform(0.0, 0.5, (B, T, 1))).astype(np.float32)  # top-k misses some mass
        kind = np.full((B, T), ROW_TEACHER, np.int8)
        if j > 0:  # aligned sources: one-hot rows where the alignment failed, a few empty rows
            r = rng.random((B, T))
            kind[r < a.onehot] = ROW_ONEHOT
            kind[r > 1 - a.empty] = ROW_EMPTY
            one = kind == ROW_ONEHOT
            ids[one] = 0
            ids[one, 0] = nxt[one]
            logprobs[one] = -np.inf
            logprobs[one, 0] = 0.0
            ids[kind == ROW_EMPTY] = 0
            logprobs[kind == ROW_EMPTY] = -np.inf
        seq_ce = rng.uniform(1.5, 3.0, B).astype(np.float32)
        teachers.append({"ids": ids.astype(np.int32), "logprobs": np.ascontiguousarray(logprobs), "kind": kind,
                         "seq_ce": seq_ce, "seq_bpb": (seq_ce / np.log(2) / 4).astype(np.float32)})
    loss_mask = np.ones((B, T), bool)
    loss_mask[:, -1] = False  # no next label in the block (official mode: one segment per block)
    for t in teachers:  # byte chunks of 1–3 target tokens, as the loader ships them
        t["chunk_start"], t["chunk_logprob"] = _chunks(rng, loss_mask)
    return {"tokens": tokens, "segment_ids": np.ones((B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy(), "loss_mask": loss_mask,
            "teachers": teachers}


def _chunks(rng: np.random.Generator, loss_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(chunk_start int32[B, T], chunk_logprob float32[B, T]): consecutive chunks of 1–3 positions, ending at their
    last position (vectorised; the loader's layout)."""
    B, T = loss_mask.shape
    start = np.full((B, T), -1, np.int32)
    logprob = np.zeros((B, T), np.float32)
    for b in range(B):
        ends = np.cumsum(rng.integers(1, 4, T))
        ends = ends[ends <= T] - 1
        firsts = np.concatenate([[0], ends[:-1] + 1])
        keep = loss_mask[b, ends]
        start[b, ends[keep]] = firsts[keep]
        logprob[b, ends[keep]] = -rng.uniform(0.1, 3.0, keep.sum()) * (ends[keep] - firsts[keep] + 1)
    return start, logprob


def official_features(batch: dict) -> dict:
    """The batch as the official collator receives it: Python lists per block and position (a one-hot row is
    ``[1.0]``, an empty aligned row ``[]``); base = teacher 0, aligned_{i} = teacher i+1."""
    feats = {"input_ids": batch["tokens"].tolist()}
    for j, t in enumerate(batch["teachers"]):
        logits, indices = [], []
        for b in range(t["ids"].shape[0]):
            lb, ib = [], []
            for ids, lp, kind in zip(t["ids"][b], t["logprobs"][b], t["kind"][b]):
                keep = np.isfinite(lp)
                if kind == ROW_ONEHOT:
                    lb.append([1.0]), ib.append([int(ids[0])])
                else:
                    lb.append(lp[keep].tolist()), ib.append(ids[keep].tolist())
            logits.append(lb), indices.append(ib)
        sfx = "" if j == 0 else f"_aligned_{j - 1}"
        feats["per_step_logits" if j == 0 else f"per_step_aligned_logits_{j - 1}"] = logits
        feats["per_step_indices" if j == 0 else f"per_step_aligned_indices_{j - 1}"] = indices
        feats["metric_ce" + sfx] = t["seq_ce"].tolist()
    return feats


# ------------------------------------------------------------------------------------------------ the baseline


def official_collate(features: dict, vocab_size: int, max_length: int, n_aligned: int, pad_id: int = 0,
                     temperature: float = 1.0) -> dict:
    """The densification of FuseLLM's ``DataCollatorForDistill.__call__`` (src/utils/data_collator.py), line for
    line (the aligned models generalised from 2 to ``n_aligned``); padding/tokenizer.pad is not needed here (full
    blocks)."""
    import torch
    from torch.nn.functional import softmax

    out = {"input_ids": torch.tensor(features["input_ids"], dtype=torch.long)}
    out["attention_mask"] = torch.ones_like(out["input_ids"])
    out["labels"] = out["input_ids"].clone()
    batch_size = out["input_ids"].size(0)
    base_target_dist = torch.zeros(batch_size, max_length, vocab_size).to(torch.bfloat16)
    aligned = [torch.zeros(batch_size, max_length, vocab_size).to(torch.bfloat16) for _ in range(n_aligned)]
    for i in range(batch_size):
        base_seq_len = len(features["per_step_logits"][i])
        for j in range(max_length):
            if j < base_seq_len:
                base_logits = torch.tensor(features["per_step_logits"][i][j], dtype=torch.bfloat16)
                base_prob = softmax(base_logits / temperature, -1)
                base_indices = torch.tensor(features["per_step_indices"][i][j])
                base_target_dist[i][j] = base_target_dist[i][j].scatter_(-1, base_indices, base_prob)
                for a, dist in enumerate(aligned):
                    if len(features[f"per_step_aligned_indices_{a}"][i][j]) > 0:
                        al_logits = torch.tensor(features[f"per_step_aligned_logits_{a}"][i][j], dtype=torch.bfloat16)
                        al_prob = softmax(al_logits / temperature, -1)
                        al_indices = torch.tensor(features[f"per_step_aligned_indices_{a}"][i][j])
                        dist[i][j] = dist[i][j].scatter_(-1, al_indices, al_prob)
                    else:
                        dist[i][j] = base_target_dist[i][j]  # bad case
            else:  # padding position
                base_target_dist[i][j][pad_id] = 1.0
                for dist in aligned:
                    dist[i][j][pad_id] = 1.0
    out["base_target_dist"], out["metric_ce"] = base_target_dist, features["metric_ce"]
    for a, dist in enumerate(aligned):
        out[f"aligned_target_dist_{a}"], out[f"metric_ce_aligned_{a}"] = dist, features[f"metric_ce_aligned_{a}"]
    return out


def official_fusion_loss(logits, inputs: dict, clm_loss, lm_loss_weight: float = 0.9):
    """``DistillTrainer.compute_loss`` with ``distill_greater_as_gt`` (MinCE, type hard), ``distill_with_ref_model``,
    ``distill_loss_type=ce``: bf16 rewards, the official stack/argmax/gather, soft-target cross-entropy over V."""
    import torch
    from torch.nn.functional import cross_entropy

    batch_size, seq_len, vocab_size = logits.shape
    dists = [inputs["base_target_dist"]]
    metrics = [inputs["metric_ce"]]
    a = 0
    while f"aligned_target_dist_{a}" in inputs:
        dists.append(inputs[f"aligned_target_dist_{a}"])
        metrics.append(inputs[f"metric_ce_aligned_{a}"])
        a += 1
    rewards = [1 / torch.exp(torch.tensor(m, dtype=torch.bfloat16)) for m in metrics]
    expanded = [r.unsqueeze(-1).unsqueeze(-1).expand_as(d) for r, d in zip(rewards, dists)]
    stacked_dists = torch.stack(dists, dim=-1)
    stacked_rewards = torch.stack(expanded, dim=-1)
    max_reward_indices = torch.argmax(stacked_rewards, dim=-1, keepdim=True)
    target_dist = torch.gather(stacked_dists, -1, max_reward_indices).squeeze(-1)
    loss_lm = cross_entropy(input=logits.view(-1, vocab_size), target=target_dist.view(-1, vocab_size),
                            reduction="none").view(batch_size, -1)
    loss_lm = (loss_lm * inputs["attention_mask"]).sum() / inputs["attention_mask"].sum()
    return lm_loss_weight * clm_loss + (1.0 - lm_loss_weight) * loss_lm, loss_lm


class Baseline:
    """The official pipeline in this process: ``step()`` = collation + HF forward + losses + backward + clip + AdamW;
    ``loss_side()`` = collation + logits from given hidden states + losses + backward."""

    def __init__(self, a: argparse.Namespace):
        import torch
        import transformers

        torch.manual_seed(0)
        transformers.utils.logging.disable_progress_bar()
        self.torch, self.a = torch, a
        self.model = transformers.LlamaForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
        self.model.train()
        self.V, D = self.model.config.vocab_size, self.model.config.hidden_size
        self.feats = official_features(make_batch(a, self.V))
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=a.lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
        rng = np.random.default_rng(a.seed + 1)
        self.hidden = torch.from_numpy(rng.standard_normal((a.batch, a.seq, D), np.float32))
        self.hidden.requires_grad_(True)
        self.collate_s: list[float] = []

    def step(self) -> list[float]:
        t0 = time.perf_counter()
        inputs = official_collate(self.feats, self.V, self.a.seq, self.a.teachers - 1)
        self.collate_s.append(time.perf_counter() - t0)
        out = self.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                         labels=inputs["labels"])
        loss, fus = official_fusion_loss(out.logits, inputs, out.loss)
        loss.backward()
        self.torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return [float(loss), float(out.loss), float(fus)]

    def loss_side(self) -> float:
        inputs = official_collate(self.feats, self.V, self.a.seq, self.a.teachers - 1)
        logits = self.model.lm_head(self.hidden)
        clm = self.model.loss_function(logits=logits, labels=inputs["labels"], vocab_size=self.V)
        loss, _ = official_fusion_loss(logits, inputs, clm)
        loss.backward()
        value = float(loss)
        del inputs, logits, clm, loss
        self.hidden.grad = None
        self.model.lm_head.weight.grad = None
        return value

    def finish(self) -> dict:
        release_freed_memory()
        self.loss_side()
        rss0 = reset_peak()
        self.loss_side()
        BTV = self.a.batch * self.a.seq * self.V
        K = self.a.teachers
        return {
            "loss_side_peak_rss": peak_since(rss0), "collate_s": statistics.median(self.collate_s[self.a.warmup:]),
            "threads": self.torch.get_num_threads(),
            # what the official loss side materialises by construction (bytes): K dense bf16 targets, the stacked
            # targets and rewards [B,T,V,K] bf16, the argmax [B,T,V,1] int64, the gathered target, fp32 logits and
            # their gradient (each dense target is first built as fp32 zeros, one at a time, not counted)
            "loss_side_analytic": {
                "dense_targets_bf16": K * 2 * BTV, "stacked_targets_bf16": K * 2 * BTV,
                "stacked_rewards_bf16": K * 2 * BTV, "argmax_int64": 8 * BTV, "fused_target_bf16": 2 * BTV,
                "logits_fp32": 4 * BTV, "dlogits_fp32": 4 * BTV},
        }


class Ours:
    """Our jitted step on a one-device mesh; ``loss_side()`` = fuse + chunked logits + losses + backward from given
    hidden states."""

    def __init__(self, a: argparse.Namespace):
        import jax
        import jax.numpy as jnp

        from fusion_jax import mesh as mesh_lib
        from fusion_jax.convert import checkpoint
        from fusion_jax.fusion.fuse import FusionConfig, TeacherRows, fuse
        from fusion_jax.fusion.losses import LossConfig, sparse_losses
        from fusion_jax.models import decoder
        from fusion_jax.train.optim import OptimizerConfig
        from fusion_jax.train.step import abstract_state, init_state, jit_train_step, make_train_step, next_labels

        self.jax, self.a = jax, a
        mesh_cfg = mesh_lib.MeshConfig(data=1, fsdp=1, tensor=1)
        mesh = mesh_lib.make_mesh(mesh_cfg, devices=jax.devices()[:1])
        rules = mesh_cfg.rules
        model_cfg, params = checkpoint.load(a.model_dir, mesh, rules, param_dtype="float32", compute_dtype=a.dtype)
        fusion_cfg = FusionConfig.official()  # MinCE per block, bf16 numerics
        loss_cfg = LossConfig(lm_weight=0.9, fusion_mask="attention", reduction="tokens", chunk_size=a.chunk_size)
        opt_cfg = OptimizerConfig(learning_rate=a.lr, schedule="constant", warmup_ratio=0.0, b2=0.95,
                                  weight_decay=0.0, grad_clip=1.0)
        step_fn, opt = make_train_step(model_cfg, fusion_cfg, loss_cfg, opt_cfg, 1000, rules)
        abstract = abstract_state(model_cfg, opt, mesh, rules)
        self.state = init_state(params, opt, abstract)
        self.head_params = jax.tree.map(jnp.copy, params)  # the recipe steps start from these weights too
        del params
        self.V = model_cfg.vocab_size
        batch_sh = jax.NamedSharding(mesh, jax.P())
        self.batch = jax.device_put(make_batch(a, self.V), batch_sh)
        spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh), self.batch)
        t0 = time.perf_counter()
        with jax.set_mesh(mesh):
            self.compiled = jit_train_step(step_fn, abstract, spec, mesh).lower(self.state, self.batch).compile()
        self.compile_s = time.perf_counter() - t0
        self.step_mem = self.compiled.memory_analysis()

        D = model_cfg.hidden_size
        self.hidden = jax.device_put(np.random.default_rng(a.seed + 1).standard_normal((a.batch, a.seq, D), np.float32)
                                     .astype(jnp.dtype(a.dtype)), batch_sh)
        self.head = {k: jnp.copy(self.state["params"][k])  # a copy: the step donates the state
                     for k in (["embed"] if model_cfg.tie_embeddings else ["lm_head"])}

        def loss_side(hidden, head, b):
            labels = next_labels(b["tokens"])
            target = fuse(fusion_cfg, TeacherRows.stack(b["teachers"]), labels)
            fmask = (b["segment_ids"] > 0) & target.has_target
            out = sparse_losses(lambda h: decoder.unembed(model_cfg, head, h), hidden, labels, b["loss_mask"], target,
                                fmask, loss_cfg)
            return 0.9 * out["clm"] + 0.1 * out["fusion"]

        self.loss_compiled = jax.jit(jax.value_and_grad(loss_side, argnums=(0, 1))).lower(
            self.hidden, self.head, self.batch).compile()
        self.loss_mem = self.loss_compiled.memory_analysis()

        self._recipe_steps(model_cfg, mesh, rules, opt_cfg)

    def _recipe_steps(self, model_cfg, mesh, rules, opt_cfg) -> None:
        """The CLM, paper and shipped steps on the same weights and batch (module docstring)."""
        import dataclasses

        from fusion_jax.config import loader as config_loader
        from fusion_jax.config.schema import TrainConfig
        from fusion_jax.fusion.losses import LossConfig
        from fusion_jax.train.step import abstract_state, init_state, jit_train_step, make_train_step

        jax = self.jax
        demo = config_loader.load(TrainConfig, str(ROOT / "configs" / "demo.yaml"))
        losses = {"clm": LossConfig(lm_weight=1.0), "paper": LossConfig(lm_weight=0.9),
                  "shipped": dataclasses.replace(demo.loss, chunk_size=self.a.chunk_size)}
        self.shipped_loss = config_loader.to_dict(demo.loss)
        sh = jax.NamedSharding(mesh, jax.P())
        self.recipes = {}
        for name, loss_cfg in losses.items():
            step_fn, opt = make_train_step(model_cfg, demo.fusion, loss_cfg, opt_cfg, 1000, rules)
            abstract = abstract_state(model_cfg, opt, mesh, rules)
            params = jax.tree.map(jax.numpy.copy, self.head_params)
            batch = dict(self.batch, teachers=[] if name == "clm" else self.batch["teachers"])
            spec = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), batch)
            with jax.set_mesh(mesh):
                compiled = jit_train_step(step_fn, abstract, spec, mesh).lower(init_state(params, opt, abstract),
                                                                               batch).compile()
            self.recipes[name] = [compiled, init_state(params, opt, abstract), batch]

    def recipe_step(self, name: str) -> float:
        r = self.recipes[name]
        t0 = time.perf_counter()
        r[1], m = r[0](r[1], r[2])
        float(m["loss"])
        return time.perf_counter() - t0

    def step(self) -> list[float]:
        self.state, m = self.compiled(self.state, self.batch)
        return [float(m["loss"]), float(m["clm"]), float(m["fusion"])]  # float() waits for the step

    def loss_side(self) -> float:
        value, grads = self.loss_compiled(self.hidden, self.head, self.batch)
        self.jax.block_until_ready(grads)
        return float(value)

    def finish(self) -> dict:
        release_freed_memory()
        peaks = []
        for _ in range(2):
            rss0 = reset_peak()
            self.loss_side()
            peaks.append(peak_since(rss0))
        a, V = self.a, self.V
        B, T, K, k = a.batch, a.seq, a.teachers, a.k
        C = a.chunk_size if 0 < a.chunk_size < T else T
        lm = self.loss_mem
        return {
            "compile_s": self.compile_s, "step_xla_temp": self.step_mem.temp_size_in_bytes,
            "loss_side_peak_rss": max(peaks), "loss_side_xla": lm.temp_size_in_bytes + lm.output_size_in_bytes,
            "loss_side_xla_temp": lm.temp_size_in_bytes, "loss_side_xla_out": lm.output_size_in_bytes,
            "devices": self.jax.device_count(), "shipped_loss": self.shipped_loss,
            "loss_side_analytic": {"fused_target_ids_probs": B * T * K * k * 8, "logits_chunk_fp32": 4 * B * C * V,
                                   "dlogits_chunk_fp32": 4 * B * C * V},
        }


def serve(a: argparse.Namespace) -> None:
    """Child process: set up one side, then obey the parent line by line on stdin (``step`` | ``loss`` |
    ``finish``), answering one JSON line each on stdout, so that the parent can alternate the two sides' steps."""
    out = sys.stdout
    sys.stdout = sys.stderr  # anything else printed goes to the log
    side = (Ours if a.side == "ours" else Baseline)(a)
    out.write("ready\n"), out.flush()
    rss0 = None
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t0 = time.perf_counter()
            losses = side.step()
            reply = {"s": time.perf_counter() - t0, "losses": losses}
            if rss0 is None:  # after the first step: the later steps' peak from here on
                rss0 = reset_peak()
        elif cmd.startswith("recipe "):
            reply = {"s": side.recipe_step(cmd.split()[1])}
        elif cmd == "loss":
            t0 = time.perf_counter()
            value = side.loss_side()
            reply = {"s": time.perf_counter() - t0, "value": value}
        elif cmd == "finish":
            reply = {"step_peak_rss": peak_since(rss0) if rss0 is not None else 0}
            reply.update(side.finish())
            reply["maxrss"] = maxrss()
        else:
            raise SystemExit(f"unknown command {cmd!r}")
        out.write(json.dumps(reply) + "\n"), out.flush()
        if cmd == "finish":
            return


# ------------------------------------------------------------------------------------------------ driver


def export_model(a: argparse.Namespace, out: Path) -> dict:
    """Our random init of the tiny Llama → a Hugging Face directory (both sides load it)."""
    import jax

    from fusion_jax.convert import checkpoint
    from fusion_jax.models import decoder
    from fusion_jax.config.model import ModelConfig

    cfg = ModelConfig(vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate,
                      num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads, compute_dtype="float32")
    params = decoder.init_params(cfg, jax.random.key(a.seed), std=0.02)
    checkpoint.save_hf(out, cfg, params, model_type="llama")
    return {"params": sum(int(x.size) for x in jax.tree.leaves(params))}


class Child:
    """One side in its own process (separate peak memory), driven line by line (see :func:`serve`)."""

    def __init__(self, side: str, model_dir: str, log: Path):
        argv = [sys.executable, __file__, "--side", side, "--model-dir", model_dir, *sys.argv[1:]]
        self.side, self.log = side, log
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(log, "w"),
                                     text=True)
        self._expect("ready")

    def _fail(self, what: str):
        self.proc.kill()
        sys.stderr.write(self.log.read_text()[-8000:])
        raise SystemExit(f"the {self.side} process failed ({what}); its log is above")

    def _expect(self, word: str) -> None:
        line = self.proc.stdout.readline().strip()
        if line != word:
            self._fail(f"expected {word!r}, got {line!r}")

    def __call__(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            self._fail(f"no answer to {cmd!r}")
        return json.loads(line)


def run_both(a: argparse.Namespace, model_dir: str, tmp: Path) -> tuple[dict, dict]:
    """Start both sides, then alternate them step by step (ours, baseline, ours, …) so that both see the same
    machine noise; the first ``--warmup`` steps of each are not timed."""
    ours, base = Child("ours", model_dir, tmp / "ours.log"), Child("baseline", model_dir, tmp / "baseline.log")
    res = {s: {"steps": [], "losses": [], "loss_s": []} for s in ("ours", "baseline")}
    for i in range(a.warmup + a.repeats):
        for name, c in (("ours", ours), ("baseline", base)):
            r = c("step")
            res[name]["losses"].append(r["losses"])
            if i >= a.warmup:
                res[name]["steps"].append(r["s"])
    recipes = {"clm": [], "paper": [], "shipped": []}
    for i in range(a.warmup + a.repeats):
        for name in recipes:
            s = ours(f"recipe {name}")["s"]
            if i >= a.warmup:
                recipes[name].append(s)
    res["ours"]["recipe_step_s"] = {name: statistics.median(v) for name, v in recipes.items()}
    for name, c in (("ours", ours), ("baseline", base)):
        c("loss")  # warm-up
    for _ in range(3):
        for name, c in (("ours", ours), ("baseline", base)):
            res[name]["loss_s"].append(c("loss")["s"])
    for name, c in (("ours", ours), ("baseline", base)):  # one at a time: each measures its own peak memory
        res[name].update(c("finish"))
        c.proc.wait()
    for r in res.values():
        r["step_s"], r["step_min_s"] = statistics.median(r["steps"]), min(r["steps"])
        r["loss_side_s"], r["loss_side_min_s"] = statistics.median(r["loss_s"]), min(r["loss_s"])
        r["losses"] = r["losses"][:2]
    return res["ours"], res["baseline"]


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="a Hugging Face Llama directory to use instead of the built model (sizes ignored)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--intermediate", type=int, default=344)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--k", type=int, default=10, help="candidates per position and teacher")
    p.add_argument("--teachers", type=int, default=3, help="teachers incl. the target (paper: base + 2 aligned)")
    p.add_argument("--onehot", type=float, default=0.4, help="share of one-hot rows of the aligned teachers")
    p.add_argument("--empty", type=float, default=0.05, help="share of empty rows of the aligned teachers")
    p.add_argument("--chunk-size", type=int, default=128, help="our loss.chunk_size (0: all positions at once)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="our compute dtype (the baseline runs fp32, like HF Llama's logits)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per side (alternating)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per side first")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side", choices=["ours", "baseline"], help=argparse.SUPPRESS)
    p.add_argument("--model-dir", help=argparse.SUPPRESS)
    return p.parse_args()


def mib(x: float) -> str:
    return f"{x / MiB:,.1f}"


def main() -> None:
    a = parse()
    if a.side:
        return serve(a)
    with tempfile.TemporaryDirectory() as tmp:
        if a.model:
            model_dir = a.model
            info = {}
        else:
            model_dir = str(Path(tmp) / "model")
            info = export_model(a, Path(model_dir))
        ours, base = run_both(a, model_dir, Path(tmp))
    cfg = json.loads((Path(model_dir) / "config.json").read_text()) if a.model else {}
    V = cfg.get("vocab_size", a.vocab)
    n = a.batch * a.seq
    ours_tps, base_tps = n / ours["step_s"], n / base["step_s"]
    ours_mem = max(ours["loss_side_peak_rss"], ours["loss_side_xla"])
    base_mem = base["loss_side_peak_rss"]
    small = dict(vocab=V, hidden=cfg.get("hidden_size", a.hidden), layers=cfg.get("num_hidden_layers", a.layers),
                 batch=a.batch, seq=a.seq, k=a.k, teachers=a.teachers, chunk_size=a.chunk_size, dtype=a.dtype,
                 onehot=a.onehot, empty=a.empty)
    print(f"config: {small}  params {info.get('params', 0) / 1e6:.2f}M, torch threads {base['threads']}, "
          f"jax devices {ours['devices']}, our compile {ours['compile_s']:.1f}s")
    print(f"losses step 1 / step 2 (total, clm, fusion): ours {ours['losses']}  baseline {base['losses']}")
    print(f"{'':34}{'median s/step':>14}{'tokens/s':>10}{'loss-side MiB':>15}{'step peak ΔRSS MiB':>20}"
          f"{'maxrss MiB':>12}")
    label = f"fusion_jax (jit, chunk {a.chunk_size})" if a.chunk_size else "fusion_jax (jit, unchunked)"
    print(f"{label:34}{ours['step_s']:14.3f}{ours_tps:10.0f}{mib(ours_mem):>15}"
          f"{mib(ours['step_peak_rss']):>20}{mib(ours['maxrss']):>12}")
    print(f"{'official (collator+HF+torch)':34}{base['step_s']:14.3f}{base_tps:10.0f}{mib(base_mem):>15}"
          f"{mib(base['step_peak_rss']):>20}{mib(base['maxrss']):>12}")
    print(f"{'ratio (ours vs baseline)':34}{'':14}{ours_tps / base_tps:10.2f}{base_mem / max(ours_mem, 1):>14.1f}x")
    print(f"{'ratio of the fastest steps':34}{'':14}{base['step_min_s'] / ours['step_min_s']:10.2f}"
          f"   (min s/step: ours {ours['step_min_s']:.3f}, baseline {base['step_min_s']:.3f})")
    print(f"{'baseline: collation (Python)':34}{base['collate_s']:14.3f}")
    print(f"{'baseline: model+losses+bwd+AdamW':34}{base['step_s'] - base['collate_s']:14.3f}"
          "   (median step − median collation)")
    print(f"{'loss side alone, ours':34}{ours['loss_side_s']:14.3f}   (min {ours['loss_side_min_s']:.3f}; fuse + "
          "logits + losses + backward to the hidden states)")
    print(f"{'loss side alone, baseline':34}{base['loss_side_s']:14.3f}   (min {base['loss_side_min_s']:.3f}; "
          "collation + "
          "logits + losses + backward to the hidden states)")
    print(f"loss side, ours: peak ΔRSS {mib(ours['loss_side_peak_rss'])} MiB; XLA temporaries "
          f"{mib(ours['loss_side_xla_temp'])} + outputs {mib(ours['loss_side_xla_out'])} MiB; by construction "
          + ", ".join(f"{k} {mib(v)}" for k, v in ours["loss_side_analytic"].items()) + " MiB")
    print(f"loss side, baseline: peak ΔRSS {mib(base_mem)} MiB; by construction "
          + ", ".join(f"{k} {mib(v)}" for k, v in base["loss_side_analytic"].items()) + " MiB")
    print(f"whole step, ours: XLA temporaries {mib(ours['step_xla_temp'])} MiB")
    rs = ours["recipe_step_s"]
    fusion_over_clm = {"paper": round(rs["paper"] / rs["clm"], 3), "shipped": round(rs["shipped"] / rs["clm"], 3)}
    print(f"fused step / CLM step (same model and batch, median s: clm {rs['clm']:.3f}, paper {rs['paper']:.3f}, "
          f"shipped {rs['shipped']:.3f}): paper {fusion_over_clm['paper']:.3f}, shipped {fusion_over_clm['shipped']:.3f}"
          f"  (shipped loss: {ours['shipped_loss']})")
    l_ours, l_base = ours["losses"][0][0], base["losses"][0][0]
    rel = abs(l_ours - l_base) / abs(l_base)
    ok_speed = ours_tps / base_tps >= 2.0
    ok_mem = ours_mem * 10 <= base_mem
    print(f"step-1 loss: ours {l_ours:.6f} vs baseline {l_base:.6f} (rel. diff {rel:.1e}); "
          f"acceptance: tokens/s ≥ 2× {'PASS' if ok_speed else 'FAIL'}, loss-side memory ≤ 1/10 "
          f"{'PASS' if ok_mem else 'FAIL'}")
    result = {"metric": "fusion_train_step_tokens_per_s_vs_official_fusellm", "unit": "tokens/s",
              "ours": round(ours_tps, 1), "baseline": round(base_tps, 1), "ratio": round(ours_tps / base_tps, 3),
              "loss_side_bytes": {"ours": ours_mem, "baseline": base_mem,
                                  "ratio_baseline_over_ours": round(base_mem / max(ours_mem, 1), 2)},
              "step_peak_rss_bytes": {"ours": ours["step_peak_rss"], "baseline": base["step_peak_rss"]},
              "maxrss_bytes": {"ours": ours["maxrss"], "baseline": base["maxrss"]},
              "ratio_min_step": round(base["step_min_s"] / ours["step_min_s"], 3),
              "baseline_collate_s": round(base["collate_s"], 4), "step1_loss": {"ours": l_ours, "baseline": l_base},
              "fusion_over_clm_step": fusion_over_clm, "shipped_loss": ours["shipped_loss"],
              "pass": {"speed_2x": ok_speed, "memory_10x": ok_mem}, "config": small}
    print(json.dumps(result))
    if rel > 1e-3 and a.dtype == "float32":
        raise SystemExit(f"FAIL: step-1 losses differ by {rel:.1e} > 1e-3: the two sides do not compute the same step")


if __name__ == "__main__":
    main()
