"""GPU check: the fusion train step of a ~1B Llama-style target with two teachers of other tokenizers and families,
online (teachers inside the step) vs cached (captured first), on one GPU — step time, tokens/s, MFU, peak memory.

Everything is made at run time, nothing is downloaded: a corpus from the running Python's standard library
(``fusion_jax.experiments.demo.corpus``), three tokenizers trained on it (``fusion_jax.experiments.demo.tokenizers``: a Llama-2-style
SentencePiece BPE for the target, a byte-level BPE for the MPT-style teacher, a byte-level BPE with single digits for
the GPT-NeoX-style teacher), three randomly initialised models in our format (quality does not matter here, only
speed and memory), then ``fusion_jax.pipeline.main`` — what users run — with a ``TrainConfig`` built here:

* **online**: both teachers ``mode: online``: their forwards run inside the jitted step;
* **cached**: both teachers captured over the documents first (``pipeline.capture_stage``, timed on its own), then
  the same training reading the caches.

Each phase runs in its own process (``--phase setup | capture | online | cached``), so that each has its own peak
device memory (``memory_stats()['peak_bytes_in_use']``; null where the backend has none, e.g. the CPU) and the
driver process never touches the device. Step time / tokens/s / MFU are the medians over the steps after the first
2 of ``<run>/metrics.jsonl`` (``tokens_per_s`` and ``mfu`` as ``fusion_jax/train/loop.py`` logs them: MFU from
``train.step.flops_per_token`` and ``train.metrics.PEAK_FLOPS`` by device kind, H100/H200 989e12 dense bf16; ``--peak-flops``
overrides); MFU counts the target's training FLOPs only, so online also reports ``mfu_with_teachers`` (plus the
teachers' forward FLOPs, ``teacher_forward_flops_per_token`` = their forward per source position × Ts / T). The
target's validation split is empty (no evaluation cost), checkpoints go to ``--workdir`` and are
removed after each mode (``experiment.main`` always saves the final step), export is off.

Output: ``#``-prefixed progress lines, then one JSON object per mode (``{"mode": "online", ...}``,
``{"mode": "cached", ...}``) and a final summary JSON line with ``cached_over_online_tokens_per_s``.

    bash bench/gpu_check.sh                      # the full size on one H100/H200 (creates its own venv first)
    python bench/gpu_check.py --tiny             # a few steps of tiny models at T=64, on CPU (tests/test_gpu_check.py)
    python bench/gpu_check.py --plan             # sizes, parameter counts and phases; imports no JAX

Full size (the defaults): target Llama-style hidden 2048, 18 layers, 16 heads (MHA, head dim 128), intermediate 5504,
vocab 32000, untied: **1,041,836,032 params**, float32 master weights + AdamW, bf16 compute, remat full, loss in chunks
of 512 positions. TeacherRows (bf16, frozen): MPT-style hidden 1536, 16 layers, 16 heads, intermediate 6144, vocab 40960,
tied, ALiBi: **515,950,080 params**; GPT-NeoX-style (Pythia-410M's layout) hidden 1024, 24 layers, 16 heads,
intermediate 4096, vocab 36864, untied, parallel residual, rotary 0.25: **377,808,896 params**. (Each model's vocab is
capped at what its tokenizer reached: the byte-level BPEs reach ≈ 46–49k ids on Python 3.11's library, so these sizes
hold; the setup line prints the counts actually built.) Batch 16 × 2048 tokens, 12 steps per mode; 96 stdlib texts cut
to 9000 bytes, split by ``prepare`` at 2000 tokens → ≈ 119 documents, ≈ 74k target tokens (the loader repeats them);
online teachers get Ts = 2 × 2048 source tokens per block (the project's default: these byte-level tokenizers need
≈ 1.4 source tokens per target token on this text (measured); what does not fit falls back and is counted in
``src_overflow_tokens_max_per_batch``). Loader in the training process (``--workers 0``): measured on a busy 2-core CPU,
0.10 s (cached) / 0.24 s (online) per 8 × 2048 batch (``loader_s_per_batch`` reports it per run), well under a step.

ESTIMATE (not measured — no GPU was available when this was written) for the full size on one H200, bare machine:
  venv + pip install -e '.[cuda]'  ~1–3 min with PyPI (jax[cuda12] pulls ≈ 3 GB of CUDA wheels); ~15 s to fail
                                   without it (the fallback then uses the image's own packages; see gpu_check.sh)
  setup (corpus, 3 tokenizers ≈ 15 s, 3 random inits + saves ≈ 20 s, prepare ≈ 3 s)               ~45–60 s
  capture (2 teachers × (load ≈ 5 s + compile ≈ 20–30 s + 119 documents in 8 batches ≈ 3 s))      ~60–80 s
  online  (load ≈ 10 s, compile ≈ 60–120 s, 12 steps × ≈ 1.1–1.6 s, final checkpoint 12.5 GB ≈ 15 s)  ~2–3 min
  cached  (load ≈ 5 s, compile ≈ 45–90 s, 12 steps × ≈ 0.7–1.0 s, final checkpoint ≈ 15 s)            ~1.5–2 min
  total ≈ 5.5–7 min after the install (the driver stops each phase at ``--phase-timeout``, 420 s).
  Expected step: flops_per_token = 6.76e9, 32768 tokens per step → 2.2e14 FLOP; at 30–40 % of 989e12 (remat full
  recomputes the forward: +1/3 that MFU does not count) ≈ 0.55–0.75 s + the step's overheads, i.e. ~35–50k tokens/s
  cached; the online teachers add 5.03 GFLOP per target token of forward (MPT 2.87 + NeoX 2.16: 4096 source
  positions per 2048-token block, the [Ts, Ts] attention included) = 0.56 × the target's 9.0 with remat, plus their
  top-k over ≈ 40k ids → cached/online ≈ 1.4–1.8.
  Peak memory: ≈ 12.5 GB state + 4 GB gradients + 2 GB bf16 params + ≈ 15–25 GB activations (remat full; XLA
  attention materialises [16, 16, 2048, 2048] float32 scores of one layer, 4.3 GB) → ~35–50 GB cached; online adds
  ≈ 1.8 GB of teacher params and the teachers' forward at Ts = 4096 ([16, 16, 4096, 4096] scores, 17 GB per layer,
  plus MPT's ALiBi bias) → ~55–75 GB; of ≈ 128 GB XLA may use (XLA_PYTHON_CLIENT_MEM_FRACTION=0.92): batch 16 is
  comfortable; --batch 24 may fit; --attention cudnn (flash attention) would shrink both, untested here. Should
  online run out of memory: --accum 2 (the teachers then run per micro-batch) or --src-seq-len 3072.
  A rerun on the same machine reuses the compiled programs (JAX_COMPILATION_CACHE_DIR under the temp dir), so its
  first_step_s drops; the per-step numbers do not change.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULT = "GPU_CHECK_RESULT "  # a child's result line on stdout
# The tokenizers train on whole stdlib files up to this size (more text: the byte-level BPEs reach ≈ 46–49k ids from
# Python 3.11's library; the fusion documents are cut to --doc-bytes separately).
TOKENIZER_DOC_BYTES = 400_000
PHASES = ("setup", "capture", "online", "cached")

# Model shapes per role: (architecture, tokenizer style, sizes). The family conventions are demo.build.model_config's.
FULL_MODELS = {
    "target": "hidden=2048,layers=18,heads=16,intermediate=5504,vocab=32000",
    "mpt": "hidden=1536,layers=16,heads=16,intermediate=6144,vocab=40960",
    "neox": "hidden=1024,layers=24,heads=16,intermediate=4096,vocab=36864",
}
TINY_MODELS = {
    "target": "hidden=64,layers=2,heads=4,intermediate=172,vocab=512",
    "mpt": "hidden=48,layers=2,heads=4,intermediate=192,vocab=448",
    "neox": "hidden=32,layers=2,heads=4,intermediate=128,vocab=384",
}
ROLES = {  # role → (HF family, demo tokenizer style, what its tokenizer is trained on)
    "target": ("llama", "sentencepiece", "mix"),
    "mpt": ("mpt", "byte_level", "mix"),
    "neox": ("gpt_neox", "byte_level_digits", "mix"),
}
FULL = dict(batch=16, seq=2048, steps=12, docs=96, max_tokens=2000, doc_bytes=9000, src_seq_len=0, remat="full",
            chunk_size=512, workers=0, capture_batch=16, tok_code_bytes=8_000_000, tok_prose_bytes=1_200_000,
            compute_dtype="bfloat16", teacher_dtype="bfloat16", phase_timeout=420, loader_probe=3)
TINY = dict(batch=4, seq=64, steps=4, docs=24, max_tokens=60, doc_bytes=400, src_seq_len=0, remat="none",
            chunk_size=0, workers=0, capture_batch=8, tok_code_bytes=60_000, tok_prose_bytes=60_000,
            compute_dtype="float32", teacher_dtype="float32", phase_timeout=120, loader_probe=2)


# ------------------------------------------------------------------------------------------------ sizes


def parse_sizes(spec: str) -> dict[str, int]:
    keys = ("hidden", "layers", "heads", "intermediate", "vocab")
    out = {}
    for part in filter(None, spec.split(",")):
        k, _, v = part.partition("=")
        if k.strip() not in keys:
            raise SystemExit(f"model size {part!r}: keys are {keys}")
        out[k.strip()] = int(v)
    missing = [k for k in keys if k not in out]
    if missing:
        raise SystemExit(f"model size {spec!r} lacks {missing}")
    return out


def model_fields(role: str, s: dict[str, int]) -> dict:
    """ModelConfig fields of a role (plain values, so that --plan needs no JAX): the family conventions of
    ``fusion_jax.experiments.demo.build.model_config`` with the intermediate size given explicitly."""
    common = dict(vocab_size=s["vocab"], hidden_size=s["hidden"], num_layers=s["layers"], num_heads=s["heads"],
                  num_kv_heads=s["heads"], intermediate_size=s["intermediate"])
    arch = ROLES[role][0]
    if arch == "llama":
        return dict(common, norm="rms", norm_eps=1e-5, mlp="gated", activation="silu")
    if arch == "mpt":
        return dict(common, norm="layer", norm_eps=1e-5, mlp="plain", activation="gelu", tie_embeddings=True,
                    position="alibi")
    return dict(common, norm="layer", norm_bias=True, norm_eps=1e-5, mlp="plain", activation="gelu", mlp_bias=True,
                qkv_bias=True, out_bias=True, parallel_residual=True, rotary_fraction=0.25)


def param_count(f: dict) -> int:
    """Parameters of a model of these ModelConfig fields (the layout of ``decoder.param_specs``; checked against the
    real params in the setup phase)."""
    h, v, i, n = f["hidden_size"], f["vocab_size"], f["intermediate_size"], f["num_layers"]
    hd = h // f["num_heads"]
    q = h * f["num_heads"] * hd
    kv = 2 * h * f["num_kv_heads"] * hd
    layer = q + kv + f["num_heads"] * hd * h + h * i * (3 if f.get("mlp") == "gated" else 2)
    if f.get("qkv_bias"):
        layer += f["num_heads"] * hd + 2 * f["num_kv_heads"] * hd
    if f.get("out_bias"):
        layer += h
    if f.get("mlp_bias"):
        layer += i * (2 if f.get("mlp") == "gated" else 1) + h
    norm = h * (2 if f.get("norm_bias") else 1)
    layer += 2 * norm
    return n * layer + norm + v * h * (1 if f.get("tie_embeddings") else 2)


def flops_per_token(f: dict, seq_len: int) -> float:
    """``train_step.flops_per_token`` (duplicated for --plan; the run uses the real one)."""
    h, hd = f["hidden_size"], f["hidden_size"] // f["num_heads"]
    attn = h * hd * (f["num_heads"] * 2 + f["num_kv_heads"] * 2)
    mlp = h * f["intermediate_size"] * (3 if f.get("mlp") == "gated" else 2)
    return 6.0 * (f["num_layers"] * (attn + mlp) + h * f["vocab_size"]) + 12.0 * f["num_layers"] * f["num_heads"] * hd \
        * seq_len


# ------------------------------------------------------------------------------------------------ arguments


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="tiny models, T=64, a few steps: the CPU test size")
    p.add_argument("--plan", action="store_true", help="print sizes, parameter counts and phases, then stop (no JAX)")
    p.add_argument("--modes", default="online,cached", help="which modes, in order")
    p.add_argument("--batch", type=int, help="blocks per step (full 16, tiny 4)")
    p.add_argument("--seq", type=int, help="tokens per block (full 2048, tiny 64)")
    p.add_argument("--steps", type=int, help="optimizer steps per mode; the median skips the first 2 (full 12, tiny 4)")
    p.add_argument("--docs", type=int, help="corpus documents (stdlib texts; prepare splits the long ones)")
    p.add_argument("--max-tokens", type=int, help="prepare: longest document piece in tokens of any tokenizer")
    p.add_argument("--doc-bytes", type=int, help="stdlib texts are cut to this many bytes first")
    p.add_argument("--src-seq-len", type=int, help="online: source tokens per block, Ts (0: 2 × --seq, the project's "
                   "default); blocks whose source text is longer fall back there and are counted (src_overflow)")
    p.add_argument("--accum", type=int, default=1, help="optimizer.accumulation (micro-batches per step)")
    p.add_argument("--remat", choices=["none", "full", "dots", "dots_no_batch"], help="the target's remat policy")
    p.add_argument("--chunk-size", type=int, help="loss.chunk_size: positions of logits at a time (0: all)")
    p.add_argument("--attention", choices=["xla", "cudnn", "auto"], default="xla",
                   help="every model's attention_impl (xla: what converted checkpoints get)")
    p.add_argument("--k", type=int, default=10, help="candidates per position and teacher")
    p.add_argument("--workers", type=int, help="loader.worker_count (grain processes; 0: in the training process)")
    p.add_argument("--loader-probe", type=int, help="after training, time building this many batches in "
                   "the training process alone (0: skip)")
    p.add_argument("--capture-batch", type=int, help="capture.batch_size")
    p.add_argument("--compute-dtype", choices=["bfloat16", "float32"], help="the target's compute dtype (teachers: "
                   "bf16 params and compute at full size, float32 at --tiny)")
    p.add_argument("--teacher-dtype", choices=["bfloat16", "float32"], help="the teachers' params and compute "
                   "(capture.param_dtype / compute_dtype; the saved inits too)")
    p.add_argument("--target", help="target (Llama-style) sizes: hidden=,layers=,heads=,intermediate=,vocab=")
    p.add_argument("--mpt", help="MPT-style teacher sizes")
    p.add_argument("--neox", help="GPT-NeoX-style teacher sizes")
    p.add_argument("--tok-code-bytes", type=int, help="stdlib code bytes the tokenizers train on")
    p.add_argument("--tok-prose-bytes", type=int, help="stdlib prose bytes the tokenizers train on")
    p.add_argument("--peak-flops", type=float, default=0.0, help="peak FLOP/s per device for MFU (0: by device kind)")
    p.add_argument("--phase-timeout", type=int, help="seconds each phase may run before the driver stops it")
    p.add_argument("--workdir", help="where the assets and runs go (default: a new temporary directory)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json-out", help="also write the mode results and the summary to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--phase", choices=PHASES, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    base = TINY if a.tiny else FULL
    for k, v in base.items():
        if getattr(a, k) is None:
            setattr(a, k, v)
    models = TINY_MODELS if a.tiny else FULL_MODELS
    for role in ROLES:
        if getattr(a, role) is None:
            setattr(a, role, models[role])
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    bad = [m for m in a.modes if m not in ("online", "cached")]
    if bad or not a.modes:
        p.error(f"--modes: online and/or cached, got {a.modes}")
    if a.steps < 3:
        p.error("--steps must be >= 3 (the median skips the first 2)")
    if a.batch % a.accum:
        p.error(f"--batch ({a.batch}) must be a multiple of --accum ({a.accum})")
    return a


def fields(a: argparse.Namespace) -> dict[str, dict]:
    return {role: model_fields(role, parse_sizes(getattr(a, role))) for role in ROLES}


def capture_seq_len(a) -> int:
    """capture.seq_len: every document piece + EOS in one row; a multiple of 64 above max_tokens."""
    return (a.max_tokens + 1 + 63) // 64 * 64


def plan(a: argparse.Namespace) -> dict:
    f = fields(a)
    return {
        "size": "tiny" if a.tiny else "full",
        "models": {role: {"family": ROLES[role][0], "tokenizer": ROLES[role][1], "params": param_count(f[role]),
                          **{k: f[role][k] for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                     "vocab_size")}} for role in ROLES},
        "batch": a.batch, "seq": a.seq, "tokens_per_step": a.batch * a.seq, "steps": a.steps, "modes": a.modes,
        "docs": a.docs, "max_tokens": a.max_tokens, "src_seq_len": a.src_seq_len or 2 * a.seq,
        "accumulation": a.accum, "remat": a.remat, "loss_chunk_size": a.chunk_size, "attention": a.attention,
        "compute_dtype": a.compute_dtype, "k": a.k, "loader_workers": a.workers,
        "capture": {"seq_len": capture_seq_len(a), "batch_size": a.capture_batch},
        "target_flops_per_token": flops_per_token(f["target"], a.seq),
        "phases": ["setup: stdlib corpus, 3 tokenizers, 3 random inits, prepare the documents",
                   *(["capture: both teachers over the documents (pipeline.capture_stage)"] if "cached" in a.modes
                     else []),
                   *[f"{m}: experiment.main, {a.steps} steps" for m in a.modes]],
    }


# ------------------------------------------------------------------------------------------------ children


def _child_env(tiny: bool) -> None:
    """Before JAX starts: one host device on CPU (the tests' 8 fake devices would split the batch), no hub, and on
    a GPU most of its memory for XLA's pool (peak_bytes_in_use is what the step used, not the pool)."""
    os.environ["XLA_FLAGS"] = re.sub(r"--xla_force_host_platform_device_count=\d+", "",
                                     os.environ.get("XLA_FLAGS", "")).strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
    if not tiny:  # a rerun on the same machine skips the compiles (first_step_s then says so: it drops)
        os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "fusion_gpu_check_xla"))


def _peak_bytes() -> int | None:
    import jax

    stats = jax.devices()[0].memory_stats()
    return int(stats["peak_bytes_in_use"]) if stats and "peak_bytes_in_use" in stats else None


def _device() -> dict:
    import jax

    d = jax.devices()[0]
    return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count(),
            "jax": jax.__version__}


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


def phase_setup(a, work: Path) -> dict:
    """Corpus, tokenizers, random inits (our format, bf16), prepared documents."""
    import jax

    from fusion_jax import pipeline
    from fusion_jax.convert import checkpoint
    from fusion_jax.convert.architectures import architecture
    from fusion_jax.experiments.demo import tokenizers as demo_tok
    from fusion_jax.experiments.demo.corpus import write_stdlib_corpus
    from fusion_jax.models import decoder
    from fusion_jax.config.model import ModelConfig
    from fusion_jax.tokenizers import load_tokenizer

    t0 = time.perf_counter()
    times = {}
    corpus = work / "corpus"
    summary = write_stdlib_corpus(corpus, code_bytes=a.tok_code_bytes, prose_bytes=a.tok_prose_bytes,
                                  max_document_bytes=max(a.doc_bytes, TOKENIZER_DOC_BYTES), seed=a.seed)
    texts = {d: [json.loads(line)["text"] for line in (corpus / f"{d}.jsonl").read_text().splitlines()]
             for d in ("code", "prose")}
    texts["mix"] = texts["code"] + texts["prose"]
    times["corpus_s"] = time.perf_counter() - t0

    t = time.perf_counter()
    f = fields(a)
    toks = {}
    for role, (arch, style, domain) in ROLES.items():
        out = work / "tokenizers" / role
        if style == "sentencepiece":
            demo_tok.train_sentencepiece_bpe(texts[domain], out, f[role]["vocab_size"])
        else:
            demo_tok.train_byte_level_bpe(texts[domain], out, f[role]["vocab_size"],
                                          split_digits=style == "byte_level_digits")
        toks[role] = out
        # The model's vocab is its tokenizer's: the cached path refuses top-k ids the tokenizer cannot map
        # (align.transfer), and a random model's padded embedding rows reach the top-k as often as real ones.
        f[role]["vocab_size"] = min(f[role]["vocab_size"], load_tokenizer(out).vocab_size)
    times["tokenizers_s"] = time.perf_counter() - t

    # The fusion corpus: the first docs texts, code and prose interleaved, each cut at a line boundary.
    from fusion_jax.experiments.demo.corpus import cut_at_line

    recs = [json.loads(line) for d in ("code", "prose") for line in (corpus / f"{d}.jsonl").read_text().splitlines()]
    code = [r for r in recs if r["domain"] == "code"]
    prose = [r for r in recs if r["domain"] == "prose"]
    picked = [r for pair in zip(code, prose) for r in pair][: a.docs]
    mix = work / "fusion_corpus.jsonl"
    mix.write_text("".join(json.dumps({**r, "text": cut_at_line(r["text"], a.doc_bytes)}) + "\n" for r in picked))

    t = time.perf_counter()
    models, params_count, tok_vocab = {}, {}, {}
    for i, (role, (arch, _, _)) in enumerate(ROLES.items()):
        tv = load_tokenizer(toks[role]).vocab_size
        tok_vocab[role] = tv
        # Saved in bf16 at every size (half the disk; the target is read back as float32 master weights, the
        # teachers as capture.param_dtype), so --tiny goes through the same casts as the full size.
        cfg = ModelConfig(**f[role], param_dtype="bfloat16", compute_dtype=a.teacher_dtype,
                          attention_impl=a.attention)
        cfg.validate()
        hf_config = {**architecture(arch).config_to_hf(cfg), "max_position_embeddings": max(a.seq, a.src_seq_len,
                                                                                            2 * a.seq)}
        # unsafe_rbg: XLA's RngBitGenerator compiles in a third of threefry's time; the numbers do not matter here
        params = jax.jit(decoder.init_params, static_argnums=0)(cfg, jax.random.key(a.seed * 1000 + i,
                                                                                    impl="unsafe_rbg"))
        params_count[role] = sum(int(x.size) for x in jax.tree.leaves(params))
        if params_count[role] != param_count(f[role]):
            raise AssertionError(f"{role}: {params_count[role]} params, the plan's formula says "
                                 f"{param_count(f[role])}")
        models[role] = checkpoint.save(work / "models" / role, cfg, params, model_type=arch, hf_config=hf_config,
                                       tokenizer_dir=toks[role], overwrite=True)
        del params
    times["init_save_s"] = time.perf_counter() - t

    t = time.perf_counter()
    cfg = train_config(a, work, {"target": str(models["target"]), "mpt": str(models["mpt"]),
                                 "neox": str(models["neox"])}, mode="cached", documents="", corpus=str(mix))
    documents = pipeline.documents_stage(dataclasses.replace(cfg, run_dir=str(work / "prepare")))
    times["prepare_s"] = time.perf_counter() - t
    from fusion_jax.data.documents import DocumentStore

    store = DocumentStore(documents, "train")
    n_tokens = {}
    for role in ROLES:
        tok = load_tokenizer(toks[role])
        n_tokens[role] = sum(len(tok.encode(doc.text).ids) for doc in store)
    times["total_s"] = time.perf_counter() - t0
    return {"phase": "setup", "device": _device(), "models": {r: str(p) for r, p in models.items()},
            "documents": documents, "train_documents": len(store), "tokens": n_tokens,
            "source_tokens_per_target_token": {r: n_tokens[r] / max(n_tokens["target"], 1) for r in ("mpt", "neox")},
            "tokenizer_vocab": tok_vocab, "params": params_count,
            "model_sizes": {r: {k: f[r][k] for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size",
                                                    "vocab_size")} for r in ROLES},
            "corpus": summary["domains"], "times": times}


def train_config(a, work: Path, models: dict, mode: str, documents: str, corpus: str = ""):
    from fusion_jax.config import schema
    from fusion_jax.data.corpus import CorpusConfig
    from fusion_jax.fusion.fuse import FusionConfig
    from fusion_jax.fusion.losses import LossConfig
    from fusion_jax.mesh import MeshConfig
    from fusion_jax.train.optim import OptimizerConfig

    teacher_dtype = a.teacher_dtype
    sources = tuple(schema.TeacherConfig(name=role, checkpoint=models[role], mode=mode, seq_len=a.src_seq_len)
                    for role in ("mpt", "neox"))
    data = schema.DataConfig(documents=documents, max_tokens=a.max_tokens, validation_fraction=0.0,
                            corpus=CorpusConfig(format="jsonl", paths=(corpus,), id_field="id",
                                                domain_field="domain") if corpus else CorpusConfig())
    return schema.TrainConfig(
        run_dir=str(work / "runs" / mode), cache_dir=str(work / "cache"), target=models["target"],
        target_as_teacher=False, param_dtype="float32", compute_dtype=a.compute_dtype, sources=sources, data=data,
        capture=schema.CaptureSettings(k=a.k, seq_len=capture_seq_len(a), batch_size=a.capture_batch,
                                      docs_per_shard=256, param_dtype=teacher_dtype, compute_dtype=teacher_dtype),
        loader=schema.LoaderConfig(seq_len=a.seq, global_batch_size=a.batch, k=a.k, worker_count=a.workers,
                                  seed=a.seed, cache_dir=str(work / "loader_cache")),
        fusion=FusionConfig(), loss=LossConfig(lm_weight=0.9, chunk_size=a.chunk_size),
        optimizer=OptimizerConfig(learning_rate=1e-5, warmup_ratio=0.0, accumulation=a.accum),
        train=schema.LoopConfig(steps=a.steps, checkpoint_every=a.steps, keep_checkpoints=1, log_every=1,
                               eval_every=0, eval_batches=1, peak_flops=a.peak_flops, export=False, progress=False),
        remat=a.remat, mesh=MeshConfig(data=1, fsdp=-1),
    )


def phase_capture(a, work: Path, setup: dict) -> dict:
    from fusion_jax import pipeline

    cfg = train_config(a, work, setup["models"], "cached", setup["documents"])
    t = time.perf_counter()
    pipeline.capture_stage(cfg, setup["documents"])
    return {"phase": "capture", "capture_s": time.perf_counter() - t, "peak_bytes_in_use": _peak_bytes(),
            "teachers": ["mpt", "neox"]}


def phase_train(a, work: Path, setup: dict, mode: str) -> dict:
    from fusion_jax.experiments import run as experiment
    from fusion_jax.convert import checkpoint
    from fusion_jax.train.metrics import peak_flops as device_peak_flops
    from fusion_jax.train.step import flops_per_token as fpt

    cfg = train_config(a, work, setup["models"], mode, setup["documents"])
    run = Path(cfg.run_dir)
    if run.exists():
        shutil.rmtree(run)
    t = time.perf_counter()
    report = experiment.main(cfg)
    wall = time.perf_counter() - t
    peak = _peak_bytes()
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x["kind"] == "train"]
    timed = steps[2:]
    tps = statistics.median(x["tokens_per_s"] for x in timed)
    tokens = a.batch * a.seq
    mfus = [x["mfu"] for x in timed if _finite(x["mfu"]) is not None]
    model_cfg = checkpoint.model_config(cfg.target)
    overflow = {}
    for x in steps:
        for name, n in (x.get("src_overflow") or {}).items():
            overflow[name] = max(overflow.get(name, 0), n)
    shutil.rmtree(run / "checkpoints", ignore_errors=True)
    loader_s = loader_probe(a, cfg) if a.loader_probe else None
    # MFU counts the target's training FLOPs only. Online, the teachers' forwards run in the step too: their FLOPs
    # per target token = forward (flops_per_token / 3) per source position × Ts / T, for a utilisation of both.
    teacher_fpt = None
    if mode == "online":
        Ts = a.src_seq_len or 2 * a.seq
        teacher_fpt = sum(fpt(checkpoint.model_config(setup["models"][r]), Ts) / 3 * Ts / a.seq
                          for r in ("mpt", "neox"))
    peak_flops = device_peak_flops(cfg)
    return {
        "mode": mode, "device": _device(), "steps": len(steps), "timed_steps": len(timed),
        "batch": a.batch, "seq": a.seq, "tokens_per_step": tokens,
        "step_s": tokens / tps, "tokens_per_s": tps, "step_s_min": tokens / max(x["tokens_per_s"] for x in timed),
        "mfu": statistics.median(mfus) if mfus else None,
        "peak_flops": peak_flops or None, "flops_per_token": fpt(model_cfg, a.seq),
        "teacher_forward_flops_per_token": teacher_fpt,
        "mfu_with_teachers": (tps * (fpt(model_cfg, a.seq) + teacher_fpt) / peak_flops
                              if teacher_fpt is not None and peak_flops else None),
        "peak_bytes_in_use": peak, "peak_gib": round(peak / 2**30, 2) if peak is not None else None,
        "first_step_s": tokens / steps[0]["tokens_per_s"],  # compile + first step (+ the loader's first batch)
        "train_main_s": wall, "loss_first_last": [steps[0]["loss"], steps[-1]["loss"]],
        "src_overflow_tokens_max_per_batch": overflow or None,
        # host work per batch, built synchronously in this process (no prefetch, no workers): with W workers the
        # loader keeps up while loader_s_per_batch / max(W, 1) < step_s
        "loader_s_per_batch": loader_s, "loader_workers": a.workers,
        "params": setup["params"], "remat": a.remat, "accumulation": a.accum, "attention": a.attention,
        "compute_dtype": a.compute_dtype, "final_loss_finite": math.isfinite(report["train"]["loss"]),
    }


def loader_probe(a, cfg) -> float:
    """Median seconds to build one batch of the train loader in this process (a fresh loader: documents encoded
    and transferred anew, as after its document LRU is cold)."""
    from fusion_jax import pipeline
    from fusion_jax.data.loader import FusionLoader

    loader = FusionLoader(pipeline.loader_config(cfg, pipeline.teacher_list(cfg), "train"), cfg.data.documents,
                          cfg.target, split="train", progress=False)
    times = []
    for i in range(a.loader_probe):
        t = time.perf_counter()
        loader.local_batch(i)
        times.append(time.perf_counter() - t)
    loader.close()
    return statistics.median(times)


def run_phase(a) -> None:
    _child_env(a.tiny)
    import logging

    logging.basicConfig(level=logging.WARNING)
    work = Path(a.workdir)
    if a.phase == "setup":
        out = phase_setup(a, work)
        (work / "setup.json").write_text(json.dumps(out, indent=1))
    else:
        setup = json.loads((work / "setup.json").read_text())
        out = phase_capture(a, work, setup) if a.phase == "capture" else phase_train(a, work, setup, a.phase)
    sys.stdout.write(RESULT + json.dumps(out, default=float) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------------------------------ driver


def child(a, phase: str, argv: list[str], log: Path) -> dict:
    """Run one phase in its own process; its output goes to ``log`` (and the last lines to stderr on failure)."""
    cmd = [sys.executable, __file__, *argv, "--phase", phase, "--workdir", a.workdir]
    t = time.perf_counter()
    with open(log, "w") as f:
        try:
            proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, timeout=a.phase_timeout)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
            sys.stderr.write(log.read_text()[-6000:])
            raise SystemExit(f"gpu_check: phase {phase} ran past --phase-timeout={a.phase_timeout}s (log above; "
                             f"stdout: {out[-500:]!r})")
    results = [line[len(RESULT):] for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not results:
        sys.stderr.write(log.read_text()[-8000:])
        raise SystemExit(f"gpu_check: phase {phase} failed (exit {proc.returncode}); its log is above")
    out = json.loads(results[-1])
    out["phase_wall_s"] = time.perf_counter() - t
    return out


def say(msg: str) -> None:
    print(f"# {msg}", flush=True)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    a = parse(argv)
    if a.phase:
        return run_phase(a)
    p = plan(a)
    if a.plan:
        print(json.dumps(p, indent=1))
        return
    argv = [x for x in argv if x != "--keep"]
    work_created = a.workdir is None
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="fusion_gpu_check_")
    Path(a.workdir).mkdir(parents=True, exist_ok=True)
    argv = _without(argv, "--workdir")
    say(f"gpu_check ({p['size']}), planned: target {p['models']['target']['params']:,} params, teachers mpt "
        f"{p['models']['mpt']['params']:,} / neox {p['models']['neox']['params']:,}; B={a.batch} T={a.seq} "
        f"steps={a.steps} modes={a.modes}; workdir {a.workdir}")
    t0 = time.perf_counter()
    logs = Path(a.workdir) / "logs"
    logs.mkdir(exist_ok=True)
    results, phases = {}, {}
    try:
        setup = child(a, "setup", argv, logs / "setup.log")
        phases["setup"] = setup
        say(f"setup {setup['phase_wall_s']:.1f}s on {setup['device']['device_kind']} ({setup['device']['platform']}): "
            f"params {json.dumps(setup['params'])} (teachers' vocab = their trained tokenizers' "
            f"{json.dumps(setup['tokenizer_vocab'])}); "
            f"{setup['train_documents']} documents, target tokens {setup['tokens']['target']:,}; source tokens per "
            f"target token {json.dumps({k: round(v, 3) for k, v in setup['source_tokens_per_target_token'].items()})};"
            f" times {json.dumps({k: round(v, 1) for k, v in setup['times'].items()})}")
        for mode in a.modes:
            if mode == "cached":
                cap = child(a, "capture", argv, logs / "capture.log")
                phases["capture"] = cap
                say(f"capture {cap['capture_s']:.1f}s (phase {cap['phase_wall_s']:.1f}s), peak "
                    f"{cap['peak_bytes_in_use']}")
            r = child(a, mode, argv, logs / f"{mode}.log")
            if mode == "cached":
                r["capture_s"] = phases["capture"]["capture_s"]
                r["capture_peak_bytes_in_use"] = phases["capture"]["peak_bytes_in_use"]
            r["plan"] = {k: p[k] for k in ("src_seq_len", "loss_chunk_size", "k", "loader_workers")}
            results[mode] = {k: (_finite(v) if isinstance(v, float) else v) for k, v in r.items()}
            print(json.dumps(results[mode]), flush=True)
    finally:
        if not a.keep and work_created:
            shutil.rmtree(a.workdir, ignore_errors=True)
    summary = {"summary": "gpu_check", "size": p["size"], "device": setup["device"],
               "params": setup["params"], "batch": a.batch, "seq": a.seq, "steps": a.steps,
               "tokens_per_s": {m: results[m]["tokens_per_s"] for m in results},
               "step_s": {m: results[m]["step_s"] for m in results},
               "mfu": {m: results[m]["mfu"] for m in results},
               "mfu_with_teachers": {m: results[m]["mfu_with_teachers"] for m in results if m == "online"},
               "peak_bytes_in_use": {m: results[m]["peak_bytes_in_use"] for m in results},
               "cached_over_online_tokens_per_s": (results["cached"]["tokens_per_s"] / results["online"]["tokens_per_s"]
                                                   if {"cached", "online"} <= set(results) else None),
               "phase_wall_s": {k: v["phase_wall_s"] for k, v in {**phases, **results}.items()},
               "wall_s": time.perf_counter() - t0}
    if a.json_out:
        Path(a.json_out).write_text(json.dumps({"modes": results, "phases": phases, "summary": summary}, indent=1,
                                               default=float))
    print(json.dumps(summary), flush=True)


def _without(argv: list[str], flag: str) -> list[str]:
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
            continue
        if x == flag:
            skip = True
            continue
        if x.startswith(flag + "="):
            continue
        out.append(x)
    return out


if __name__ == "__main__":
    main()
