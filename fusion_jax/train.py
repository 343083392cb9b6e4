"""python -m fusion_jax.train --config FILE — the fusion run, every stage it needs, each resumable.

Stages, each skipped when its output is already complete (so re-running after a crash continues where it stopped):

0. with ``demo.enabled`` (``configs/demo.yaml``): the demo's corpus, tokenizers and pretrained models
   (``fusion_jax/demo/build.py``), which then fill ``target``, ``sources`` and ``data.corpus``;
1. documents: ``data.documents``, or prepared from ``data.corpus`` into ``<run_dir>/documents``;
2. capture: every cached teacher (the target itself when ``target_as_teacher`` — the paper's setting — then
   ``sources``) over the train and validation documents into ``<cache>/{train,validation}`` (``fusion_jax.capture``);
   an online teacher (``mode: online``) is not captured: its params are loaded once (frozen, sharded, in
   ``capture.param_dtype``) and it runs inside the train step on the source tokens the loader ships
   (``fusion_jax/online.py``);
3. train: the loader aligns the teachers to the target's blocks; the jitted, sharded step fuses them and trains the
   target on ``λ·CLM + (1−λ)·fusion``; Orbax checkpoints every ``train.checkpoint_every`` steps (restored with the
   loader's state, so a resumed run sees exactly the batches it would have seen); a non-finite loss stops the run
   and leaves the last good checkpoint;
4. evaluate: every ``train.eval_every`` steps and at the end, held-out bits per byte per domain, CLM and fusion loss
   and per-teacher win rates;
5. export: the trained target as a Hugging Face checkpoint in ``<run_dir>/export``;
6. with ``baseline``: the CLM baseline in ``<run_dir>/clm``, the sources and the starting target scored on the same
   held-out documents, the alignment audit, and ``report.md`` with plots (``fusion_jax/compare.py``).

With no teachers (no sources, ``target_as_teacher: false``) and ``loss.lm_weight: 1`` the run is plain CLM training.

Metrics go to ``<run_dir>/metrics.jsonl`` and TensorBoard event files in ``<run_dir>/tensorboard``.
``--dry-run`` builds the sharded state abstractly and prints bytes per device without allocating anything.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import jax
import numpy as np

from fusion_jax import cli, config_loader, mesh as mesh_lib
from fusion_jax.capture import CaptureConfig
from fusion_jax.config_loader import option as _help
from fusion_jax.data.corpus import CorpusConfig
from fusion_jax.data.loader import FusionLoader, LoaderConfig, TeacherSpec
from fusion_jax.demo.build import DemoConfig
from fusion_jax.fusion.fuse import FusionConfig
from fusion_jax.fusion.losses import LossConfig
from fusion_jax.mesh import MeshConfig
from fusion_jax.models import decoder
from fusion_jax.models.config import DType, ModelConfig, RematPolicy
from fusion_jax.optim import OptimizerConfig

log = logging.getLogger("fusion_jax.train")
SPLITS = ("train", "validation")

# Dense bf16 peak FLOP/s per chip, for MFU (override with train.peak_flops).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12}


@dataclasses.dataclass(frozen=True)
class SourceConfig:
    """A source (teacher) model: captured once and aligned to the target by the loader (cached), or run inside the
    train step on the source tokens the loader ships with the alignment tables (online)."""

    name: str = _help("name in metrics and cache paths")
    checkpoint: str = _help("fusion_jax or Hugging Face model directory")
    tokenizer: str = _help("its tokenizer (default: the checkpoint directory)", "")
    cache: str = _help("teacher cache directory (default: <cache_dir>/<name>)", "")
    align: str = _help("bytes (exact byte alignment) | fusellm (official DTW)", "bytes")
    vocab_map: str = _help("bytes mode: prefix | exact | identity", "prefix")
    fallback: str = _help("bytes mode: onehot_next | mask for positions without a teacher row", "onehot_next")
    vocab_align: str = _help("fusellm mode: hard (EM) | soft (MinED)", "hard")
    onehot_target: str = _help("fusellm mode: current (official) | next", "current")
    tie_order: str = _help("fusellm mode: official | fusechat_v2", "official")
    mode: str = _help("cached (capture once, read the cache) | online (run inside the train step, no cache; "
                      "align=bytes only)", "cached")
    seq_len: int = _help("online: source tokens per block (0: 2 × loader.seq_len); overflow falls back and is counted "
                         "in the metrics' src_overflow", 0)


MODES = ("cached", "online")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    documents: str = _help("prepared document store; empty: prepare data.corpus into <run_dir>/documents", "")
    corpus: CorpusConfig = _help("corpus to prepare when documents is empty", default_factory=CorpusConfig)
    max_tokens: int = _help("prepare: longest document in tokens of any tokenizer (FuseLLM: block − 48)", 2000)
    validation_fraction: float = _help("prepare: share of documents held out", 0.01)


@dataclasses.dataclass(frozen=True)
class CaptureSettings:
    k: int = _help("candidates stored per position", 10)
    seq_len: int = _help("rows the sources run on (≥ max_tokens + 1)", 2048)
    batch_size: int = _help("global rows per capture step", 8)
    docs_per_shard: int = _help("documents per cache shard", 256)
    param_dtype: DType = _help("sources' param dtype", "bfloat16")
    compute_dtype: DType = _help("sources' compute dtype", "bfloat16")


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    steps: int = _help("optimizer steps", 1000)
    checkpoint_every: int = _help("save every N steps (and at the end)", 100)
    keep_checkpoints: int = _help("checkpoints kept", 3)
    log_every: int = _help("metrics to JSONL / TensorBoard every N steps", 10)
    eval_every: int = _help("held-out evaluation every N steps (0: only at the end)", 0)
    eval_batches: int = _help("held-out batches for the fusion loss and win rates", 4)
    eval_documents: int = _help("held-out documents for bits per byte (0: all)", 0)
    peak_flops: float = _help("peak FLOP/s per device for MFU (0: by device kind)", 0.0)
    export: bool = _help("export the trained target as a Hugging Face checkpoint at the end", True)
    progress: bool = _help("progress bar", True)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    run_dir: str = _help("where everything of this run goes", "runs/fusion")
    cache_dir: str = _help("teacher caches, one directory per teacher (default <run_dir>/cache); share it between "
                           "runs on the same documents: one capture serves any number of targets", "")
    target: str = _help("the target: a fusion_jax or Hugging Face model directory", "")
    target_tokenizer: str = _help("the target's tokenizer (default: the target directory)", "")
    target_as_teacher: bool = _help("capture the target too and make it teacher 0 (the paper's setting)", True)
    target_teacher_mode: str = _help("the target as teacher: cached | online (a frozen copy runs in the step)",
                                     "cached")
    param_dtype: DType = _help("the target's master weights (and optimizer state)", "float32")
    compute_dtype: DType = _help("the target's forward/backward activations", "bfloat16")
    sources: tuple[SourceConfig, ...] = _help("the source models", ())
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
    demo: DemoConfig = _help("the built-in demo (configs/demo.yaml): corpus, tokenizers and models made at run time",
                             default_factory=DemoConfig)

    def validate(self) -> None:
        if self.demo.enabled:
            if self.target or self.sources or self.data.documents or self.data.corpus.paths:
                raise ValueError("demo.enabled builds the target, sources and corpus itself: leave target, sources, "
                                 "data.documents and data.corpus.paths unset (or set demo.enabled=false)")
            return
        if not self.target:
            raise ValueError("target is required: a fusion_jax or Hugging Face model directory (--set target=DIR)")
        if not self.data.documents and not self.data.corpus.paths:
            raise ValueError("no data: set data.documents (a prepared store) or data.corpus.paths (a corpus to prepare)")
        names = [s.name for s in self.sources] + (["target"] if self.target_as_teacher else [])
        if len(set(names)) != len(names):
            raise ValueError(f"source names must be unique (and not 'target'), got {names}")
        if not names and (self.loss.lm_weight != 1.0 or self.loss.lm_weight_schedule != "constant"):
            raise ValueError("no teachers, so the fusion term is empty: add sources, set target_as_teacher=true, or "
                             "train CLM only with loss.lm_weight=1.0")
        if self.target_teacher_mode not in MODES:
            raise ValueError(f"target_teacher_mode must be one of {MODES}, got {self.target_teacher_mode!r}")
        for s in self.sources:
            if s.mode not in MODES:
                raise ValueError(f"sources[{s.name}].mode must be one of {MODES}, got {s.mode!r}")
            if s.mode == "online" and s.align != "bytes":
                raise ValueError(f"sources[{s.name}]: mode=online supports align=bytes only, got align={s.align!r}: "
                                 "the fusellm DTW alignment is host-side string work per document and needs the "
                                 "cached path (mode=cached)")
            if s.seq_len < 0:
                raise ValueError(f"sources[{s.name}].seq_len must be >= 0, got {s.seq_len}")
        if self.loader.global_batch_size % self.optimizer.accumulation:
            raise ValueError(f"loader.global_batch_size ({self.loader.global_batch_size}) must be a multiple of "
                             f"optimizer.accumulation ({self.optimizer.accumulation})")
        if self.capture.seq_len <= self.data.max_tokens and not self.data.documents:
            raise ValueError(f"capture.seq_len ({self.capture.seq_len}) must exceed data.max_tokens "
                             f"({self.data.max_tokens}) so that every document plus EOS fits one row")


# ------------------------------------------------------------------------------------------------ stages


def teacher_list(cfg: TrainConfig) -> list[SourceConfig]:
    caches = Path(cfg.cache_dir or Path(cfg.run_dir) / "cache")
    out = [SourceConfig(name="target", checkpoint=cfg.target, tokenizer=cfg.target_tokenizer, vocab_map="identity",
                        mode=cfg.target_teacher_mode)] if cfg.target_as_teacher else []
    out += list(cfg.sources)
    return [dataclasses.replace(s, cache=s.cache or str(caches / s.name)) for s in out]


def documents_stage(cfg: TrainConfig) -> str:
    if cfg.data.documents:
        return cfg.data.documents
    from fusion_jax import prepare
    from fusion_jax.data.documents import read_meta

    out = Path(cfg.run_dir) / "documents"
    tokenizers = tuple(t.tokenizer or t.checkpoint for t in teacher_list(cfg))
    if not cfg.target_as_teacher:
        tokenizers = (cfg.target_tokenizer or cfg.target, *tokenizers)
    pcfg = prepare.PrepareConfig(corpus=cfg.data.corpus, tokenizers=tokenizers, max_tokens=cfg.data.max_tokens,
                                 validation_fraction=cfg.data.validation_fraction, output=str(out))
    # Multi-host: process 0 prepares (the run_dir is shared), the others wait for it and read the same store.
    fresh = jax.process_index() == 0 and not (out / "documents.json").exists()
    if fresh:
        prepare.main(pcfg)
    mesh_lib.sync(f"fusion_jax:documents:{out}")
    if not fresh:
        have = read_meta(out).get("prepare", {})
        want = config_loader.to_dict(pcfg)
        if have != want:
            diff = sorted(k for k in set(have) | set(want) if have.get(k) != want.get(k))
            raise ValueError(f"{out} was prepared with other settings ({', '.join(diff)} differ); use another run_dir "
                             "or delete the directory")
        log.info("documents: %s (already prepared)", out)
    return str(out)


def capture_stage(cfg: TrainConfig, documents: str) -> list[SourceConfig]:
    from fusion_jax import capture

    teachers = teacher_list(cfg)
    for t in teachers:
        if t.mode == "online":  # runs inside the train step: nothing to capture
            continue
        for split in SPLITS:
            c = cfg.capture
            capture.main(CaptureConfig(
                documents=documents, split=split, source=t.checkpoint, tokenizer=t.tokenizer,
                output=str(Path(t.cache) / split), k=c.k, seq_len=c.seq_len, batch_size=c.batch_size,
                docs_per_shard=c.docs_per_shard, param_dtype=c.param_dtype, compute_dtype=c.compute_dtype,
                append_eos=cfg.loader.append_eos, mesh=cfg.mesh))
    return teachers


def loader_config(cfg: TrainConfig, teachers: list[SourceConfig], split: str) -> LoaderConfig:
    specs = tuple(TeacherSpec(
        cache="" if t.mode == "online" else str(Path(t.cache) / split), tokenizer=t.tokenizer or t.checkpoint,
        name=t.name, align=t.align, vocab_map=t.vocab_map, fallback=t.fallback, vocab_align=t.vocab_align,
        onehot_target=t.onehot_target, tie_order=t.tie_order, online=t.mode == "online", seq_len=t.seq_len)
        for t in teachers)
    return dataclasses.replace(cfg.loader, teachers=specs)


def load_online(cfg: TrainConfig, teachers: list[SourceConfig], loader: FusionLoader, mesh, rules):
    """The online teachers, loaded once (frozen, in their shards, ``capture.param_dtype``/``compute_dtype``) →
    (tuple of OnlineTeacher, frozen params and vocab maps) in config order; ((), None) when there are none."""
    from fusion_jax.convert import checkpoint
    from fusion_jax.online import OnlineTeacher, load_frozen
    from fusion_jax.tokenizers import check_vocab_size, load_tokenizer

    online = [t for t in teachers if t.mode == "online"]
    if not online:
        return (), None
    for t in online:  # before any weight is read
        check_vocab_size(load_tokenizer(t.tokenizer or t.checkpoint), checkpoint.model_config(t.checkpoint).vocab_size,
                         t.checkpoint)
    maps = loader.vocab_maps()
    cfgs, frozen = load_frozen([t.checkpoint for t in online], [maps[t.name] for t in online], mesh, rules,
                               param_dtype=cfg.capture.param_dtype, compute_dtype=cfg.capture.compute_dtype)
    specs = tuple(OnlineTeacher(name=t.name, model=m, k=cfg.loader.k, topk=max(cfg.capture.k, cfg.loader.k),
                                fallback=t.fallback) for t, m in zip(online, cfgs))
    log.info("online teachers: %s (%s params, frozen)", ", ".join(t.name for t in online), cfg.capture.param_dtype)
    return specs, frozen


# ------------------------------------------------------------------------------------------------ metrics


class MetricsLog:
    """JSONL (one object per logged step; a resumed run appends, later lines win) and TensorBoard event files."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        for k, v in _flat(values).items():
            self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _flat(values: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


def peak_flops(cfg: TrainConfig) -> float:
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k) or k in kind), 0.0)


# ------------------------------------------------------------------------------------------------ the run


def dry_run(cfg: TrainConfig) -> dict:
    """The sharded train state built abstractly: bytes per device of params and optimizer state (and of online
    teachers), each param's shape and sharding, the largest per-device leaf and what stays replicated; nothing
    allocated. Activations and the step's temporaries are not included (docs/scaling.md)."""
    from fusion_jax.convert import checkpoint
    from fusion_jax.optim import make_optimizer
    from fusion_jax.train_step import abstract_state

    mesh = mesh_lib.make_mesh(cfg.mesh)
    model_cfg = checkpoint.model_config(cfg.target, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype,
                                        remat=cfg.remat)
    abstract = abstract_state(model_cfg, make_optimizer(cfg.optimizer, cfg.train.steps), mesh, cfg.mesh.rules)
    per_device, param_leaves = {}, {}
    largest = {"leaf": "", "bytes": -1}
    replicated = {"leaves": 0, "bytes": 0}  # leaves every device holds whole (step counters, or a layout bug)
    for name, tree in abstract.items():
        total = 0
        for path, a in jax.tree_util.tree_leaves_with_path(tree):
            shard = a.sharding.shard_shape(a.shape)
            nbytes = int(np.prod(shard)) * a.dtype.itemsize
            total += nbytes
            where = "/".join(filter(None, [name, jax.tree_util.keystr(path, simple=True, separator="/")]))
            if nbytes > largest["bytes"]:
                largest = {"leaf": where, "bytes": nbytes}
            if tuple(shard) == tuple(a.shape) and len(mesh.devices.flat) > 1:
                replicated = {"leaves": replicated["leaves"] + 1, "bytes": replicated["bytes"] + nbytes}
            if name == "params":
                param_leaves[where.removeprefix("params/")] = {
                    "shape": list(a.shape), "dtype": str(a.dtype), "spec": [list(s) if isinstance(s, tuple) else s
                                                                            for s in a.sharding.spec],
                    "shard_shape": list(shard)}
        per_device[name] = total
    for t in teacher_list(cfg):
        if t.mode == "online":  # frozen params in capture.param_dtype, sharded like the target's
            t_cfg = checkpoint.model_config(t.checkpoint, param_dtype=cfg.capture.param_dtype)
            shardings = decoder.param_shardings(t_cfg, mesh, cfg.mesh.rules)
            per_device[f"online/{t.name}"] = sum(
                int(np.prod(s.shard_shape(a.shape))) * a.dtype.itemsize
                for a, s in zip(jax.tree.leaves(decoder.abstract_params(t_cfg)), jax.tree.leaves(shardings)))
    report = {"mesh": dict(mesh.shape), "params": sum(int(np.prod(a.shape)) for a in
                                                      jax.tree.leaves(abstract["params"])),
              "bytes_per_device": per_device, "largest_leaf_per_device": largest, "replicated": replicated,
              "teachers": {t.name: t.mode for t in teacher_list(cfg)}, "param_shardings": param_leaves}
    print(_json_lines(report))
    return report


def _json_lines(obj, depth: int = 0) -> str:
    """JSON with one line per entry of the top two levels and anything deeper compact (one line per param leaf)."""
    if isinstance(obj, dict) and obj and depth < 2:
        pad = " " * (depth + 1)
        items = ",\n".join(f"{pad}{json.dumps(k)}: {_json_lines(v, depth + 1)}" for k, v in obj.items())
        return "{\n" + items + "\n" + " " * depth + "}"
    return json.dumps(obj)


def main(cfg: TrainConfig) -> dict:
    """The run (after the demo's assets when ``demo.enabled``; then the CLM baseline and the report when
    ``baseline``) → its report."""
    mesh_lib.initialize_distributed(cfg.mesh)
    timings = {}
    if cfg.demo.enabled:
        from fusion_jax.demo import build

        t = time.perf_counter()
        cfg = build.apply(cfg)
        dataclasses.replace(cfg, demo=dataclasses.replace(cfg.demo, enabled=False)).validate()  # as a user's run
        timings["demo assets"] = time.perf_counter() - t
    if cfg.dry_run:
        return dry_run(cfg)
    if cfg.baseline:
        from fusion_jax.data.documents import DocumentStore

        documents = documents_stage(cfg)
        if not len(DocumentStore(documents, "validation")):
            raise ValueError(f"{documents} has no held-out documents to compare the runs on: raise "
                             "data.validation_fraction or the corpus size (and use another run_dir)")
    t = time.perf_counter()
    report = fusion_run(cfg)
    timings["fusion run"] = time.perf_counter() - t
    report["timings"] = timings
    if cfg.baseline:
        from fusion_jax import compare

        report = compare.main(cfg, report)
    return report


def fusion_run(cfg: TrainConfig) -> dict:
    """Stages 1–5 of the module docstring for one run → its report (also in ``<run_dir>/report.json``)."""
    from tqdm import tqdm

    from fusion_jax.checkpointing import Checkpoints
    from fusion_jax.convert import checkpoint
    from fusion_jax.train_step import (abstract_state, eval_losses, flops_per_token, host_metrics, init_state,
                                       jit_train_step, make_train_step)

    run = Path(cfg.run_dir)
    run.mkdir(parents=True, exist_ok=True)
    if jax.process_index() == 0:  # one writer per file in a multi-host run (the run_dir is shared)
        (run / "config.json").write_text(json.dumps(config_loader.to_dict(cfg), indent=1))
    documents = documents_stage(cfg)
    teachers = capture_stage(cfg, documents)

    mesh = mesh_lib.make_mesh(cfg.mesh)
    rules = cfg.mesh.rules
    tgt_tok = cfg.target_tokenizer or cfg.target
    loader = FusionLoader(loader_config(cfg, teachers, "train"), documents, tgt_tok, split="train", mesh=mesh,
                          rules=rules, progress=cfg.train.progress)
    model_cfg, params = checkpoint.load(cfg.target, mesh, rules, param_dtype=cfg.param_dtype, remat=cfg.remat,
                                        compute_dtype=cfg.compute_dtype)
    online, frozen = load_online(cfg, teachers, loader, mesh, rules)
    extra = () if frozen is None else (frozen,)  # the online teachers' params: an argument, never donated
    step_fn, opt = make_train_step(model_cfg, cfg.fusion, cfg.loss, cfg.optimizer, cfg.train.steps, rules,
                                   online=online)
    abstract = abstract_state(model_cfg, opt, mesh, rules)
    ckpts = Checkpoints(run / "checkpoints", keep=cfg.train.keep_checkpoints)
    start = ckpts.latest_step()
    if start is not None:
        del params
        state, loader_state, start = ckpts.restore(abstract)
        loader.restore(loader_state)
        log.info("resumed from %s at step %d", ckpts.directory / str(start), start)
    else:
        state, start = init_state(params, opt, abstract), 0
    train_step = jit_train_step(step_fn, abstract, loader.element_spec(), mesh, frozen=frozen)
    metrics_log = MetricsLog(run, jax.process_index() == 0)
    tokens_per_step = cfg.loader.global_batch_size * cfg.loader.seq_len
    fpt = flops_per_token(model_cfg, cfg.loader.seq_len)
    peak = peak_flops(cfg) * jax.device_count()
    names = [t.name for t in teachers]
    evaluate = _Evaluator(cfg, teachers, documents, tgt_tok, model_cfg, mesh, rules, eval_losses, online, extra)
    online_names = [t.name for t in online]

    bar = tqdm(total=cfg.train.steps, initial=start, unit="step", dynamic_ncols=True,
               disable=not cfg.train.progress or jax.process_index() != 0)
    pending: tuple[int, Any, float] | None = None  # (step, device metrics, dispatch time): fetched one step later
    last_good = start if start else None
    t_prev = time.perf_counter()

    def finish(step: int, device_metrics, t_dispatch: float) -> dict:
        nonlocal t_prev, last_good
        m = host_metrics(device_metrics)
        now = time.perf_counter()
        if not all(math.isfinite(m[k]) for k in ("loss", "clm", "fusion", "grad_norm")):
            where = f"the last good checkpoint is step {last_good} in {ckpts.directory}" if last_good is not None \
                else "no checkpoint was written yet"
            raise FloatingPointError(
                f"step {step}: the loss is not finite (loss {m['loss']}, clm {m['clm']}, fusion {m['fusion']}, grad "
                f"norm {m['grad_norm']}); stopping without saving — {where}. Lower optimizer.learning_rate or check "
                "the teachers' caches")
        dt = max(now - t_prev, 1e-9)
        t_prev = now
        wins = np.asarray(m.pop("teacher_wins"))
        m["win_rate"] = dict(zip(names, (wins / max(wins.sum(), 1e-9)).tolist()))
        if online_names:
            m["src_overflow"] = dict(zip(online_names, [int(x) for x in m["src_overflow"]]))
        m["tokens_per_s"] = tokens_per_step / dt
        m["mfu"] = m["tokens_per_s"] * fpt / peak if peak else float("nan")
        bar.update(1)
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_s']:,.0f}", refresh=False)
        if step % cfg.train.log_every == 0 or step == cfg.train.steps:
            metrics_log.write(step, "train", m)
        return m

    last: dict = {}
    try:
        for step in range(start + 1, cfg.train.steps + 1):
            batch = next(loader)
            state, device_metrics = train_step(state, batch, *extra)
            if pending is not None:
                last = finish(*pending)
            pending = (step, device_metrics, time.perf_counter())
            save = step % cfg.train.checkpoint_every == 0 or step == cfg.train.steps
            if save or (cfg.train.eval_every and step % cfg.train.eval_every == 0):
                last = finish(*pending)  # validate this step before anything is written
                pending = None
                if save:
                    ckpts.save(step, state, loader.state())
                    last_good = step
                if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step != cfg.train.steps:
                    metrics_log.write(step, "eval", evaluate(state["params"]))
        if pending is not None:
            last = finish(*pending)
        ckpts.wait()
        final_eval = evaluate(state["params"])
        metrics_log.write(cfg.train.steps, "eval", final_eval)
    finally:
        bar.close()
        ckpts.close()
        metrics_log.close()
        loader.close()
    report = {"run_dir": str(run), "steps": cfg.train.steps, "resumed_from": start, "train": last,
              "eval": final_eval}
    if cfg.train.export:
        report["export"] = export_stage(cfg, model_cfg, state["params"])
    if jax.process_index() == 0:
        (run / "report.json").write_text(json.dumps(report, indent=1, default=float))
    return report


class _Evaluator:
    """Held-out bits per byte (per domain) and the fusion metrics on the validation caches."""

    def __init__(self, cfg, teachers, documents, tgt_tok, model_cfg, mesh, rules, eval_losses, online=(),
                 extra=()):
        from fusion_jax.data.documents import DocumentStore
        from fusion_jax.tokenizers import load_tokenizer

        self.cfg, self.model_cfg, self.mesh, self.rules = cfg, model_cfg, mesh, rules
        self.extra = extra  # the online teachers' frozen params, if any
        self.names = [t.name for t in teachers]
        self.store = DocumentStore(documents, "validation")
        self.tokenizer = load_tokenizer(tgt_tok)
        self.loader = FusionLoader(loader_config(cfg, teachers, "validation"), documents, tgt_tok, split="validation",
                                   mesh=mesh, rules=rules, progress=False) if len(self.store) else None
        self.batches = [self.loader.global_batch(i) for i in range(cfg.train.eval_batches)] if self.loader else []
        with jax.set_mesh(mesh):
            self.losses = jax.jit(eval_losses(model_cfg, cfg.fusion, cfg.loss, rules, online))

    def __call__(self, params) -> dict:
        from fusion_jax.evaluate import evaluate_bpb

        out: dict[str, Any] = {}
        if len(self.store):
            bpb = evaluate_bpb(self.model_cfg, params, self.tokenizer, self.store, mesh=self.mesh, rules=self.rules,
                               batch_size=self.cfg.loader.global_batch_size, seq_len=self.cfg.loader.seq_len,
                               append_eos=self.cfg.loader.append_eos, max_documents=self.cfg.train.eval_documents)
            out["bits_per_byte"] = bpb["bits_per_byte"]
            out["domains"] = {d: v["bits_per_byte"] for d, v in bpb["domains"].items()}
        sums: dict[str, Any] = {}
        for batch in self.batches:
            with jax.set_mesh(self.mesh):
                r = jax.device_get(self.losses(params, batch, *self.extra))
            for k, v in r.items():
                sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
        if sums:
            out["clm"] = float(sums["clm_sum"] / max(sums["clm_tokens"], 1))
            out["fusion"] = float(sums["fusion_sum"] / max(sums["fusion_tokens"], 1))
            wins = sums["teacher_wins"]
            out["win_rate"] = dict(zip(self.names, (wins / max(wins.sum(), 1e-9)).tolist()))
        return out


def export_stage(cfg: TrainConfig, model_cfg: ModelConfig, params) -> str:
    from fusion_jax.convert import checkpoint

    out = Path(cfg.run_dir) / "export"
    if (out / "config.json").exists():
        log.info("export: %s exists; kept", out)
        return str(out)
    model_type, hf_config = checkpoint.source_info(cfg.target)
    tok_dir = Path(cfg.target_tokenizer or cfg.target)
    checkpoint.save_hf(out, model_cfg, params, model_type=model_type, hf_config=hf_config,
                       tokenizer_dir=tok_dir if tok_dir.is_dir() else tok_dir.parent)
    return str(out)


def parse(argv: list[str] | None = None) -> TrainConfig:
    parser = cli.config_parser("python -m fusion_jax.train", __doc__, TrainConfig)
    parser.add_argument("--dry-run", action="store_true", help="print bytes per device of the sharded state and stop")
    return cli.parse_config(parser, TrainConfig, argv, {"dry_run": "dry_run=true"})


if __name__ == "__main__":
    cli.run(main, parse)
