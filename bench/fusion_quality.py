"""Does fusion transfer what its sources know, and which choices matter? The demo (or another demo-based config) over
seeds, with the paper's ablations and the transfer study, each paired with the CLM baseline of its seed.

For each seed, the main job (``--config``, default ``configs/demo.yaml``, with ``demo.seed`` and ``loader.seed``: the
corpus order and code/prose partition, every initialisation and every run's data order change with it) runs in
``<out>/seed<N>``: assets, the fused run with the config's recipe, its CLM baseline (λ = 1) and, when that recipe is not
the paper's, the paper's as the report's ``paper`` row (λ = 0.9, MinCE per block, top-10, CE on the fused distribution;
byte alignment + prefix vocabulary map; the target as teacher 0): the rows ``paper`` and ``shipped``. Then, from the
same target start, on the same documents, batches and teacher caches (a capture serves every alignment and every
recipe), one fusion run per variant — the paper's recipe with one change — in ``<out>/seed<N>/variants/<name>``:

  avg_ce        fusion.method = avg_ce (softmax(−score/τ) weights, τ = 1)
  code_only     one source: the demo's code model (plus the target as teacher 0)
  prose_only    one source: the demo's prose model (plus the target as teacher 0)
  dtw_mined     align = fusellm (the official DTW), vocab_align = soft (MinED)
  dtw_em        align = fusellm, vocab_align = hard (exact match)
  lambda_0.7 … lambda_0.0   loss.lm_weight = 0.7, 0.5, 0.2, 0.0
  lambda_rise   λ from 0 rising linearly to 1 over the run (loss.lm_weight_schedule = hard_and_decay)
  token         fusion.granularity = token (MinCE per position)
  continuation  every source with continuation = true: rows inside a source token (align/continuation.py)
  continuation_lambda_0.5, continuation_lambda_rise   that and λ = 0.5, or λ rising from 0
  transfer      continuation and in_context (the text's next source token maps to the target's next token)
  transfer_lambda_0.5, transfer_lambda_0.0, transfer_lambda_rise   that and λ = 0.5, 0, or rising from 0
  tail, tail_lambda_0.5, tail_lambda_0.0, tail_lambda_rise   transfer with the teacher's mass outside each row's top-k
                given to the text's next token (sources' tail = next_token) instead of renormalised, and λ
  tail_lambda_rise_0.5   tail, λ from 0.5 rising linearly to 1
  transfer_lambda_rise_temp2   that, rising λ and the teachers' distributions at temperature 2
  likelihood_0.5, likelihood_1.0   transfer, and likelihood matching on byte chunks as that share μ of the fusion
                term (loss.likelihood_weight; τ = 100, tokenkit's); likelihood_0.5_t1, likelihood_1.0_t1: τ = 1
  likelihood_lambda_rise   transfer, μ = 0.5 and λ rising from 0

Measures, per domain, from held-out bits per byte: each run − the CLM baseline of its seed, and the **gap closed**
``G_d = (CLM − run) / (CLM − best source)`` with the domain's best source (``fusion_jax.experiments.report.gap_closed``;
undefined where no source beats CLM), mean ± sample std over the seeds. The last line is a JSON object:
``{"metric": "gap_closed_min_domain", "ours": <the best run's mean over seeds of its smaller G over the domains>,
"baseline": <the paper recipe's, the same>, "ratio": ours / baseline, "best": <its name>}``. Everything is cached:
rerunning continues where it stopped; ``--table-only`` prints the tables and the line from ``<out>/results.json``.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/fusion_quality.py                      # 3 seeds, every variant
    HF_HUB_OFFLINE=1 .venv/bin/python bench/fusion_quality.py --seeds 0 --variants lambda_0.5 token \\
        --set train.steps=60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_jax.config import loader as config_loader  # noqa: E402
from fusion_jax.config import schema  # noqa: E402
from fusion_jax.experiments import compare  # noqa: E402
from fusion_jax.experiments import run as experiment  # noqa: E402
from fusion_jax.experiments.demo import build  # noqa: E402
from fusion_jax.experiments.report import gap_closed  # noqa: E402

PAPER, SHIPPED, CLM = "paper", "shipped", "clm"
DOMAINS = ("code", "prose", "all")


Change = Callable[[schema.TrainConfig, schema.DemoConfig], schema.TrainConfig]


def _fusion(**kw) -> Change:
    return lambda cfg, demo: dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, **kw))


def _loss(**kw) -> Change:
    return lambda cfg, demo: dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **kw))


def _only(model: str) -> Change:
    return lambda cfg, demo: dataclasses.replace(
        cfg, sources=tuple(s for s in cfg.sources if s.name == getattr(demo, model).name))


def _align(vocab_align: str) -> Change:
    return lambda cfg, demo: dataclasses.replace(cfg, sources=tuple(
        dataclasses.replace(s, align="fusellm", vocab_align=vocab_align) for s in cfg.sources))


def _sources(**kw) -> Change:
    return lambda cfg, demo: dataclasses.replace(cfg, sources=tuple(dataclasses.replace(s, **kw) for s in cfg.sources))


_continuation = _sources(continuation=True)
_transfer = _sources(continuation=True, in_context=True)
_tail = _sources(continuation=True, in_context=True, tail="next_token")
_RISE = {"lm_weight": 0.0, "lm_weight_schedule": "hard_and_decay"}


def _both(*changes: Change) -> Change:
    def change(cfg: schema.TrainConfig, demo: schema.DemoConfig) -> schema.TrainConfig:
        for c in changes:
            cfg = c(cfg, demo)
        return cfg
    return change


VARIANTS: dict[str, Change] = {
    "avg_ce": _fusion(method="avg_ce"),
    "code_only": _only("code"),
    "prose_only": _only("prose"),
    "dtw_mined": _align("soft"),
    "dtw_em": _align("hard"),
    **{f"lambda_{lam}": _loss(lm_weight=lam) for lam in (0.7, 0.5, 0.2, 0.0)},
    "lambda_rise": _loss(**_RISE),
    "token": _fusion(granularity="token"),
    "continuation": _continuation,
    "continuation_lambda_0.5": _both(_continuation, _loss(lm_weight=0.5)),
    "continuation_lambda_rise": _both(_continuation, _loss(**_RISE)),
    "transfer": _transfer,
    **{f"transfer_lambda_{lam}": _both(_transfer, _loss(lm_weight=lam)) for lam in (0.5, 0.0)},
    "transfer_lambda_rise": _both(_transfer, _loss(**_RISE)),
    "tail": _tail,
    **{f"tail_lambda_{lam}": _both(_tail, _loss(lm_weight=lam)) for lam in (0.5, 0.0)},
    "tail_lambda_rise": _both(_tail, _loss(**_RISE)),
    "tail_lambda_rise_0.5": _both(_tail, _loss(lm_weight=0.5, lm_weight_schedule="hard_and_decay")),
    "transfer_lambda_rise_temp2": _both(_transfer, _loss(**_RISE), _fusion(teacher_temperature=2.0)),
    **{f"likelihood_{mu}": _both(_transfer, _loss(likelihood_weight=mu)) for mu in (0.5, 1.0)},
    **{f"likelihood_{mu}_t1": _both(_transfer, _loss(likelihood_weight=mu, likelihood_temperature=1.0))
       for mu in (0.5, 1.0)},
    "likelihood_lambda_rise": _both(_transfer, _loss(likelihood_weight=0.5, **_RISE)),
}


def variant(applied: schema.TrainConfig, demo: schema.DemoConfig, name: str, run_dir: Path) -> schema.TrainConfig:
    """The paper recipe's config (``compare.paper_config`` of the main job) with one change, reading the seed's
    documents and teacher caches."""
    if name not in VARIANTS:
        raise ValueError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}")
    base = Path(applied.run_dir)
    cfg = dataclasses.replace(
        applied, run_dir=str(run_dir), cache_dir=applied.cache_dir or str(base / "cache"),
        data=dataclasses.replace(applied.data, documents=str(base / "documents")), baseline=False,
        demo=schema.DemoConfig(), train=dataclasses.replace(applied.train, eval_every=0, export=False))
    return VARIANTS[name](compare.paper_config(cfg), demo)


def _bpb(report: dict) -> dict[str, float]:
    ev = report["eval"]
    return {**ev["domains"], "all": ev["bits_per_byte"]}


def run_seed(config: str, seed: int, out: Path, overrides: list[str], names: list[str]) -> dict[str, dict[str, float]]:
    """{row: {domain: held-out bpb}} of one seed: the paper recipe, CLM, the start, the sources and the variants."""
    run_dir = out / f"seed{seed}"
    cfg = config_loader.load(schema.TrainConfig, config,
                             [f"run_dir={run_dir}", f"demo.seed={seed}", f"loader.seed={seed}", *overrides])
    t = time.perf_counter()
    report = experiment.main(cfg)
    logging.info("seed %d: the paper recipe and CLM in %.0f s", seed, time.perf_counter() - t)
    bpb = report["bpb"]
    rows = {PAPER: bpb.get("paper", bpb["fused"]), CLM: bpb["clm"], "target_init": bpb["target_init"]}
    if "paper" in bpb:  # the main job runs another recipe (the shipped one) and the paper's as its report row
        rows[SHIPPED] = bpb["fused"]
    rows.update({k: v for k, v in report["bpb"].items() if k.startswith("source:")})
    applied = build.apply(cfg)
    for name in names:
        t = time.perf_counter()
        rows[name] = _bpb(experiment.main(variant(applied, cfg.demo, name, run_dir / "variants" / name)))
        logging.info("seed %d: %s in %.0f s: %s", seed, name, time.perf_counter() - t, rows[name])
    return rows


def _runs(rows: dict) -> list[str]:
    """The trained rows: the paper recipe and the variants (not CLM, the start or the sources)."""
    return [n for n in rows if n not in (CLM, "target_init") and not n.startswith("source:")]


def gaps(rows: dict[str, dict[str, float]]) -> dict[str, dict[str, float | None]]:
    """{run: {domain: gap closed}} of one seed's rows, each run against that seed's CLM and sources."""
    sources = {k: v for k, v in rows.items() if k.startswith("source:")}
    return {n: gap_closed({"fused": rows[n], "clm": rows[CLM], **sources}) for n in _runs(rows)}


def _stat(xs: list[float], fmt: str) -> str:
    if not xs:
        return "n/a"
    return format(statistics.mean(xs), fmt) + (f" ± {format(statistics.stdev(xs), fmt.lstrip('+'))}" if len(xs) > 1
                                               else "")


def _grid(title: str, names: list[str], cell: Callable[[str, str], str]) -> list[str]:
    return ["", title, "", "| run | " + " | ".join(DOMAINS) + " |", "|---|" + "---:|" * len(DOMAINS),
            *[f"| {n} | " + " | ".join(cell(n, d) for d in DOMAINS) + " |" for n in names]]


def summary(results: dict[int, dict[str, dict[str, float]]]) -> dict:
    """The last line's object: the run with the highest mean (over seeds) of its smaller gap closed over the source
    domains (code, prose), against the paper recipe's."""
    seeds = sorted(results)
    per_seed = {s: gaps(results[s]) for s in seeds}

    def worst_domain(name: str) -> float | None:
        xs = []
        for s in seeds:
            g = [per_seed[s].get(name, {}).get(d) for d in ("code", "prose")]
            if any(x is None for x in g):
                return None
            xs.append(min(g))
        return statistics.mean(xs)

    scores = {n: worst_domain(n) for n in _runs(results[seeds[0]])}
    valid = {n: v for n, v in scores.items() if v is not None}
    best = max(valid, key=valid.get) if valid else None
    ours, base = (valid.get(best) if best else None), scores.get(PAPER)
    ratio = ours / base if ours is not None and base is not None and base > 0 else None
    return {"metric": "gap_closed_min_domain", "ours": ours, "baseline": base, "ratio": ratio, "best": best,
            "seeds": seeds, "per_run": scores}


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    seeds = sorted(results)
    names = list(results[seeds[0]])
    runs = _runs(results[seeds[0]])
    per_seed = {s: gaps(results[s]) for s in seeds}

    def bpb(n: str, d: str) -> str:
        return _stat([results[s][n][d] for s in seeds if d in results[s].get(n, {})], ".4f")

    def vs_clm(n: str, d: str) -> str:
        return _stat([results[s][n][d] - results[s][CLM][d] for s in seeds
                      if d in results[s].get(n, {}) and d in results[s][CLM]], "+.4f")

    def gap(n: str, d: str) -> str:
        xs = [100 * g for s in seeds if (g := per_seed[s].get(n, {}).get(d)) is not None]
        return _stat(xs, "+.1f") + (" %" if xs else "")

    lines = [f"held-out bits per byte, mean ± std over seeds {seeds} (lower is better)"]
    lines += _grid("", names, bpb)[2:]
    lines += _grid("each run − the CLM baseline of its seed (paired; negative: better than CLM)", runs, vs_clm)
    lines += _grid("gap closed, (CLM − run) / (CLM − best source of the domain), per seed then mean ± std", runs, gap)
    lines += ["", "the paper recipe − CLM per seed (negative: fusion better)", "",
              "| seed | " + " | ".join(DOMAINS) + " |", "|---|" + "---:|" * len(DOMAINS)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{results[s][PAPER][d] - results[s][CLM][d]:+.4f}" for d in DOMAINS)
                     + " |")
    return "\n".join(lines)


def _print(results: dict[int, dict[str, dict[str, float]]]) -> None:
    print(table(results))
    print(json.dumps(summary(results), default=lambda x: None if isinstance(x, float) and not math.isfinite(x) else x))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"),
                        help="a demo-based run config (demo.enabled; e.g. configs/real_teacher.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/fusion_quality")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=sorted(VARIANTS))
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the config (applies to every run), e.g. train.steps=60")
    parser.add_argument("--table-only", action="store_true", help="print the tables of <out>/results.json and stop")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.table_only:
        saved = json.loads((out / "results.json").read_text())
        _print({int(k): v for k, v in saved.items()})
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for name in ("jax", "absl", "fusion_jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["train.progress=false", *args.overrides]
    results = {s: run_seed(args.config, s, out, overrides, args.variants) for s in args.seeds}
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    (out / "table.md").write_text(table(results) + "\n")
    _print(results)


if __name__ == "__main__":
    main()
