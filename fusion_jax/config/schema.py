"""The config tree: every typed, frozen section of every job, in one place.

Loading (YAML + ``--set key=value``), type and range checks and their error messages live in
:mod:`fusion_jax.config.loader`; a ``Literal`` field's choices are checked there on load and by
:func:`~fusion_jax.config.loader.check_choices` in ``validate`` for configs built in Python. The model's own config is
:mod:`fusion_jax.config.model`. The run (``python -m fusion_jax.train``) is :class:`TrainConfig`; each stage that
is also a command has its own (:class:`PrepareConfig`, :class:`CaptureConfig`, :class:`EvaluateConfig`, ...).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Literal

import numpy as np

from fusion_jax.config.loader import check_choices
from fusion_jax.config.loader import option as _help
from fusion_jax.config.model import DType, ModelConfig, RematPolicy
from fusion_jax.errors import ConfigError

Format = Literal["text", "jsonl", "parquet", "hf", "tfds"]  # of a corpus


MESH_AXES = ("data", "fsdp", "tensor")


DEFAULT_RULES: dict[str, tuple[str, ...]] = {
    "batch": ("data", "fsdp"),
    "embed": ("fsdp",),
    "vocab": ("tensor",),
    "heads": ("tensor",),
    "kv_heads": ("tensor",),
    "mlp": ("tensor",),
    "seq": (),
    "head_dim": (),
    "layers": (),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape (−1 on one axis: all remaining devices) and the logical-axis sharding rules."""

    data: int = -1  # the sizes (positive, or -1 on one axis) are checked by validate
    fsdp: int = 1
    tensor: int = 1
    rules: dict[str, tuple[str, ...]] = _help("logical axis name → the mesh axes it is split over",
                                             default_factory=lambda: dict(DEFAULT_RULES))
    multihost: Literal["auto", "off"] = _help(
        "auto: start jax.distributed when a cluster is detected or the fields below are set; off: this process alone",
        "auto")
    coordinator_address: str | None = _help("host:port of process 0 (default: $JAX_COORDINATOR_ADDRESS or detected)",
                                           None)
    num_processes: int | None = _help("processes in the run (default: $JAX_NUM_PROCESSES or detected)", None, minimum=1)
    process_id: int | None = _help("this process's index (default: $JAX_PROCESS_ID or detected)", None, minimum=0)

    def validate(self) -> None:
        sizes = (self.data, self.fsdp, self.tensor)
        if sum(s == -1 for s in sizes) > 1:
            raise ConfigError(f"at most one of data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}")
        if any(s == 0 or s < -1 for s in sizes):
            raise ConfigError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
        for name, axes in self.rules.items():
            bad = [a for a in axes if a not in MESH_AXES]
            if bad:
                raise ConfigError(f"rules.{name} names unknown mesh axes {bad}; mesh axes are {list(MESH_AXES)}")


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """How K teachers' rows become one target (FuseLLM's fusion function)."""

    method: Literal["min_ce", "avg_ce"] = _help(
        "min_ce: the best-scoring teacher's row (paper's MinCE); avg_ce: a score-weighted mixture (AvgCE)", "min_ce")
    granularity: Literal["sequence", "token"] = _help(
        "sequence: one choice per block from the block scores (official); token: per position from −log p_j(label) "
        "(a fallback one-hot row takes part only where no teacher has a real row, and wins nothing)",
        "sequence")
    score: Literal["bpb", "ce"] = _help(
        "sequence score: bpb = the loader's seq_bpb (bits per byte, comparable across tokenizers); ce = the "
        "official seq_ce (mean CE on each teacher's own tokens)", "bpb")
    avg_weights: Literal["official", "softmax"] = _help(
        "avg_ce weights: official = softmax_j(exp(−score_j)) (the code's formula, nearly uniform); "
        "softmax = softmax_j(−score_j / temperature)", "softmax")
    temperature: float = _help("τ of avg_weights=softmax", 1.0, exclusive_minimum=0)
    teacher_temperature: float = _help(
        "T dividing each teacher's log-weights before the softmax over its kept entries (official default 1)", 1.0,
        exclusive_minimum=0)
    teacher_weights: tuple[float, ...] = _help(
        "static per-teacher multipliers, one per teacher (empty: all 1). avg_ce multiplies the weights and "
        "renormalises; min_ce picks argmin of score − log(weight); 0 excludes a teacher from the target", (),
        minimum=0)
    empty_rows: Literal["skip", "first_teacher"] = _help(
        "a teacher without a row at a position: skip = it does not take part there (weights renormalised over the "
        "others); first_teacher = it uses teacher 0's row (the official collator's substitution)", "skip")
    compat_bf16: bool = _help(
        "official numerics: bf16 teacher softmax, bf16 rewards 1/exp(bf16(score)), ties to the first teacher, "
        "target rounded to bf16", False)

    def validate(self) -> None:
        check_choices(self)
        for name in ("temperature", "teacher_temperature"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{name} must be a positive number, got {v!r}")
        w = self.teacher_weights
        if any(not (math.isfinite(x) and x >= 0) for x in w):
            raise ConfigError(f"teacher_weights must be finite and >= 0, got {list(w)}")
        if w and not any(x > 0 for x in w):
            raise ConfigError(f"teacher_weights must have a positive entry, got {list(w)}")

    def weights_for(self, num_teachers: int) -> np.ndarray:
        """float64[K] static teacher multipliers (all 1 when ``teacher_weights`` is empty)."""
        if not self.teacher_weights:
            return np.ones(num_teachers)
        if len(self.teacher_weights) != num_teachers:
            raise ConfigError(f"teacher_weights has {len(self.teacher_weights)} entries but there are {num_teachers} "
                             "teachers: give one weight per teacher, in config order")
        return np.asarray(self.teacher_weights, np.float64)

    @classmethod
    def official(cls, method: Literal["min_ce", "avg_ce"] = "min_ce", **kw: Any) -> "FusionConfig":
        """The official FuseLLM fusion (MinCE by default): block CE scores, bf16 numerics, empty rows → teacher 0."""
        base = dict(method=method, granularity="sequence", score="ce", avg_weights="official",
                    empty_rows="first_teacher", compat_bf16=True)
        base.update(kw)
        return cls(**base)


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """The training objective λ·CLM + (1−λ)·fusion."""

    lm_weight: float = _help("λ, the CLM weight (paper: 0.9)", 0.9, minimum=0, maximum=1)
    lm_weight_schedule: Literal["constant", "hard_and_decay"] = _help(
        "constant: λ; hard_and_decay (official option): λ_t = λ + (1−λ)·step/max_steps", "constant")
    fusion_loss: Literal["ce", "kl"] = _help(
        "fusion term: cross-entropy to the fused target, or KL (= CE − H(p))", "ce")
    fusion_mask: Literal["next_label", "attention"] = _help(
        "positions of the fusion term: next_label = those with a CLM label (FuseChat's fix); attention = every "
        "non-pad position, incl. each block's last (official FuseLLM)", "next_label")
    reduction: Literal["tokens", "blocks"] = _help(
        "tokens: Σ over the global batch / token count; blocks: mean of per-block means (official bs=1 runs)",
        "tokens")
    chunk_size: int = _help(
        "positions per chunk of the student's logits (recomputed in the backward pass); 0 = all at once", 0,
        minimum=0)
    likelihood_weight: float = _help(
        "μ: share of the fusion term given to likelihood matching on byte chunks (fusion/likelihood.py): fusion = "
        "(1−μ)·top-k CE + μ·chunk KL; 0 = top-k only (paper)", 0.0, minimum=0, maximum=1)
    likelihood_temperature: float = _help(
        "τ of likelihood matching: each chunk's probability is taken to the power 1/τ (tokenkit: 100)", 100.0,
        exclusive_minimum=0)

    def validate(self) -> None:
        if not 0.0 <= self.lm_weight <= 1.0:
            raise ConfigError(f"lm_weight must be in [0, 1], got {self.lm_weight!r}")
        if not 0.0 <= self.likelihood_weight <= 1.0:
            raise ConfigError(f"likelihood_weight must be in [0, 1], got {self.likelihood_weight!r}")
        if not self.likelihood_temperature > 0:
            raise ConfigError(f"likelihood_temperature must be > 0, got {self.likelihood_temperature!r}")
        check_choices(self)
        if self.chunk_size < 0:
            raise ConfigError(f"chunk_size must be >= 0 (0 = unchunked), got {self.chunk_size}")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    learning_rate: float = _help("peak learning rate (FuseLLM: 1e-5)", 1e-5, exclusive_minimum=0)
    schedule: Literal["cosine", "as_run", "constant"] = _help(
        "cosine: warmup + cosine (the official flags); as_run: DeepSpeed's log warmup + linear decay (what the official "
        "runs executed); constant: warmup then flat", "cosine")
    warmup_ratio: float = _help("share of the steps spent warming up (FuseLLM: 0.008)", 0.008, minimum=0,
                                exclusive_maximum=1)
    min_lr_ratio: float = _help("cosine: final learning rate as a share of the peak", 0.0, minimum=0, maximum=1)
    b1: float = _help("Adam β1", 0.9, minimum=0, exclusive_maximum=1)
    b2: float = _help("Adam β2 (official flags 0.95; the as-run DeepSpeed optimizer used 0.999)", 0.95, minimum=0,
                      exclusive_maximum=1)
    eps: float = _help("Adam ε", 1e-8, exclusive_minimum=0)
    weight_decay: float = _help("decoupled weight decay on matrices (not on norms or biases)", 0.0, minimum=0)
    grad_clip: float = _help("clip the global gradient norm to this (0 = off)", 1.0, minimum=0)
    accumulation: int = _help("micro-batches per optimizer step (each is global_batch_size / accumulation rows)", 1,
                              minimum=1)


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """Where the documents come from and which record fields hold text, id and domain."""

    format: Format = _help(
        "text (one document per file), jsonl (one per line), parquet, hf (datasets), tfds (array_record)", "jsonl")
    paths: tuple[str, ...] = _help(
        "files or directories; for hf a saved dataset directory or a hub id; for tfds the dataset name", ())
    glob: str = _help("files taken from a directory (default **/*.txt, **/*.jsonl, **/*.parquet by format), sorted", "")
    text_field: str = _help("record field holding the text", "text")
    id_field: str = _help("record field holding a unique id (default: positional ids, see fusion_jax.data.corpus)", "")
    domain_field: str = _help("record field holding the domain (default: every document gets `domain`)", "")
    domain: str = _help("domain when domain_field is empty", "default")
    split: str = _help("hf/tfds split to read", "train")
    hf_config: str = _help("hf: the dataset's configuration (subset) name, as load_dataset's second argument", "")
    data_files: tuple[str, ...] = _help("hf: load_dataset's data_files (with paths = [json], [parquet], [csv] or "
                                        "[text]: read these local files through the datasets library)", ())
    streaming: bool = _help("hf: stream the records (load_dataset(streaming=True)) instead of preparing an Arrow "
                            "copy of the whole dataset first", False)
    data_dir: str = _help("tfds data_dir (default: TFDS's own)", "")
    max_documents: int = _help("stop after this many documents (0 = all)", 0, minimum=0)

    def validate(self) -> None:
        """Checks the settings; paths may be empty here (a config that reads prepared documents has no corpus):
        :meth:`require` is the check before reading."""
        if self.format in ("hf", "tfds") and len(self.paths) != 1:
            raise ConfigError(f"format {self.format!r} reads one dataset, got {len(self.paths)} paths: {list(self.paths)}")
        if self.format != "hf" and (self.hf_config or self.data_files or self.streaming):
            raise ConfigError("hf_config, data_files and streaming are for format 'hf'")
        if self.format == "text" and (self.id_field or self.domain_field):
            raise ConfigError("format 'text' has no record fields: leave id_field and domain_field empty")
        if not self.text_field:
            raise ConfigError("text_field must not be empty")

    def require(self) -> None:
        """:meth:`validate`, and there must be something to read."""
        if not self.paths:
            raise ConfigError("paths is required: files or directories, a saved hf dataset or hub id, or a TFDS name")
        self.validate()


@dataclasses.dataclass(frozen=True)
class TeacherConfig:
    """A teacher — a source model, or the target itself (``target_as_teacher``) — from the config to the train step:
    where its rows come from and how they are aligned to the target. ``cached``: captured once into ``cache``, read and
    aligned by the loader; ``online``: run inside the train step on the source tokens the loader ships with the
    alignment tables (align=bytes only)."""

    name: str = _help("name in metrics and cache paths")
    checkpoint: str = _help("fusion_jax or Hugging Face model directory, or a .gguf file (a source needs one; a "
                            "leading ~ is the home directory)", "")
    tokenizer: str = _help("its tokenizer (default: the checkpoint directory)", "")
    cache: str = _help("teacher cache directory (default: <cache_dir>/<name>)", "")
    align: Literal["bytes", "fusellm"] = _help("bytes (exact byte alignment) | fusellm (official DTW)", "bytes")
    vocab_map: Literal["prefix", "exact", "identity"] = _help(
        "bytes mode: prefix | exact | identity (a teacher with the target's own tokenizer)", "prefix")
    fallback: Literal["onehot_next", "mask"] = _help(
        "bytes mode: onehot_next | mask for positions without a teacher row", "onehot_next")
    vocab_align: Literal["hard", "soft"] = _help("fusellm mode: hard (EM) | soft (MinED)", "hard")
    onehot_target: Literal["current", "next"] = _help("fusellm mode: current (official) | next", "current")
    tie_order: Literal["official", "fusechat_v2"] = _help("fusellm mode: official | fusechat_v2", "official")
    mode: Literal["cached", "online"] = _help(
        "cached (capture once, read the cache) | online (run inside the train step, no cache; align=bytes only)",
        "cached")
    seq_len: int = _help("online: source tokens per block (0: 2 × loader.seq_len); overflow falls back and is counted "
                         "in the metrics' src_overflow", 0, minimum=0)
    continuation: bool = _help(
        "bytes mode, cached: a target position inside a source token (1:n and n:m groups) gets the previous source "
        "row's candidates that continue the bytes emitted so far, each mapped to the target token its remaining bytes "
        "start with (align/continuation.py); false: the fallback there", False)
    in_context: bool = _help(
        "bytes mode, cached: the candidate that is the text's actual next source token maps to the target's actual "
        "next token (the target tokenizer's own choice for those bytes in context), the others through vocab_map",
        False)
    tail: Literal["renormalize", "next_token"] = _help(
        "in_context: the teacher's mass outside a row's top-k is renormalised over it (renormalize, the paper's) or "
        "given to the text's next token (next_token: every candidate keeps the teacher's own probability)",
        "renormalize")

    def __post_init__(self) -> None:
        for key in ("checkpoint", "tokenizer", "cache"):  # models often live under the home directory
            object.__setattr__(self, key, os.path.expanduser(getattr(self, key)))

    @property
    def label(self) -> str:
        return self.name

    @property
    def online(self) -> bool:
        return self.mode == "online"

    @property
    def tokenizer_path(self) -> str:
        return self.tokenizer or self.checkpoint

    def source_len(self, target_len: int) -> int:
        """Ts, the online source block length."""
        return self.seq_len or 2 * target_len

    def validate(self) -> None:
        check_choices(self, f"teacher {self.label}: ")
        if self.tail != "renormalize" and not self.in_context:
            raise ConfigError(f"teacher {self.label}: tail={self.tail!r} needs in_context=true (the text's next token "
                              "takes the tail)")
        for key in ("continuation", "in_context"):
            if getattr(self, key) and (self.online or self.align != "bytes"):
                raise ConfigError(f"teacher {self.label}: {key} needs align=bytes and mode=cached, got "
                                  f"align={self.align!r}, mode={self.mode!r}")
        if self.online and self.align != "bytes":
            raise ConfigError(f"teacher {self.label}: mode=online supports align=bytes only, got align={self.align!r}: "
                              "the fusellm DTW alignment is host-side string work on the teacher's top-k per document "
                              "and needs the cached path (mode=cached, capture first)")
        if self.seq_len < 0:
            raise ConfigError(f"teacher {self.label}: seq_len must be >= 0 (0 = 2 × the target's), got {self.seq_len}")
        if not self.tokenizer_path:
            raise ConfigError(f"teacher {self.label}: give its tokenizer or checkpoint")


@dataclasses.dataclass(frozen=True)
class LoaderConfig:
    """Packing, batching and teachers of the fusion loader."""

    teachers: tuple[TeacherConfig, ...] = _help("the teachers, in order", ())
    seq_len: int = _help("tokens per block (T)", 2048, minimum=1)
    global_batch_size: int = _help("blocks per global batch (B), over all processes", 128, minimum=1)
    seed: int = _help("shuffling seed: epoch e visits documents in default_rng([seed, e]).permutation(N)", 0)
    k: int = _help("candidates per position after transfer (each teacher's cache needs at least k)", 10, minimum=1)
    append_eos: bool = _help("append the target's EOS to every document (must match the caches)", True)
    mask_documents: bool = _help("one segment per document piece; false = official (attend across documents)", True)
    worker_count: int = _help("grain worker processes (0: build batches in this process)", 0, minimum=0)
    prefetch: int = _help("batches buffered ahead (per worker with workers)", 2, minimum=0)
    cache_dir: str | None = _help("vocab maps and document lengths cache (default $FUSION_JAX_CACHE)", None)
    doc_cache: int = _help("documents kept per worker (target encoding + transferred rows), for straddling docs", 32,
                            minimum=0)
    verify: Literal["full", "size"] = _help(
        "teacher cache check at start: sizes (default; ArrayRecord's chunk hashes still catch corrupted reads) or "
        "full sha256 of every shard (minutes for MiniPile-size caches, on every start)", "size")

    def validate(self) -> None:
        if min(self.seq_len, self.global_batch_size, self.k) <= 0:
            raise ConfigError("seq_len, global_batch_size and k must be positive")
        if self.worker_count < 0 or self.prefetch < 0 or self.doc_cache < 0:
            raise ConfigError("worker_count, prefetch and doc_cache must be non-negative")
        check_choices(self)
        for i, t in enumerate(self.teachers):
            t.validate()
            if not t.online and not t.cache:
                raise ConfigError(f"teacher {t.label}: cache is required unless online (teachers[{i}].cache, or "
                                  "mode=online)")
        labels = [t.label for t in self.teachers]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"teacher names must be unique, got {labels}: set teachers[i].name")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    corpus: CorpusConfig = _help("the corpus to read", default_factory=CorpusConfig)
    tokenizers: tuple[str, ...] = _help(
        "every tokenizer of the run (target and sources: tokenizer.json, .model or a directory); "
        "a document is split when it is too long under any of them", ())
    max_tokens: int = _help("longest document in tokens (FuseLLM: block 2048 - 48)", 2000, minimum=1)
    validation_fraction: float = _help("share of documents (by a hash of the id) in the validation split", 0.01,
                                       minimum=0, exclusive_maximum=1)
    output: str = _help("store directory to write", "")
    overwrite: bool = _help("replace an existing store at output", False)
    normalize: Literal["nfc", "none"] = _help(
        "Unicode-normalize texts first; NFC-normalizing tokenizers (GPT-NeoX/MPT, Qwen2) cannot reproduce other text",
        "nfc")
    on_tokenization_error: Literal["error", "skip"] = _help(
        "a document some tokenizer cannot reproduce byte for byte: stop, or skip it (counted)", "error")
    workers: int = _help("processes that tokenize and split (0: in this process); the output is the same", 0,
                         minimum=0)

    def validate(self) -> None:
        try:
            self.corpus.require()
        except ValueError as e:
            raise ConfigError(f"corpus: {e}") from None
        if not self.tokenizers:
            raise ConfigError("tokenizers is required: the run's target and source tokenizers (the split rule uses all)")
        if not self.output:
            raise ConfigError("output is required: the store directory to write")


@dataclasses.dataclass(frozen=True)
class CaptureSettings:
    """How teachers are captured: the run's ``capture`` section, and the base of :class:`CaptureConfig`."""

    k: int = _help("candidates stored per position", 10, minimum=1, maximum=255)
    seq_len: int = _help("tokens of the longest row; every document (+EOS) must fit (≥ max_tokens + 1)", 2048,
                         minimum=2)
    batch_size: int = _help("global rows per forward (a multiple of the process count and the batch mesh axes)", 8,
                            minimum=1)
    fit_rows: bool = _help("rows sized to their documents (seq_len·j/8 tokens, at least 256: one compile per "
                           "length, far less padding and attention on short documents); false: every row seq_len "
                           "tokens. A multi-process capture always uses seq_len rows, so that a shard's bytes never "
                           "depend on the shards the other processes capture beside it", True)
    docs_per_shard: int = _help("documents per cache shard (the unit of resumption and of multi-host work)", 256,
                                minimum=1)
    param_dtype: DType = _help("dtype the source's params are loaded in", "bfloat16")
    compute_dtype: DType = _help("dtype of the forward's activations", "bfloat16")


@dataclasses.dataclass(frozen=True)
class CaptureConfig(CaptureSettings):
    """`python -m fusion_jax.capture`: one teacher over one split of a document store → its cache."""

    documents: str = _help("prepared document store (python -m fusion_jax.prepare)", "")
    split: Literal["train", "validation"] = _help("which split of the store", "train")
    source: str = _help("source model: a fusion_jax checkpoint or a Hugging Face directory (converted on the fly)", "")
    tokenizer: str = _help("the source's tokenizer (file or directory); default: the source directory", "")
    output: str = _help("cache directory to write (resumed if it holds finished shards of the same capture)", "")
    logits_chunk: int = _help("positions per log_softmax/top-k chunk (bounds the float32 [B, chunk, V] buffer)", 512,
                              minimum=1)
    append_eos: bool = _help("append the tokenizer's EOS to every document, as the official pipeline does", True)
    logprob_format: Literal["quantized", "float16"] = _help(
        "quantized (37 B/token at k=10) | float16 (46 B/token)", "quantized")
    max_documents: int = _help("capture only the first N documents (0 = all)", 0, minimum=0)
    estimate: bool = _help("print the disk and time the capture needs, then stop", False)
    estimate_sample: int = _help("documents tokenized for the estimate", 512, minimum=1)
    allow_tokenizer_mismatch: bool = _help("use a tokenizer other than the one the source was saved with (warn "
                                           "instead of refusing)", False)
    mesh: MeshConfig = _help("device mesh and sharding rules", default_factory=MeshConfig)

    def validate(self) -> None:
        for name in ("documents", "source", "output"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required (--set {name}=...)")
        check_choices(self)
        if not 1 <= self.k <= 255:
            raise ConfigError(f"k must be in [1, 255], got {self.k}")
        if min(self.seq_len, self.batch_size, self.docs_per_shard, self.logits_chunk) <= 0 or self.max_documents < 0:
            raise ConfigError("seq_len, batch_size, docs_per_shard and logits_chunk must be positive")
        if self.seq_len % min(self.logits_chunk, self.seq_len):
            raise ConfigError(f"seq_len ({self.seq_len}) must be a multiple of logits_chunk ({self.logits_chunk})")


@dataclasses.dataclass(frozen=True)
class TasksConfig:
    """Benchmark tasks through lm-evaluation-harness on the model (fusion_jax.evaluate.harness)."""

    names: tuple[str, ...] = _help("lm-eval task or group names (its registry's, or those of the YAMLs in include); "
                                   "empty: none", ())
    include: tuple[str, ...] = _help("directories of lm-eval task YAMLs (local tasks over local files)", ())
    num_fewshot: int = _help("few-shot examples per prompt (-1: each task's default)", -1, minimum=-1)
    limit: int = _help("evaluate only the first N documents of each task (0: all)", 0, minimum=0)
    max_length: int = _help("tokens of context + continuation at most (longer requests are cut from the left)", 2048,
                            minimum=2)
    max_gen_toks: int = _help("tokens generated at most per generate_until request (unless a task sets its own)", 256,
                              minimum=1)
    batch_size: int = _help("rows per forward and prompts per generation batch", 8, minimum=1)

    def validate(self) -> None:
        if self.max_gen_toks >= self.max_length:
            raise ConfigError(f"tasks.max_gen_toks ({self.max_gen_toks}) must be less than tasks.max_length "
                             f"({self.max_length})")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: str = _help("model to evaluate: a fusion_jax checkpoint or a Hugging Face directory", "")
    tokenizer: str = _help("the model's tokenizer (file or directory); default: the checkpoint directory", "")
    documents: str = _help("prepared document store (python -m fusion_jax.prepare); or give corpus instead", "")
    split: Literal["train", "validation"] = _help("which split of the store", "validation")
    max_documents: int = _help("score only the first N documents of the store (0 = all; a corpus uses "
                               "corpus.max_documents)", 0, minimum=0)
    corpus: CorpusConfig | None = _help(
        "any corpus read directly instead of a store (corpus.format, corpus.paths, corpus.domain_field, "
        "corpus.max_documents, ...: see fusion_jax.data.corpus); its documents are held in memory", None)
    batch_size: int = _help("global rows per forward (a multiple of the process count)", 8, minimum=1)
    seq_len: int = _help("tokens per packed row; longer documents are scored in windows of seq_len tokens", 2048,
                         minimum=2)
    context: int = _help("tokens of preceding text each window after the first of a long document conditions on "
                         "(1 .. seq_len-1; -1 = seq_len // 2)", -1, minimum=-1)
    logits_chunk: int = _help("positions per log-sum-exp chunk (bounds the float32 [B, chunk, V] buffer)", 512,
                              minimum=1)
    append_eos: bool = _help("append the tokenizer's EOS to every document and score its prediction", True)
    bos: bool = _help("prepend the tokenizer's BOS so the first token is scored too (only for tokenizers with one)",
                      False)
    param_dtype: DType = _help("dtype the params are loaded in", "bfloat16")
    compute_dtype: DType = _help("dtype of the forward's activations (logits are float32 either way)", "bfloat16")
    tasks: TasksConfig = _help("benchmark tasks through lm-evaluation-harness (tasks.names=[...]); with or "
                                 "without documents/corpus for bits per byte", default_factory=TasksConfig)
    output: str = _help("write the report (bits per byte, and lm-eval's results under \"tasks\") as JSON to this "
                        "file (optional)", "")
    allow_tokenizer_mismatch: bool = _help("score with a tokenizer other than the one the checkpoint was saved with "
                                           "(warn instead of refusing)", False)
    mesh: MeshConfig = _help("device mesh and sharding rules", default_factory=MeshConfig)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint is required (--set checkpoint=DIR)")
        if self.documents and self.corpus is not None:
            raise ConfigError("give one of documents (a prepared store: --set documents=DIR) and corpus "
                             "(--set corpus.paths=[FILE] ...), not both")
        if not self.documents and self.corpus is None and not self.tasks.names:
            raise ConfigError("nothing to evaluate: give documents (--set documents=DIR) or corpus (--set "
                             "corpus.paths=[FILE]) for bits per byte, and/or benchmark tasks (--set "
                             "'tasks.names=[hellaswag]')")
        self.tasks.validate()
        check_choices(self)
        if min(self.seq_len, self.batch_size, self.logits_chunk) <= 0 or self.max_documents < 0:
            raise ConfigError("seq_len, batch_size and logits_chunk must be positive, max_documents >= 0")
        if self.seq_len < 2:
            raise ConfigError(f"seq_len must be at least 2, got {self.seq_len}")
        if self.context != -1 and not 1 <= self.context < self.seq_len:
            raise ConfigError(f"context must be in [1, seq_len) or -1, got {self.context} (seq_len {self.seq_len})")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the model's logits."""

    temperature: float = _help("0: greedy (the argmax); > 0: sample from softmax(logits / temperature)", 0.0,
                               minimum=0)
    top_k: int = _help("sample only among the k most likely tokens (0: all)", 0, minimum=0)
    top_p: float = _help("sample only among the fewest most likely tokens whose probabilities sum to top_p (1: all)",
                         1.0, exclusive_minimum=0, maximum=1)


@dataclasses.dataclass(frozen=True)
class GenerateConfig:
    """`python -m fusion_jax.generate`: continue prompts with a model on the mesh (a KV cache, batched prompts)."""

    checkpoint: str = _help("the model: a fusion_jax checkpoint or a Hugging Face directory", "")
    tokenizer: str = _help("the model's tokenizer (file or directory); default: the checkpoint directory", "")
    prompts: tuple[str, ...] = _help("the prompts (or give prompts_file)", ())
    prompts_file: str = _help("a text file of prompts, one per line, or a .jsonl file of {\"prompt\": ...} objects", "")
    max_new_tokens: int = _help("tokens generated per prompt at most", 64, minimum=1)
    stop: tuple[str, ...] = _help("a generation ends before the first of these strings (and at the tokenizer's EOS)", ())
    sampling: SamplingConfig = _help("greedy or sampled decoding", default_factory=SamplingConfig)
    seed: int = _help("the sampling seed (a prompt's sample depends on the seed and its place in the prompt list, not "
                      "on the batch it ran in)", 0)
    batch_size: int = _help("prompts decoded together (a multiple of the data·fsdp mesh size)", 8, minimum=1)
    bos: bool = _help("prepend the tokenizer's BOS to every prompt (only for tokenizers with one)", False)
    param_dtype: DType = _help("dtype the params are loaded in", "bfloat16")
    compute_dtype: DType = _help("dtype of the activations and the KV cache (logits are float32 either way)",
                                 "bfloat16")
    output: str = _help("write the generations as JSONL to this file (optional)", "")
    allow_tokenizer_mismatch: bool = _help("generate with a tokenizer other than the one the checkpoint was saved "
                                           "with (warn instead of refusing)", False)
    mesh: MeshConfig = _help("device mesh and sharding rules", default_factory=MeshConfig)

    def validate(self) -> None:
        if not self.checkpoint:
            raise ConfigError("checkpoint is required (--set checkpoint=DIR)")
        if bool(self.prompts) == bool(self.prompts_file):
            raise ConfigError("give exactly one of prompts (--set 'prompts=[\"Once upon a time\"]') and prompts_file "
                             "(--set prompts_file=FILE)")
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must not be empty")
        check_choices(self)


@dataclasses.dataclass(frozen=True)
class AuditConfig:
    """`python -m fusion_jax.align audit`: how well source tokenizers' rows carry over to a target's (no model)."""

    sources: tuple[str, ...] = _help("source (teacher) tokenizers: tokenizer.json, SentencePiece .model or a "
                                     "directory; one report per source → target pair (--source, repeatable)", ())
    target: str = _help("the target tokenizer (--target)", "")
    texts: tuple[str, ...] = _help("UTF-8 text files (--text FILE ...)", ())
    alignments: Literal["default", "in_context", "fusellm", "all"] = _help(
        "which alignments to audit (--mode): default: byte alignment + prefix vocab map; in_context: that with rows "
        "inside source tokens and the text's next token mapped in context (sources' continuation + in_context); "
        "fusellm: official DTW + MinED (soft); all", "all")
    top: int = _help("worst mappings listed per mode", 10)
    max_tokens: int = _help("cut each file into documents of whole lines with at most this many target tokens (DTW is "
                            "quadratic in it)", 2048)
    eos: bool = _help("append each tokenizer's EOS to every document, as the official pipeline does (--no-eos)", True)
    json: str | None = _help("also write the numbers as JSON to this path", None)
    cache_dir: str | None = _help("vocab map cache (default $FUSION_JAX_CACHE or ~/.cache/fusion_jax)", None)

    def validate(self) -> None:
        if not self.sources or not self.target or not self.texts:
            raise ConfigError("--source, --target and --text are required")
        if self.top < 0:
            raise ConfigError(f"--top must be ≥ 0, got {self.top}")
        if self.max_tokens < 1:
            raise ConfigError(f"--max-tokens must be ≥ 1, got {self.max_tokens}")

    @property
    def modes(self) -> tuple[str, ...]:
        return ("default", "in_context", "fusellm") if self.alignments == "all" else (self.alignments,)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    source: str = dataclasses.field(default="", metadata={"help": "HF model directory or fusion_jax checkpoint"})
    output: str = dataclasses.field(default="", metadata={"help": "directory to write (must not exist unless overwrite)"})
    to: Literal["fusion_jax", "hf"] = dataclasses.field(default="fusion_jax", metadata={"help": "output format"})
    param_dtype: DType | None = dataclasses.field(default=None, metadata={"help": "cast params (default: keep)"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "replace an existing output, if it is a model directory fusion_jax wrote (never other files, never "
                "one that holds the source)"})
    max_shard_gb: float = dataclasses.field(default=5.0, metadata={"help": "HF output: safetensors shard size"})
    # Params are sharded over every device while they pass through, never whole on one.
    mesh: MeshConfig = dataclasses.field(default_factory=lambda: MeshConfig(data=1, fsdp=-1))

    def validate(self) -> None:
        if not self.source or not self.output:
            raise ConfigError("source and output are required: python -m fusion_jax.convert SOURCE OUTPUT")


@dataclasses.dataclass(frozen=True)
class DemoModel:
    """One model of the demo: its tokenizer, architecture, size and pretraining."""

    name: str = _help("name (the sources' names in metrics and the report)")
    architecture: Literal["llama", "mpt", "gpt_neox"] = _help("Hugging Face family it is written as", "llama")
    tokenizer: Literal["sentencepiece", "byte_level", "byte_level_digits"] = _help(
        "sentencepiece: ▁ and byte fallback (Llama-2-like); byte_level: Ġ (GPT-NeoX/MPT-like); byte_level_digits: "
        "byte-level with single digits", "byte_level")
    vocab_size: int = _help("tokenizer vocabulary", 2048, minimum=1)
    hidden_size: int = _help("model width", 128, minimum=1)
    num_layers: int = _help("layers", 2, minimum=1)
    num_heads: int = _help("attention heads", 4, minimum=1)
    domain: Literal["code", "prose", "mix"] = _help("what it is pretrained on (mix: both domains)", "mix")
    steps: int = _help("pretraining steps", 100, minimum=1)
    learning_rate: float = _help("pretraining peak learning rate", 3e-3, exclusive_minimum=0)

    def validate(self) -> None:
        if not self.name or self.name == "target":
            raise ConfigError(f"a demo model needs a name other than 'target', got {self.name!r}")
        for key in ("vocab_size", "hidden_size", "num_layers", "num_heads", "steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{self.name}.{key} must be positive, got {getattr(self, key)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"{self.name}: hidden_size {self.hidden_size} must be a multiple of num_heads "
                             f"{self.num_heads}")


def _target() -> DemoModel:
    return DemoModel(name="llama_mix", architecture="llama", tokenizer="sentencepiece", vocab_size=2048,
                     hidden_size=128, num_layers=2, num_heads=4, domain="mix", steps=60)


def _code() -> DemoModel:
    return DemoModel(name="mpt_code", architecture="mpt", tokenizer="byte_level", vocab_size=2048, hidden_size=128,
                     num_layers=2, num_heads=4, domain="code", steps=300)


def _prose() -> DemoModel:
    return DemoModel(name="neox_prose", architecture="gpt_neox", tokenizer="byte_level_digits", vocab_size=3072,
                     hidden_size=128, num_layers=2, num_heads=4, domain="prose", steps=300)


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    """The built-in demo: corpus, tokenizers and models made at run time; fills target, sources and data.corpus."""

    enabled: bool = _help("build the demo's assets first and fuse them (configs/demo.yaml)", False)
    seed: int = _help("seed of the corpus order, the initialisations and the data order", 0)
    code_bytes: int = _help("code domain: UTF-8 bytes of standard-library source", 2_000_000, minimum=1)
    prose_bytes: int = _help("prose domain: UTF-8 bytes of pydoc topics and docstrings (Python 3.11 has ≈ 1.1 MB "
                             "at 12 kB per document; a larger budget takes all of it)", 1_200_000, minimum=1)
    mix_bytes: int = _help("bytes of each domain in the fusion run's corpus", 450_000, minimum=1)
    in_context: bool = _help("the demo's sources transfer as the transfer recipe does: continuation, in_context and "
                             "tail=next_token (README \"Choosing a recipe\"); false: the plain byte transfer", False)
    max_document_bytes: int = _help("longer files are cut at a line boundary", 12_000, minimum=1)
    tasks: bool = _help("benchmark every run on the demo's own lm-eval tasks over the held-out documents (next-line "
                        "multiple choice and rolling log-likelihood per domain; fusion_jax.experiments.demo.tasks)",
                        False)
    target: DemoModel = _help("the target, pretrained briefly on both domains", default_factory=_target)
    code: DemoModel = _help("source A, pretrained on code", default_factory=_code)
    prose: DemoModel = _help("source B, pretrained on prose", default_factory=_prose)
    pretrain_batch_size: int = _help("pretraining blocks per step", 8, minimum=1)
    pretrain_seq_len: int = _help("pretraining tokens per block", 256, minimum=1)

    def validate(self) -> None:
        for key in ("code_bytes", "prose_bytes", "mix_bytes", "max_document_bytes", "pretrain_batch_size",
                    "pretrain_seq_len"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"demo.{key} must be positive, got {getattr(self, key)}")
        names = [m.name for m in (self.target, *self.sources)]
        if len(set(names)) != len(names):
            raise ConfigError(f"demo model names must be unique, got {names}")

    @property
    def sources(self) -> tuple[DemoModel, DemoModel]:
        return self.code, self.prose


@dataclasses.dataclass(frozen=True)
class DataConfig:
    documents: str = _help("prepared document store; empty: prepare data.corpus into <run_dir>/documents", "")
    corpus: CorpusConfig = _help("corpus to prepare when documents is empty", default_factory=CorpusConfig)
    max_tokens: int = _help("prepare: longest document in tokens of any tokenizer (FuseLLM: block − 48)", 2000,
                            minimum=1)
    validation_fraction: float = _help("prepare: share of documents held out", 0.01, minimum=0, exclusive_maximum=1)


@dataclasses.dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases, when train.trackers has wandb (pip install 'fusion_jax[wandb]')."""

    project: str = _help("the W&B project", "fusion_jax")
    entity: str = _help("the W&B entity (team or user; empty: your default)", "")
    name: str = _help("the run's display name (empty: its run_dir)", "")
    tags: tuple[str, ...] = _help("tags of the run", ())
    mode: Literal["", "online", "offline", "disabled"] = _help(
        "online | offline (write locally, `wandb sync` later) | disabled; empty: $WANDB_MODE, else online", "")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = _help("optimizer steps", 1000, minimum=1)
    checkpoint_every: int = _help("save every N steps (and at the end)", 100, minimum=1)
    keep_checkpoints: int = _help("checkpoints kept", 3, minimum=1)
    log_every: int = _help("metrics to JSONL / TensorBoard every N steps", 10, minimum=1)
    eval_every: int = _help("held-out evaluation every N steps (0: only at the end)", 0, minimum=0)
    eval_batches: int = _help("held-out batches for the fusion loss and win rates (0: bits per byte only)", 4,
                              minimum=0)
    eval_documents: int = _help("held-out documents for bits per byte (0: all)", 0, minimum=0)
    peak_flops: float = _help("peak FLOP/s per device for MFU (0: by device kind)", 0.0, minimum=0)
    export: bool = _help("export the trained target as a Hugging Face checkpoint at the end", True)
    export_dtype: Literal["float32", "bfloat16"] = _help(
        "the dtype of the exported weights (and config.json's dtype); bfloat16 halves the files", "float32")
    trackers: tuple[Literal["jsonl", "tensorboard", "wandb"], ...] = _help(
        "where metrics go: jsonl (<run_dir>/metrics.jsonl, which the baseline report reads), tensorboard "
        "(<run_dir>/tensorboard), wandb (Weights & Biases: train.wandb.*; a resumed run continues its W&B run)",
        ("jsonl", "tensorboard"))
    wandb: WandbConfig = _help("Weights & Biases settings (with wandb in train.trackers)", default_factory=WandbConfig)
    tasks: TasksConfig = _help("lm-evaluation-harness tasks run on the target at the end (and every tasks_every "
                               "steps); results in <run_dir>/lm_eval.json and the report (tasks.names empty: none)",
                               default_factory=TasksConfig)
    tasks_every: int = _help("run train.tasks every N steps too (0: only at the end)", 0, minimum=0)
    progress: bool = _help("progress bar", True)
    extend: bool = _help("continue this run_dir's run to a new train.steps (more steps than it was started with); "
                         "the learning-rate and λ schedules then span the new total, the warmup keeps its length "
                         "(see fusion_jax.pipeline.run_dir.schedule_optimizer). Without it a changed train.steps is refused",
                         False)
    stall_steps: int = _help("stop when, for this many steps in a row, the gradient norm is exactly 0 or the CLM loss "
                             "sits at ln V (a uniform prediction: the model stopped learning; 0: never check)", 20,
                             minimum=0)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = _help("where everything of this run goes", "runs/fusion")
    cache_dir: str = _help("teacher caches, one directory per teacher (default <run_dir>/cache); share it between "
                           "runs on the same documents: one capture serves any number of targets", "")
    target: str = _help("the target: a fusion_jax or Hugging Face model directory", "")
    target_tokenizer: str = _help("the target's tokenizer (default: the target directory)", "")
    allow_tokenizer_mismatch: bool = _help("let target_tokenizer / sources[].tokenizer differ from the tokenizer a "
                                           "checkpoint was saved with (warn instead of refusing)", False)
    target_as_teacher: bool = _help("capture the target too and make it teacher 0 (the paper's setting)", True)
    target_teacher_mode: Literal["cached", "online"] = _help(
        "the target as teacher: cached | online (a frozen copy runs in the step)", "cached")
    param_dtype: DType = _help("the target's master weights (and optimizer state)", "float32")
    compute_dtype: DType = _help("the target's forward/backward activations", "bfloat16")
    sources: tuple[TeacherConfig, ...] = _help("the source models", ())
    data: DataConfig = _help("documents", default_factory=DataConfig)
    capture: CaptureSettings = _help("teacher capture", default_factory=CaptureSettings)
    loader: LoaderConfig = _help("blocks and batches (loader.teachers is filled from target/sources)",
                                 default_factory=LoaderConfig)
    fusion: FusionConfig = _help("how the teachers' rows fuse", default_factory=FusionConfig)
    loss: LossConfig = _help("λ·CLM + (1−λ)·fusion", default_factory=LossConfig)
    optimizer: OptimizerConfig = _help("AdamW and schedule", default_factory=OptimizerConfig)
    train: LoopConfig = _help("the loop", default_factory=LoopConfig)
    remat: RematPolicy = _help("activation checkpointing of the target's layers (full: a 7B target at T=2048 needs it)",
                               "none")
    mesh: MeshConfig = _help("device mesh and sharding rules (default: params, optimizer state and batch sharded "
                             "over every device, FSDP)", default_factory=lambda: MeshConfig(data=1, fsdp=-1))
    dry_run: bool = _help("print the sharded state's bytes per device and stop (allocates nothing)", False)
    baseline: bool = _help("also train the CLM baseline (λ = 1, no teachers) from the same start on the same batches "
                           "in <run_dir>/clm, evaluate the sources and the starting target on the same held-out "
                           "documents, audit the alignments, and write report.md with plots", False)
    compare_paper: bool = _help("with baseline: when this run's recipe is not the paper's, also train the paper's "
                                "(λ = 0.9, MinCE per block, top-k CE, the plain byte transfer) from the same start on "
                                "the same batches in <run_dir>/paper, as a row of the report", True)
    samples: int = _help("with baseline: greedy continuations of the beginnings of this many held-out documents by "
                         "every model (fused and CLM from their exports), in the report", 4, minimum=0)
    demo: DemoConfig = _help("the built-in demo (configs/demo.yaml): corpus, tokenizers and models made at run time",
                             default_factory=DemoConfig)

    def validate(self) -> None:
        if len(set(self.train.trackers)) != len(self.train.trackers):
            raise ConfigError(f"train.trackers lists a tracker twice: {list(self.train.trackers)}")
        if self.baseline and "jsonl" not in self.train.trackers:
            raise ConfigError("baseline's report reads each run's metrics.jsonl: keep jsonl in train.trackers")
        self.train.tasks.validate()
        if self.demo.enabled:
            if self.target or self.target_tokenizer or self.data.documents or self.data.corpus.paths:
                raise ConfigError("demo.enabled builds the target and corpus itself: leave target, target_tokenizer, "
                                 "data.documents and data.corpus.paths unset (or set demo.enabled=false); sources "
                                 "you give are fused alongside the demo's own")
            demo_names = [m.name for m in self.demo.sources]
            clash = [s.name for s in self.sources if s.name in demo_names]
            if clash:
                raise ConfigError(f"sources {clash} have the names of the demo's own sources {demo_names}: rename them")
            self._validate_sources()
            return
        if not self.target:
            raise ConfigError("target is required: a fusion_jax or Hugging Face model directory (--set target=DIR)")
        if not self.data.documents and not self.data.corpus.paths:
            raise ConfigError("no data: set data.documents (a prepared store) or data.corpus.paths (a corpus to prepare)")
        names = [s.name for s in self.sources] + (["target"] if self.target_as_teacher else [])
        if not names and (self.loss.lm_weight != 1.0 or self.loss.lm_weight_schedule != "constant"):
            raise ConfigError("no teachers, so the fusion term is empty: add sources, set target_as_teacher=true, or "
                             "train CLM only with loss.lm_weight=1.0")
        self._validate_sources()
        if self.loader.global_batch_size % self.optimizer.accumulation:
            raise ConfigError(f"loader.global_batch_size ({self.loader.global_batch_size}) must be a multiple of "
                             f"optimizer.accumulation ({self.optimizer.accumulation})")
        if self.capture.seq_len <= self.data.max_tokens and not self.data.documents:
            raise ConfigError(f"capture.seq_len ({self.capture.seq_len}) must exceed data.max_tokens "
                             f"({self.data.max_tokens}) so that every document plus EOS fits one row")

    def _validate_sources(self) -> None:
        names = [s.name for s in self.sources] + (["target"] if self.target_as_teacher else [])
        if len(set(names)) != len(names):
            raise ConfigError(f"source names must be unique (and not 'target'), got {names}")
        check_choices(self)
        for i, s in enumerate(self.sources):
            if not s.checkpoint:
                raise ConfigError(f"sources[{i}] ({s.name}) needs a checkpoint: sources[{i}].checkpoint")
            s.validate()


@dataclasses.dataclass(frozen=True)
class ForwardConfig:
    """`python -m fusion_jax.forward`: score text (or random tokens) with a model on the mesh."""

    batch_size: int = _help("sequences per batch (a multiple of the data·fsdp mesh size)", 8, minimum=1)
    seq_len: int = _help("tokens per sequence", 128, minimum=1)
    steps: int = _help("timed forward passes after the compiling one", 3, minimum=1)
    text: str | None = _help("UTF-8 text file to score with the checkpoint's tokenizer (default: random tokens)", None)


@dataclasses.dataclass(frozen=True)
class Config:
    model: ModelConfig = _help("architecture and numerics (ignored when checkpoint is set)", default_factory=ModelConfig)
    checkpoint: str | None = _help("fusion_jax or Hugging Face model directory to load instead of a random init", None)
    mesh: MeshConfig = _help("device mesh and sharding rules", default_factory=MeshConfig)
    seed: int = _help("random seed", 0)
    forward: ForwardConfig = _help("the forward job", default_factory=ForwardConfig)


@dataclasses.dataclass(frozen=True)
class ImportConfig:
    """`python -m fusion_jax.import_fusellm`: an official FuseLLM feature dataset → a document store + teacher caches."""

    dataset_dir: str = _help("the official dataset (save_to_disk directory)", "")
    output: str = _help("output directory (created)", "")
    tokenizer: str = _help("the base (target) model's tokenizer the dataset was built with (.model, tokenizer.json, "
                           "dir)", "")
    split: str = _help("split of a DatasetDict to import", "train")
    store_split: Literal["train", "validation"] | None = _help("document-store split to write (default: split)", None)
    docs_per_shard: int = _help("documents per cache shard, >= 1", 256, minimum=1)
    logprob_format: Literal["quantized", "float16"] = _help(
        "cache storage: quantized (37 B/token at k=10) or float16 (46 B/token)", "quantized")
    check_reencode: bool = _help("re-tokenize each text to count rows the loader will tokenize differently", True)
    overwrite: bool = _help("replace an earlier import at output", False)
    progress: bool = _help("show a progress bar", True)

    def validate(self) -> None:
        for name in ("dataset_dir", "output", "tokenizer"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        check_choices(self)
        if self.docs_per_shard < 1:
            raise ConfigError(f"docs_per_shard must be >= 1, got {self.docs_per_shard}")
