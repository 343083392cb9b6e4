"""Does fusion help? A fusion run against its CLM baseline, its sources and its starting point (``baseline: true``).

After the fusion run in ``<run_dir>``:

1. the CLM baseline: the same target start, the same documents, batches (the loader's packing depends on the target
   tokens and the seed only), optimizer and steps, with λ = 1 and no teachers, in ``<run_dir>/clm`` (exported to
   ``<run_dir>/clm/export`` like the fused target); and, when the
   run's recipe is not the paper's (``compare_paper``), the paper's recipe the same way in ``<run_dir>/paper``
   (:func:`paper_config`);
2. held-out bits per byte of the starting target and of every source (each with its own tokenizer; bits per byte is
   comparable across tokenizers) on the documents the runs were evaluated on (``fusion_jax.evaluate.bpb``), cached in
   ``<run_dir>/evaluations.json`` by model and settings;
3. the alignment audit of every source → target pair on the held-out text (``fusion_jax.align.audit``, every mode);
4. greedy samples of every model (fused and CLM from their exports, the start, the sources) on the beginnings of
   ``samples`` held-out documents (``fusion_jax.evaluate.generate``), cached in ``<run_dir>/samples.json``; with
   ``train.tasks``, each run's benchmark results side by side;
5. ``report.md``, ``plots/*.png`` and ``report.json`` with ``{"bpb": {"fused"|"clm"|"paper"|"target_init"|"source:<name>":
   {"<domain>"|"all": bits per byte}}}`` (``fusion_jax.experiments.report``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path

import jax

from fusion_jax import mesh as mesh_lib
from fusion_jax import pipeline
from fusion_jax.align import audit as alignment_audit
from fusion_jax.config import loader as config_loader
from fusion_jax.config.schema import DemoConfig, TrainConfig
from fusion_jax.convert import checkpoint
from fusion_jax.data.documents import DocumentStore
from fusion_jax.errors import RunDirError
from fusion_jax.evaluate.bpb import evaluate_bpb
from fusion_jax.files import atomic_write_json, read_json
from fusion_jax.tokenizers import load_tokenizer

log = logging.getLogger("fusion_jax.experiments.compare")

_RECOMPUTED = "a cache of this comparison: delete it and it is recomputed"


def baseline_config(cfg: TrainConfig, documents: str) -> TrainConfig:
    """The CLM baseline of ``cfg``: no teachers, λ = 1, same start, documents, loader, optimizer and steps; exported
    (``<run_dir>/clm/export``, when the run exports) so that it can be evaluated wherever the fused target is."""
    clm = dataclasses.replace(cfg, sources=(), target_as_teacher=False,
                              loss=dataclasses.replace(cfg.loss, lm_weight=1.0, lm_weight_schedule="constant",
                                                       likelihood_weight=0.0))
    return _run_config(clm, "clm", documents, export=cfg.train.export)


def paper_config(cfg: TrainConfig) -> TrainConfig:
    """``cfg`` with the paper's recipe (FuseLLM: λ = 0.9 constant, MinCE per block, top-k CE on the fused
    distribution, teacher temperature 1, no likelihood matching) and the plain byte transfer (no ``continuation``, no
    ``in_context``, the tail renormalised);
    everything else — start, documents, sources, k, batches, optimizer, steps — unchanged."""
    return dataclasses.replace(
        cfg, sources=tuple(dataclasses.replace(s, continuation=False, in_context=False, tail="renormalize")
                           for s in cfg.sources),
        fusion=dataclasses.replace(cfg.fusion, method="min_ce", granularity="sequence", teacher_temperature=1.0),
        loss=dataclasses.replace(cfg.loss, lm_weight=0.9, lm_weight_schedule="constant", fusion_loss="ce",
                                 likelihood_weight=0.0))


def _run_config(cfg: TrainConfig, name: str, documents: str, export: bool = False) -> TrainConfig:
    """A comparison run of ``cfg`` in ``<run_dir>/<name>``: the same documents, no comparison of its own."""
    return dataclasses.replace(cfg, run_dir=str(Path(cfg.run_dir) / name),
                               data=dataclasses.replace(cfg.data, documents=documents),
                               train=dataclasses.replace(cfg.train, export=export), baseline=False, demo=DemoConfig())


def _bpb(report: dict) -> dict[str, float]:
    """A run's final eval ({"domains": {d: bpb}}) or an evaluate_bpb report ({"domains": {d: {"bits_per_byte"}}})
    → {domain: bpb, "all": bpb}."""
    domains = {d: v["bits_per_byte"] if isinstance(v, dict) else v for d, v in report.get("domains", {}).items()}
    return {**domains, "all": report["bits_per_byte"]}


def evaluate_models(cfg: TrainConfig, documents: str, cache: Path) -> dict[str, dict[str, float]]:
    """Held-out bits per byte of the starting target and of each source → {"target_init"|"source:<name>": {domain:
    bpb, "all": bpb}}; cached in ``cache`` by checkpoint and evaluation settings."""
    store = DocumentStore(documents, "validation")
    models = {"target_init": (cfg.target, cfg.target_tokenizer or cfg.target)}
    models.update({f"source:{s.name}": (s.checkpoint, s.tokenizer or s.checkpoint) for s in cfg.sources})
    settings = {"documents": str(Path(documents).absolute()), "batch_size": cfg.loader.global_batch_size,
                "seq_len": cfg.loader.seq_len, "append_eos": cfg.loader.append_eos,
                "max_documents": cfg.train.eval_documents}
    done = read_json(cache, RunDirError, fix=_RECOMPUTED) if cache.exists() else {}
    mesh = mesh_lib.make_mesh(cfg.mesh)
    out = {}
    for name, (ckpt, tok) in models.items():
        key = json.dumps({"checkpoint": str(Path(ckpt).absolute()), **settings}, sort_keys=True)
        if key not in done:
            model_cfg, params = checkpoint.load(ckpt, mesh, cfg.mesh.rules, compute_dtype=cfg.compute_dtype)
            r = evaluate_bpb(model_cfg, params, load_tokenizer(tok), store, mesh=mesh, rules=cfg.mesh.rules,
                             batch_size=cfg.loader.global_batch_size, seq_len=cfg.loader.seq_len,
                             append_eos=cfg.loader.append_eos, max_documents=cfg.train.eval_documents)
            done[key] = _bpb(r)
            del params
            if jax.process_index() == 0:  # one writer (multi-host: every process computes the same report)
                atomic_write_json(cache, done)  # a NaN bits per byte as null: strict JSON
            log.info("held-out bits per byte of %s: %s", name, done[key])
        out[name] = done[key]
    return out


def heldout_texts(documents: str, out_dir: Path, max_documents: int = 0) -> list[Path]:
    """The held-out documents as one text file per domain (the audit's input)."""
    store = DocumentStore(documents, "validation")
    n = len(store) if not max_documents else min(max_documents, len(store))
    by_domain: dict[str, list[str]] = {}
    for i in range(n):
        doc = store[i]
        by_domain.setdefault(doc.domain, []).append(doc.text)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for domain, texts in sorted(by_domain.items()):
        path = out_dir / f"{domain}.txt"
        path.write_text("\n\n".join(texts), encoding="utf-8")
        paths.append(path)
    return paths


def audit_stage(cfg: TrainConfig, documents: str, run: Path) -> dict:
    """The alignment audit of every source → target pair on the held-out text, every mode (cached in audit.json)."""
    path = run / "audit.json"
    sources = [s.tokenizer or s.checkpoint for s in cfg.sources]
    key = {"sources": sources, "target": cfg.target_tokenizer or cfg.target, "documents": documents,
           "modes": list(alignment_audit.MODES)}
    if path.exists():
        cached = read_json(path, RunDirError, fix=_RECOMPUTED)
        if cached.get("key") == key:
            return cached["audit"]
    if not sources:
        return {}
    texts = heldout_texts(documents, run / "heldout", cfg.train.eval_documents)
    report = alignment_audit.audit(sources, cfg.target_tokenizer or cfg.target, texts,
                                   max_tokens=cfg.data.max_tokens, cache_dir=cfg.loader.cache_dir or None).to_json()
    for pair, s in zip(report["pairs"], cfg.sources):
        pair["source"] = s.name  # the report names pairs by source
    atomic_write_json(path, {"key": key, "audit": report})
    return report


SAMPLE_TOKENS = 48  # new tokens per sample
SAMPLE_PROMPT_CHARS = 160  # a sample's prompt: the beginning of a held-out document, cut at a line end near this


def sample_prompts(documents: str, n: int) -> list[dict[str, str]]:
    """The beginnings of `n` held-out documents, the domains taken in turn: {"text", "domain"} each."""
    store = DocumentStore(documents, "validation")
    by_domain: dict[str, list[int]] = {}
    for i in range(len(store)):
        by_domain.setdefault(store[i].domain, []).append(i)
    order = [ids[j] for j in range(max(map(len, by_domain.values()), default=0)) for _, ids in sorted(by_domain.items())
             if j < len(ids)]
    prompts = []
    for i in order[:n]:
        doc = store[i]
        text = doc.text[:SAMPLE_PROMPT_CHARS]
        cut = text.rfind("\n", SAMPLE_PROMPT_CHARS // 2)
        prompts.append({"text": text[:cut + 1] if cut > 0 else text, "domain": doc.domain})
    return prompts


def samples_stage(cfg: TrainConfig, documents: str, models: dict[str, tuple[str, str]], cache: Path) -> dict:
    """Greedy continuations of ``cfg.samples`` held-out prompts by each of `models` ({name: (checkpoint,
    tokenizer)}) → {"prompts", "outputs": {name: [text]}, "max_new_tokens"}; cached in `cache` by checkpoint (and its
    files' step, for exports) and prompts."""
    from fusion_jax.evaluate.generate import Generator
    from fusion_jax.evaluate.model import load_model

    prompts = sample_prompts(documents, cfg.samples)
    done = read_json(cache, RunDirError, fix=_RECOMPUTED) if cache.exists() else {}
    mesh = mesh_lib.make_mesh(cfg.mesh)
    outputs = {}
    for name, (ckpt, tok) in models.items():
        key = json.dumps({"checkpoint": str(Path(ckpt).absolute()), "step": pipeline.export_step(ckpt),
                          "prompts": prompts, "max_new_tokens": SAMPLE_TOKENS}, sort_keys=True)
        if key not in done:
            model = load_model(ckpt, tok, mesh, cfg.mesh.rules, param_dtype="float32",
                               compute_dtype=cfg.compute_dtype, allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch)
            generated = Generator(model, batch_size=len(prompts)).generate([p["text"] for p in prompts],
                                                                           max_new_tokens=SAMPLE_TOKENS)
            done[key] = [g.text for g in generated]
            if jax.process_index() == 0:
                atomic_write_json(cache, done)
        outputs[name] = done[key]
    return {"prompts": prompts, "outputs": outputs, "max_new_tokens": SAMPLE_TOKENS}


def main(cfg: TrainConfig, fused_report: dict) -> dict:
    """Baseline, evaluations, audit and report after the fusion run ``cfg`` (see the module docstring)."""
    from fusion_jax.experiments.report import write_report  # matplotlib: imported only when a report is written

    run = Path(cfg.run_dir)
    times = {}
    t = time.perf_counter()
    documents = pipeline.documents_stage(cfg)
    clm_report = pipeline.fusion_run(baseline_config(cfg, documents))
    times["clm baseline"] = time.perf_counter() - t
    bpb = {"fused": _bpb(fused_report["eval"]), "clm": _bpb(clm_report["eval"])}
    reports = {"fused": fused_report, "clm": clm_report}
    curves = {"fused": str(run / "metrics.jsonl"), "clm": str(run / "clm" / "metrics.jsonl")}
    paper = paper_config(cfg)
    if cfg.compare_paper and cfg.sources and paper != cfg:
        t = time.perf_counter()
        paper = dataclasses.replace(paper, cache_dir=cfg.cache_dir or str(run / "cache"))  # the same captures
        reports["paper"] = pipeline.fusion_run(_run_config(paper, "paper", documents))
        bpb["paper"] = _bpb(reports["paper"]["eval"])
        curves["paper"] = str(run / "paper" / "metrics.jsonl")
        times["paper recipe"] = time.perf_counter() - t
    t = time.perf_counter()
    bpb.update(evaluate_models(cfg, documents, run / "evaluations.json"))
    times["evaluate sources and start"] = time.perf_counter() - t
    tasks = {name: report["eval"].get("tasks") for name, report in reports.items()}
    samples = {}
    if cfg.samples and "export" in fused_report:
        t = time.perf_counter()
        models = {"fused": (fused_report["export"], fused_report["export"])}
        if "export" in clm_report:
            models["clm"] = (clm_report["export"], clm_report["export"])
        models["target_init"] = (cfg.target, cfg.target_tokenizer or cfg.target)
        models.update({f"source:{s.name}": (s.checkpoint, s.tokenizer or s.checkpoint) for s in cfg.sources})
        samples = samples_stage(cfg, documents, models, run / "samples.json")
        times["samples"] = time.perf_counter() - t
    t = time.perf_counter()
    audit = audit_stage(cfg, documents, run) if jax.process_index() == 0 else {}  # host-side only
    times["alignment audit"] = time.perf_counter() - t
    if jax.process_index() != 0:
        return fused_report
    settings = {"steps": cfg.train.steps, "lm_weight": cfg.loss.lm_weight,
                "lm_weight_schedule": cfg.loss.lm_weight_schedule, "likelihood_weight": cfg.loss.likelihood_weight,
                "fusion": cfg.fusion.method,
                "granularity": cfg.fusion.granularity, "score": cfg.fusion.score,
                "learning_rate": cfg.optimizer.learning_rate, "batch": cfg.loader.global_batch_size,
                "seq_len": cfg.loader.seq_len, "k": cfg.loader.k, "target": cfg.target,
                "sources": ", ".join(f"{s.name} ({s.align}/{s.vocab_map}"
                                     + "".join(f"+{k}" for k in ("continuation", "in_context") if getattr(s, k))
                                     + ("+tail" if s.tail == "next_token" else "")
                                     + ")" for s in cfg.sources),
                "target_as_teacher": cfg.target_as_teacher}
    if cfg.demo.enabled:
        settings["seed"] = cfg.demo.seed
    results = {"bpb": bpb, "curves": curves, "tasks": {k: v for k, v in tasks.items() if v}, "samples": samples,
               "audit": audit, "settings": settings, "timings": {**fused_report.get("timings", {}), **times},
               "config": config_loader.to_dict(cfg)}
    return write_report(run, results)
