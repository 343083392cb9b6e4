"""Does fusion help, and which choices matter? The demo's comparison over seeds, plus the paper's ablations at this scale.

For each seed, the main job (``configs/demo.yaml`` with ``demo.seed`` and ``loader.seed``: the corpus order and
code/prose partition, every initialisation and every run's data order change with it) runs in ``<out>/seed<N>``: assets, the fused run (λ = 0.9,
MinCE, byte alignment + prefix vocab map, two sources and the target as teacher 0) and its CLM baseline (λ = 1).
Then, from the same target start, on the same documents, batches and teacher caches (a capture serves every
alignment), one fusion run per ablation in ``<out>/seed<N>/ablations/<name>``:

  avg_ce        fusion.method = avg_ce (official weights)
  code_only     one source: mpt_code (plus the target as teacher 0)
  prose_only    one source: neox_prose (plus the target as teacher 0)
  dtw_mined     align = fusellm (the official DTW), vocab_align = soft (MinED)
  dtw_em        align = fusellm, vocab_align = hard (exact match)

The table is held-out bits per byte (lower is better), mean ± sample std over the seeds, per domain, and the fused −
CLM margin per seed. Everything is cached: rerunning continues where it stopped.

    HF_HUB_OFFLINE=1 .venv/bin/python bench/fusion_quality.py                      # 3 seeds, the demo's size
    HF_HUB_OFFLINE=1 .venv/bin/python bench/fusion_quality.py --seeds 0 --set train.steps=60
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fusion_jax.config import loader as config_loader  # noqa: E402
from fusion_jax.experiments import run as experiment  # noqa: E402
from fusion_jax.config import schema  # noqa: E402
from fusion_jax.experiments.demo import build  # noqa: E402
from fusion_jax.experiments.demo.build import DemoConfig  # noqa: E402

ABLATIONS = ("avg_ce", "code_only", "prose_only", "dtw_mined", "dtw_em")
DOMAINS = ("code", "prose", "all")


def ablation(applied: schema.TrainConfig, name: str, run_dir: Path) -> schema.TrainConfig:
    """The fused run's config with one change, reading the seed's documents and teacher caches."""
    base = Path(applied.run_dir)
    cfg = dataclasses.replace(
        applied, run_dir=str(run_dir), cache_dir=applied.cache_dir or str(base / "cache"),
        data=dataclasses.replace(applied.data, documents=str(base / "documents")), baseline=False, demo=DemoConfig(),
        train=dataclasses.replace(applied.train, eval_every=0, export=False))
    code, prose = applied.sources
    if name == "avg_ce":
        return dataclasses.replace(cfg, fusion=dataclasses.replace(cfg.fusion, method="avg_ce"))
    if name == "code_only":
        return dataclasses.replace(cfg, sources=(code,))
    if name == "prose_only":
        return dataclasses.replace(cfg, sources=(prose,))
    if name in ("dtw_mined", "dtw_em"):
        vocab_align = "soft" if name == "dtw_mined" else "hard"
        return dataclasses.replace(cfg, sources=tuple(dataclasses.replace(s, align="fusellm", vocab_align=vocab_align)
                                                      for s in cfg.sources))
    raise ValueError(f"unknown ablation {name!r}; known: {ABLATIONS}")


def _bpb(report: dict) -> dict[str, float]:
    ev = report["eval"]
    return {**ev["domains"], "all": ev["bits_per_byte"]}


def run_seed(seed: int, out: Path, overrides: list[str], ablations: list[str]) -> dict[str, dict[str, float]]:
    run_dir = out / f"seed{seed}"
    cfg = config_loader.load(schema.TrainConfig, str(ROOT / "configs" / "demo.yaml"),
                             [f"run_dir={run_dir}", f"demo.seed={seed}", f"loader.seed={seed}", *overrides])
    t = time.perf_counter()
    report = experiment.main(cfg)
    logging.info("seed %d: demo in %.0f s", seed, time.perf_counter() - t)
    rows = {"fused (bytes+prefix, min_ce)": report["bpb"]["fused"], "clm (λ = 1)": report["bpb"]["clm"],
            "target_init": report["bpb"]["target_init"]}
    rows.update({k: v for k, v in report["bpb"].items() if k.startswith("source:")})
    applied = build.apply(cfg)
    for name in ablations:
        t = time.perf_counter()
        r = experiment.main(ablation(applied, name, run_dir / "ablations" / name))
        rows[name] = _bpb(r)
        logging.info("seed %d: %s in %.0f s: %s", seed, name, time.perf_counter() - t, rows[name])
    return rows


def table(results: dict[int, dict[str, dict[str, float]]]) -> str:
    seeds = sorted(results)
    names = list(results[seeds[0]])
    lines = [f"held-out bits per byte, mean ± std over seeds {seeds} (lower is better)", "",
             "| run | " + " | ".join(DOMAINS) + " |", "|---|" + "---:|" * len(DOMAINS)]
    for name in names:
        cells = []
        for d in DOMAINS:
            xs = [results[s][name][d] for s in seeds if d in results[s].get(name, {})]
            sd = f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else ""
            cells.append(f"{statistics.mean(xs):.4f}{sd}" if xs else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    fused, clm = names[0], names[1]
    lines += ["", "each run − the CLM baseline of its seed, mean ± std (paired: the seeds' held-out sets differ, so "
              "this is the comparison to read; negative: better than CLM)", "",
              "| run | " + " | ".join(DOMAINS) + " |", "|---|" + "---:|" * len(DOMAINS)]
    for name in names:
        if name == clm:
            continue
        cells = []
        for d in DOMAINS:
            xs = [results[s][name][d] - results[s][clm][d] for s in seeds
                  if d in results[s].get(name, {}) and d in results[s][clm]]
            sd = f" ± {statistics.stdev(xs):.4f}" if len(xs) > 1 else ""
            cells.append(f"{statistics.mean(xs):+.4f}{sd}" if xs else "n/a")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "fused − CLM per seed (negative: fusion better)", "",
              "| seed | " + " | ".join(DOMAINS) + " |", "|---|" + "---:|" * len(DOMAINS)]
    for s in seeds:
        lines.append(f"| {s} | " + " | ".join(f"{results[s][fused][d] - results[s][clm][d]:+.4f}" for d in DOMAINS)
                     + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default="runs/fusion_quality")
    parser.add_argument("--ablations", nargs="*", default=list(ABLATIONS), choices=ABLATIONS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override the demo config (applies to every run), e.g. train.steps=60")
    parser.add_argument("--table-only", action="store_true", help="print the tables of <out>/results.json and stop")
    args = parser.parse_args(argv)
    if args.table_only:
        saved = json.loads((Path(args.out) / "results.json").read_text())
        print(table({int(k): v for k, v in saved.items()}))
        return
    logging.basicConfig(level=logging.INFO, format="%(message)s", force=True)
    for name in ("jax", "absl", "fusion_jax"):
        logging.getLogger(name).setLevel(logging.WARNING)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    overrides = ["train.progress=false", *args.overrides]
    results = {s: run_seed(s, out, overrides, args.ablations) for s in args.seeds}
    text = table(results)
    (out / "results.json").write_text(json.dumps({str(k): v for k, v in results.items()}, indent=1))
    (out / "table.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
