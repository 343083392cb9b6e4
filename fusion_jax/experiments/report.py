"""The comparison report of a fusion run against its CLM baseline: ``report.md``, PNG plots and ``report.json``.

A fusion run trains the target on λ·CLM + (1−λ)·fusion; its baseline trains the same start with λ = 1 on the same
batches. After both, the pipeline calls :func:`write_report` with the held-out bits per byte of every model, the two
runs' ``metrics.jsonl`` files, the alignment audit, the settings and the stage timings. Every part but ``bpb`` is
optional and left out of the report when missing; non-finite numbers show as "n/a" and are skipped in the plots.

    write_report(run_dir, {"bpb": {"fused": {"all": 1.02, "code": 0.81}, "clm": {...}, "source:llama": {...}},
                           "curves": {"fused": "runs/fused/metrics.jsonl", "clm": "runs/clm/metrics.jsonl"},
                           "audit": audit_report.to_json(), "settings": {...}, "timings": {"train": 3600.0}})

The plots are drawn on :class:`matplotlib.figure.Figure` objects with the Agg canvas directly, never through pyplot,
so no display is touched, no global backend is switched for the caller and no figure outlives its function.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from fusion_jax.files import atomic_write_json, atomic_write_text

__all__ = ["PLOTS", "best_sources", "gap_closed", "margin", "model_order", "read_metrics", "write_report"]

PLOTS: tuple[str, ...] = ("bpb.png", "curves.png", "win_rate.png")
WELL_KNOWN = ("fused", "paper", "clm", "target_init")
NA = "n/a"
DPI = 130
MAX_WIDTH = 22.0  # inches, for the bar chart of many domains
# Fixed colors for the well-known models; sources (and teachers, by the same name) take the rest of tab10 in order.
FIXED_COLORS = {"fused": "tab:blue", "paper": "tab:cyan", "clm": "tab:orange", "target_init": "tab:gray"}
OTHER_COLORS = ("tab:green", "tab:red", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "#1f3d7a", "#7a5c1f", "#5c1f7a", "#1f7a5c", "#7a1f3d")
# Domains in the eval panel: "all" black, the rest from Dark2, so they are not mistaken for the models' colors.
DOMAIN_COLORS = ("#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666")


# ---------------------------------------------------------------------------------------------------------------
# Numbers, names and markdown


def _num(x: Any) -> float | None:
    """x as a finite float, or None (missing, NaN, ±inf, bool, not a number)."""
    if isinstance(x, bool) or not isinstance(x, (int, float, np.integer, np.floating)):
        return None
    x = float(x)
    return x if math.isfinite(x) else None


def _fmt(x: Any, digits: int = 4) -> str:
    v = _num(x)
    return NA if v is None else f"{v:.{digits}f}"


def _pct(share: Any, digits: int = 1) -> str:
    """A share (0..1) as a percentage."""
    v = _num(share)
    return NA if v is None else f"{100 * v:.{digits}f} %"


def _int(x: Any) -> str:
    v = _num(x)
    return NA if v is None else f"{int(v):,}"


def _duration(seconds: Any) -> str:
    v = _num(seconds)
    if v is None:
        return NA
    m, s = divmod(int(round(v)), 60)
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min" if h else (f"{m} min {s:02d} s" if m else f"{v:.1f} s")


def _cell(x: Any) -> str:
    """A settings value for a table cell: numbers and strings as they are, anything else as compact JSON."""
    if isinstance(x, float):
        return f"{x:g}" if math.isfinite(x) else NA
    text = x if isinstance(x, str) else json.dumps(x, default=str) if isinstance(x, (dict, list, tuple)) else str(x)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[bool] | None = None) -> list[str]:
    """GitHub markdown table lines; ``right[i]``: right-align column i (numbers)."""
    right = right or [False] * len(header)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def model_order(names: Iterable[str]) -> list[str]:
    """fused, clm, target_init, then ``source:*`` sorted, then any other model sorted."""
    def key(name: str) -> tuple:
        if name in WELL_KNOWN:
            return (0, WELL_KNOWN.index(name), "")
        return (1 if name.startswith("source:") else 2, 0, name)
    return sorted(set(names), key=key)


def _domain_order(names: Iterable[str]) -> list[str]:
    """"all" (every document together) first, then the domains sorted."""
    return sorted(set(names), key=lambda d: (d != "all", d))


def _colors(names: Iterable[str]) -> dict[str, str]:
    """A color per model; ``source:X`` and teacher ``X`` share one, so the bar chart and the win rates agree."""
    out = {n: FIXED_COLORS[n] for n in names if n in FIXED_COLORS}
    rest = sorted({n.removeprefix("source:") for n in names if n not in FIXED_COLORS})
    for i, n in enumerate(rest):
        c = OTHER_COLORS[i % len(OTHER_COLORS)]
        out[n] = out[f"source:{n}"] = c
    return out


# ---------------------------------------------------------------------------------------------------------------
# metrics.jsonl


def read_metrics(path: str | Path) -> dict[str, dict[int, dict]]:
    """Read a run's ``metrics.jsonl`` → {kind: {step: record}} with the steps ascending.

    A later line for the same (kind, step) wins (a resumed run appends). A line that cannot be parsed is skipped with
    a warning: the last line of a crashed run is often cut short; if a resumed run then appended onto that cut line,
    the record that starts after the cut is still read. Lines without an integer ``step`` or a ``kind`` are skipped.
    """
    path = Path(path)
    out: dict[str, dict[int, dict]] = {}
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        rec, glued = _parse_line(line)
        if rec is None:
            where = "the last line (cut short by a crash?)" if i == last else f"line {i + 1}"
            warnings.warn(f"{path}: ignoring {where}: not a JSON object: {line[:80]!r}", RuntimeWarning, stacklevel=2)
            continue
        if glued:
            warnings.warn(f"{path}: line {i + 1}: dropped a cut-short record (a crash?) before the one that follows "
                          f"on the same line: {line[:glued][:80]!r}", RuntimeWarning, stacklevel=2)
        try:
            step, kind = int(rec["step"]), str(rec["kind"])
        except (KeyError, TypeError, ValueError):
            warnings.warn(f"{path}: ignoring line {i + 1}: no step/kind", RuntimeWarning, stacklevel=2)
            continue
        out.setdefault(kind, {})[step] = rec
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def _parse_line(line: str) -> tuple[dict | None, int]:
    """One metrics line → (record or None, where it starts). A record glued onto a cut-short one (MetricsLog writes
    ``step`` first) is read from the line's last ``{"step"``."""
    for start in (0, line.rfind('{"step"')):
        if start < 0:
            continue
        try:
            rec = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(rec, dict):
            return rec, start
    return None, 0


def _series(records: dict[int, dict], *keys: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of ``record[k0][k1]…`` over the records, finite values only."""
    xs, ys = [], []
    for step, rec in records.items():
        v: Any = rec
        for k in keys:
            v = v.get(k) if isinstance(v, dict) else None
        if (y := _num(v)) is not None:
            xs.append(step)
            ys.append(y)
    return np.asarray(xs, float), np.asarray(ys, float)


def _load_curves(curves: dict, run_dir: Path) -> dict[str, dict[str, dict[int, dict]]]:
    """{run: read_metrics(path)} for the runs whose file can be found (a relative path is tried from the working
    directory, then from run_dir; a directory means its metrics.jsonl). Missing files are warned about and left out."""
    out = {}
    for run, p in curves.items():
        cands = [Path(p), run_dir / p]
        cands = [c / "metrics.jsonl" if c.is_dir() else c for c in cands]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            warnings.warn(f"curves[{run!r}]: {p} not found; left out of the report", RuntimeWarning, stacklevel=3)
            continue
        out[run] = read_metrics(found)
    return {r: out[r] for r in model_order(out)}


# ---------------------------------------------------------------------------------------------------------------
# Plots


def _save(fig: Figure, path: Path) -> str:
    """Write the figure as PNG at ``path`` → its markdown path ``plots/<name>``."""
    FigureCanvasAgg(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, format="png")
    return f"plots/{path.name}"


def _y_range(values: Sequence[float]) -> tuple[float, bool]:
    """Lower y limit for bars of these values and whether it is above 0: the bars start below the smallest value by
    0.4 × the spread, so differences of a few percent stay visible, unless that comes close to 0 anyway."""
    lo, hi = min(values), max(values)
    spread = max(hi - lo, 0.05 * abs(hi), 1e-6)
    bottom = lo - 0.4 * spread
    if lo <= 0 or bottom <= 0.25 * lo:
        return min(0.0, lo - 0.1 * spread), False
    return bottom, True


def plot_bpb(bpb: dict[str, dict[str, float]], path: Path) -> str | None:
    """Write the grouped bar chart of bits per byte (one group per domain, one color per model, value labels) →
    its markdown path, or None when no finite value is given."""
    models = model_order(bpb)
    domains = _domain_order(d for m in models for d in bpb[m])
    finite = [v for m in models for d in domains if (v := _num(bpb[m].get(d))) is not None]
    if not finite:
        return None
    colors = _colors(models)
    n = len(models)
    width = 0.8 / n
    fig_width = min(MAX_WIDTH, max(6.0, 1.2 + len(domains) * (0.45 * n + 0.5)))
    # A rotated value label needs ≈ 0.13 in of bar width; narrower bars (many domains × models) go without (the
    # table has the numbers).
    labels = fig_width * 0.75 / len(domains) * width >= 0.13
    fig = Figure(figsize=(fig_width, 4.8), layout="constrained")
    ax = fig.add_subplot()
    for i, m in enumerate(models):
        pts = [(j, v) for j, d in enumerate(domains) if (v := _num(bpb[m].get(d))) is not None]
        if not pts:
            continue
        xs = [j - 0.4 + width * (i + 0.5) for j, _ in pts]
        bars = ax.bar(xs, [v for _, v in pts], width * 0.92, label=m, color=colors[m], edgecolor="white", lw=0.5)
        if labels:
            ax.bar_label(bars, labels=[f"{v:.3f}" for _, v in pts], rotation=90, padding=2, fontsize=7.5)
    bottom, cut = _y_range(finite)
    top = max(finite)
    # Room above the tallest bar for its rotated label (≈ 25 % of the visible height).
    ax.set_ylim(bottom, top + 0.33 * (top - bottom))
    many = len(domains) > 8
    ax.set_xticks(range(len(domains)), domains, rotation=30 if many else 0, ha="right" if many else "center",
                  rotation_mode="anchor")
    ax.set_xlabel("domain")
    ax.set_ylabel("bits per byte (lower is better)" + (f"\naxis starts at {bottom:.2f}, not 0" if cut else ""))
    ax.set_title("Held-out bits per byte")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="model", title_fontsize=8)
    return _save(fig, path)


def _smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Centered moving average with the window shrunk at the ends (no lag, no edge dip)."""
    if window <= 1 or len(y) < 3:
        return y
    h = window // 2
    c = np.concatenate([[0.0], np.cumsum(y)])
    idx = np.arange(len(y))
    lo, hi = np.maximum(idx - h, 0), np.minimum(idx + h + 1, len(y))
    return (c[hi] - c[lo]) / (hi - lo)


def _plot_line(ax, x: np.ndarray, y: np.ndarray, label: str, color: str, **kw) -> None:
    """A train curve: raw values faint and a moving average on top when there are many points."""
    if len(x) > 40:
        ax.plot(x, y, color=color, alpha=0.25, lw=0.8)
        y = _smooth(y, max(3, len(y) // 25))
    ax.plot(x, y, color=color, label=label, lw=1.6, **kw)


def _eval_domains(records: dict[int, dict]) -> list[str]:
    """Domains of eval records: "all" (the overall bits_per_byte) and every key of ``domains``."""
    names = set()
    for rec in records.values():
        if _num(rec.get("bits_per_byte")) is not None:
            names.add("all")
        if isinstance(rec.get("domains"), dict):
            names.update(rec["domains"])
    return _domain_order(names)


def _eval_bpb(records: dict[int, dict], domain: str) -> tuple[np.ndarray, np.ndarray]:
    return _series(records, "bits_per_byte") if domain == "all" else _series(records, "domains", domain)


def _panel_clm(ax, runs: dict, colors: dict) -> None:
    for run, m in runs.items():
        x, y = _series(m.get("train", {}), "clm")
        if len(x):
            _plot_line(ax, x, y, run, colors.get(run, "k"))
    ax.set_title("Train CLM loss (the term both runs share)")
    ax.set_ylabel("CLM loss (nats / token)")


def _panel_fusion(ax, records: dict[int, dict], color: str) -> None:
    x, y = _series(records, "fusion")
    _plot_line(ax, x, y, "fused: fusion loss (train)", color)
    ax.set_title("Fused run: fusion loss")
    ax.set_ylabel("fusion loss (nats / token)")


def _panel_eval(ax, runs: dict) -> None:
    """Held-out bpb per domain over steps: one color per domain, one line style per run."""
    domains = _domain_order(d for m in runs.values() for d in _eval_domains(m.get("eval", {})))
    others = [d for d in domains if d != "all"]
    cmap = {"all": "black", **{d: DOMAIN_COLORS[i % len(DOMAIN_COLORS)] for i, d in enumerate(others)}}
    styles = dict(zip(runs, ["-", "--", ":", "-."] * 4))
    for run, m in runs.items():
        for d in domains:
            x, y = _eval_bpb(m.get("eval", {}), d)
            if len(x):
                ax.plot(x, y, styles[run], color=cmap[d], marker="o", ms=3, lw=1.4)
    handles = [Line2D([], [], color=cmap[d], lw=2, label=d) for d in domains]
    handles += [Line2D([], [], color="0.3", ls=styles[r], lw=1.4, label=r) for r in runs]
    ax.legend(handles=handles, fontsize=7.5, ncol=2 if len(handles) > 6 else 1)
    ax.set_title("Held-out bits per byte")
    ax.set_ylabel("bits per byte")


def _has_eval_curve(runs: dict) -> bool:
    return any(step > 0 for m in runs.values() for step in m.get("eval", {}))


def plot_curves(runs: dict[str, dict[str, dict[int, dict]]], path: Path) -> str | None:
    """Write the training curves (train CLM loss of every run, the fused run's fusion loss, held-out bpb per domain
    when there are eval steps > 0) side by side → markdown path, or None when there is nothing to plot."""
    colors = _colors(runs)
    panels = []
    if any(len(_series(m.get("train", {}), "clm")[0]) for m in runs.values()):
        panels.append(lambda ax: _panel_clm(ax, runs, colors))
    fused = runs.get("fused", {}).get("train", {})
    if len(_series(fused, "fusion")[0]):
        panels.append(lambda ax: _panel_fusion(ax, fused, colors["fused"]))
    if _has_eval_curve(runs):
        panels.append(lambda ax: _panel_eval(ax, runs))
    if not panels:
        return None
    fig = Figure(figsize=(5.2 * len(panels), 4.2), layout="constrained")
    for i, draw in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        draw(ax)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if not ax.get_legend() and ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    return _save(fig, path)


def _win_rates(records: dict[int, dict]) -> tuple[list[int], list[str], np.ndarray]:
    """(steps, teachers, shares[step, teacher]) of the records with a complete, finite win_rate."""
    teachers = sorted({t for r in records.values() if isinstance(r.get("win_rate"), dict) for t in r["win_rate"]})
    steps, rows = [], []
    for step, rec in records.items():
        wr = rec.get("win_rate")
        vals = [_num(wr.get(t)) for t in teachers] if isinstance(wr, dict) else [None]
        if None not in vals:
            steps.append(step)
            rows.append(vals)
    return steps, teachers, np.asarray(rows, float).reshape(len(rows), len(teachers))


def plot_win_rate(records: dict[int, dict], path: Path) -> str | None:
    """Write the fused run's per-teacher win rates over the train steps as stacked areas → markdown path, or None
    when no step has them."""
    steps, teachers, shares = _win_rates(records)
    if not steps or not teachers:
        return None
    colors = _colors(teachers)
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    ax = fig.add_subplot()
    if len(steps) == 1:
        bottom = 0.0
        for t, v in zip(teachers, shares[0]):
            ax.bar(steps, [v], bottom=bottom, color=colors[t], label=t, width=0.8)
            bottom += v
    else:
        smooth = len(steps) > 40
        if smooth:  # a moving average of shares still sums to 1 per step
            shares = np.stack([_smooth(col, max(3, len(steps) // 25)) for col in shares.T], axis=1)
        ax.stackplot(steps, shares.T, labels=teachers, colors=[colors[t] for t in teachers], alpha=0.85)
        ax.set_xlim(steps[0], steps[-1])
    ax.set_ylim(0, max(1.0, float(shares.sum(1).max())))
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("share of positions won" + ("\n(moving average)" if len(steps) > 40 else ""))
    ax.set_title("Fused run: which teacher the fusion picks (train)")
    handles, labels = ax.get_legend_handles_labels()
    # Listed top to bottom as stacked.
    ax.legend(handles[::-1], labels[::-1], loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8,
              title="teacher", title_fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# Markdown sections


def best_sources(bpb: dict) -> dict[str, tuple[str, float]]:
    """{domain: (source name, its bits per byte)}: the source with the lowest held-out bits per byte in each domain
    (``bpb`` keys ``source:<name>``)."""
    best: dict[str, tuple[str, float]] = {}
    for model, domains in bpb.items():
        if not model.startswith("source:") or not isinstance(domains, dict):
            continue
        for d, v in domains.items():
            v = _num(v)
            if v is not None and (d not in best or v < best[d][1]):
                best[d] = (model.removeprefix("source:"), v)
    return best


def gap_closed(bpb: dict, run: str = "fused") -> dict[str, float | None]:
    """{domain: (CLM − run) / (CLM − best source)}: the share of the distance from the CLM baseline to the domain's
    best source that the run (``fused``, or ``paper``: the paper recipe's row) covered (1 = as good as that source, 0
    = no better than CLM, < 0 = worse than CLM). None where no source beats the CLM baseline (or a number is
    missing)."""
    fused, clm = bpb.get(run) or {}, bpb.get("clm") or {}
    best = best_sources(bpb)
    out: dict[str, float | None] = {}
    for d in _domain_order([*fused, *clm]):
        f, c = _num(fused.get(d)), _num(clm.get(d))
        b = best[d][1] if d in best else None
        out[d] = (c - f) / (c - b) if f is not None and c is not None and b is not None and c > b else None
    return out


def _headline(bpb: dict, settings: dict) -> list[str]:
    """Fused vs CLM baseline per domain: both bpb, the difference, the relative difference, who won, and the share of
    the gap to the domain's best source that fusion closed."""
    if "fused" not in bpb or "clm" not in bpb:
        missing = " and ".join(m for m in ("fused", "clm") if m not in bpb)
        return [f"_No headline: the results have no bits per byte for {missing}._", ""]
    fused, clm = bpb["fused"], bpb["clm"]
    domains = _domain_order([*fused, *clm])
    lam = _num(settings.get("lm_weight"))
    lines = ["Held-out bits per byte (lower is better) of the fused target against its CLM baseline (λ = 1, the same "
             "start and batches)" + (f"; the fused run used {_lambda_text(lam, settings)}." if lam is not None else ".")]
    best, closed = best_sources(bpb), gap_closed(bpb)
    rows, wins, scored = [], 0, 0
    for d in domains:
        f, c = _num(fused.get(d)), _num(clm.get(d))
        source = f"{best[d][1]:.4f} (`{best[d][0]}`)" if d in best else NA
        gap = NA if closed.get(d) is None else f"{100 * closed[d]:+.1f} %"
        if f is None or c is None:
            rows.append([d, _fmt(f), _fmt(c), NA, NA, NA, source, gap])
            continue
        diff = f - c
        rel = 100 * diff / c if c else math.nan
        verdict = "**won**" if diff < 0 else "lost" if diff > 0 else "tie"
        scored += 1
        wins += diff < 0
        rows.append([d, f"{f:.4f}", f"{c:.4f}", f"{diff:+.4f}", f"{rel:+.2f} %" if math.isfinite(rel) else NA, verdict,
                     source, gap])
    if scored:
        unscored = len(domains) - scored
        lines += ["", f"**Fusion beats the CLM baseline on {wins} of {scored} domain{'s' * (scored != 1)}**"
                  + _margin_sentence(fused, clm) + "."
                  + (f" ({unscored} more without a number for both.)" if unscored else "")
                  + _gap_sentence(closed)]
    lines += [""] + _table(["domain", "fused", "CLM baseline", "Δ bpb (fused − CLM)", "Δ %", "fusion", "best source",
                            "gap closed"], rows, [False, True, True, True, True, False, True, True]) + [""]
    lines += ["_Gap closed: (CLM − fused) / (CLM − best source), the share of the way from the CLM baseline to the "
              "domain's best source; n/a where no source beats CLM._", ""]
    if "paper" in bpb:
        lines += _paper_rows(bpb, domains)
    return lines


def _paper_rows(bpb: dict, domains: list[str]) -> list[str]:
    """The run's recipe against the paper's (trained from the same start on the same batches)."""
    fused, paper, clm = bpb["fused"], bpb["paper"], bpb["clm"]
    closed, closed_paper = gap_closed(bpb), gap_closed(bpb, "paper")
    rows = []
    for d in domains:
        f, p = _num(fused.get(d)), _num(paper.get(d))
        diff = NA if f is None or p is None else f"{f - p:+.4f}"
        gaps = [NA if g.get(d) is None else f"{100 * g[d]:+.1f} %" for g in (closed_paper, closed)]
        rows.append([d, _fmt(p), _fmt(f), diff, _fmt(_num(clm.get(d))), *gaps])
    return ["The paper's recipe (λ = 0.9, MinCE per block, top-k CE, the plain byte transfer) from the same start on "
            "the same batches, against this run's:", ""] + _table(
        ["domain", "paper recipe", "this run", "Δ bpb (run − paper)", "CLM baseline", "gap closed, paper",
         "gap closed, this run"], rows, [False, True, True, True, True, True, True]) + [""]


def _lambda_text(lam: float, settings: dict) -> str:
    if settings.get("lm_weight_schedule") == "hard_and_decay":
        return f"λ rising linearly from {lam:g} to 1"
    return f"λ = {lam:g}"


def _gap_sentence(closed: dict[str, float | None]) -> str:
    parts = [f"{d} {100 * g:+.1f} %" for d, g in closed.items() if g is not None]
    return f" Gap to the best source closed: {', '.join(parts)}." if parts else ""


def margin(fused: float, clm: float) -> str:
    """The fused − CLM margin as shown in the report: ``-0.0123 bpb (-1.05 %)``."""
    diff = fused - clm
    rel = f"{100 * diff / clm:+.2f} %" if clm else NA
    return f"{diff:+.4f} bpb ({rel})"


def _margin_sentence(fused: dict, clm: dict) -> str:
    f, c = _num(fused.get("all")), _num(clm.get("all"))
    if f is None or c is None:
        return ""
    return f"; on all documents: {f:.4f} vs {c:.4f}, {margin(f, c)}"


def _bpb_table(bpb: dict) -> list[str]:
    """Every model × domain, 4 decimals, the best (lowest) per domain in bold."""
    models = model_order(bpb)
    domains = _domain_order(d for m in models for d in bpb[m])
    best = {}
    for d in domains:
        vals = [v for m in models if (v := _num(bpb[m].get(d))) is not None]
        best[d] = min(vals) if vals else None
    rows = []
    for m in models:
        cells = []
        for d in domains:
            v = _num(bpb[m].get(d))
            cells.append(NA if v is None else f"**{v:.4f}**" if v == best[d] else f"{v:.4f}")
        rows.append([f"`{m}`", *cells])
    return _table(["model", *domains], rows, [False] + [True] * len(domains))


def _bpb_section(bpb: dict, plots: Path, written: list[str]) -> list[str]:
    lines = ["## Bits per byte, every model", ""]
    if not bpb:
        return lines + ["_No bits per byte in the results._", ""]
    lines += _bpb_table(bpb) + ["", "Bold: the best (lowest) per domain."]
    if (p := plot_bpb(bpb, plots / "bpb.png")) is not None:
        written.append(p)
        lines += ["", f"![held-out bits per byte per domain and model]({p})"]
    return lines + [""]


def _curves_section(runs: dict, plots: Path, written: list[str]) -> list[str]:
    p = plot_curves(runs, plots / "curves.png")
    if p is None:
        return []
    written.append(p)
    lines = ["## Training curves", ""]
    for run, m in runs.items():
        train, ev = m.get("train", {}), m.get("eval", {})
        span = f"steps {min(train)}–{max(train)}" if train else "no train steps"
        lines.append(f"- `{run}`: {len(train)} logged train steps ({span}), {len(ev)} eval step{'s' * (len(ev) != 1)}")
    lines += ["", "The left panel compares the CLM term, the one loss both runs optimise; long curves are smoothed "
              "(a moving average, the raw values faint).", "", f"![training curves]({p})", ""]
    return lines


def _win_rate_section(runs: dict, plots: Path, written: list[str]) -> list[str]:
    """Per-teacher win rates of the fused run: train average and the final eval's, and their plot."""
    m = runs.get("fused", {})
    _, train_t, train = _win_rates(m.get("train", {}))
    ev_steps, ev_t, ev = _win_rates(m.get("eval", {}))
    teachers = sorted({*train_t, *ev_t})
    if not teachers:
        return []
    avg = dict(zip(train_t, train.mean(0))) if len(train) else {}
    final = dict(zip(ev_t, ev[-1])) if len(ev) else {}
    final_head = f"final eval (step {ev_steps[-1]})" if ev_steps else "final eval"
    lines = ["## Teacher win rates (fused run)", "",
             "Share of positions where each teacher's distribution is the one the fusion picks.", ""]
    lines += _table(["teacher", f"train average ({len(train)} steps)", final_head],
                    [[f"`{t}`", _pct(avg.get(t)), _pct(final.get(t))] for t in teachers], [False, True, True])
    if (p := plot_win_rate(m.get("train", {}), plots / "win_rate.png")) is not None:
        written.append(p)
        lines += ["", f"![teacher win rates over the train steps]({p})"]
    return lines + [""]


def _audit_pair(pair: dict) -> list[str]:
    """One source → target pair: sizes and byte-group kinds, then one row per mode."""
    groups = pair.get("groups") or {}
    lines = [f"### `{pair.get('source', '?')}` → `{pair.get('target', '?')}`", ""]
    lines += _table(["documents", "bytes", "source tokens", "target tokens", *(f"{k} groups" for k in groups)],
                    [[_int(pair.get("documents")), _int(pair.get("bytes")), _int(pair.get("source_tokens")),
                      _int(pair.get("target_tokens")), *(_pct(v) for v in groups.values())]],
                    [True] * (4 + len(groups)))
    modes = pair.get("modes") or {}
    if modes:
        mass_keys = list(dict.fromkeys(k for s in modes.values() for k in (s.get("mass") or {})))
        mass_keys.sort(key=lambda k: k == "dropped")  # (stable) the kept categories first, dropped last
        rows = []
        for name, s in modes.items():
            pos, mass = _num(s.get("positions")), s.get("mass") or {}
            teacher = _num(s.get("teacher"))
            share = teacher / pos if teacher is not None and pos else None
            rows.append([f"`{name}`", _int(pos), _pct(share), *(_pct(mass[k]) if k in mass else "" for k in mass_keys),
                         _pct(s.get("agrees"))])
        lines += ["", *_table(["mode", "positions", "teacher row", *(f"mass {k}" for k in mass_keys), "agrees"], rows,
                              [False] + [True] * (3 + len(mass_keys)))]
    return lines + [""]


def _audit_section(audit: dict) -> list[str]:
    pairs = audit.get("pairs") or []
    if not pairs:
        return []
    lines = ["## Alignment audit", ""]
    if audit.get("oracle"):
        lines += [f"_{str(audit['oracle']).rstrip('.')}._", ""]
    lines += ["Groups: target tokens by the kind of byte group they fall in (source:target tokens). Teacher row: "
              "positions that get a row from the teacher; mass: where the oracle's mass goes; agrees: it lands on the "
              "target's actual next token.", ""]
    for pair in pairs:
        lines += _audit_pair(pair)
    return lines


def _tasks_section(tasks: dict) -> list[str]:
    """Benchmark tasks (lm-evaluation-harness): one row per task and metric, one column per model."""
    models = [m for m, t in tasks.items() if isinstance(t, dict) and t]
    if not models:
        return []
    keys = sorted({(task, metric) for m in models for task, metrics in tasks[m].items() for metric in metrics})
    rows = [[task, metric, *(_fmt((tasks[m].get(task) or {}).get(metric), 4) for m in models)] for task, metric in keys]
    return ["## Benchmark tasks", "", "lm-evaluation-harness on each model, the same tasks and settings (train.tasks).",
            "", *_table(["task", "metric", *models], rows, [False, False, *[True] * len(models)]), ""]


def _samples_section(samples: dict) -> list[str]:
    """Greedy continuations of held-out prompts by each model."""
    prompts = samples.get("prompts") or []
    outputs = samples.get("outputs") or {}
    if not prompts or not outputs:
        return []
    lines = ["## Samples", "", f"Greedy continuations (at most {samples.get('max_new_tokens')} tokens) of the "
             "beginnings of held-out documents, as escaped strings (a newline is \\n), so that whitespace shows.", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"**Prompt {i + 1}** ({prompt.get('domain', '')})", "", "```", prompt["text"].rstrip("\n"), "```", ""]
        rows = [[f"`{model}`", _escaped(texts[i] if i < len(texts) else "")] for model, texts in outputs.items()]
        lines += [*_table(["model", "continuation"], rows), ""]
    return lines


def _escaped(text: str) -> str:
    """A sample as one table cell: JSON-escaped (newlines, tabs), runs of spaces shown as ␣, pipes escaped."""
    body = json.dumps(text, ensure_ascii=False)[1:-1].replace("|", "\\|").replace("`", "'")
    return "`" + re.sub(r" {2,}", lambda m: "␣" * len(m.group()), body) + "`" if body else NA


def _settings_section(settings: dict) -> list[str]:
    if not settings:
        return []
    return ["## Settings", "", *_table(["setting", "value"], [[f"`{k}`", _cell(v)] for k, v in settings.items()]), ""]


def _timings_section(timings: dict) -> list[str]:
    if not timings:
        return []
    rows = [[str(k), _fmt(v, 1), _duration(v)] for k, v in timings.items()]
    total = sum(v for v in map(_num, timings.values()) if v is not None)
    rows.append(["**total**", f"**{total:.1f}**", f"**{_duration(total)}**"])
    return ["## Timings", "", *_table(["stage", "seconds", "duration"], rows, [False, True, True]), ""]


# ---------------------------------------------------------------------------------------------------------------
# Entry point


def _json_default(x: Any) -> Any:
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return dataclasses.asdict(x)
    return str(x)


def _merge_json(path: Path, results: dict) -> dict:
    """Write ``results`` into report.json over its existing top-level keys (others are kept) → the merged dict. An
    unreadable report.json is moved aside to report.json.bad with a warning."""
    merged: dict = {}
    if path.exists():
        try:
            merged = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(merged, dict):
                raise ValueError("not a JSON object")
        except ValueError as e:
            warnings.warn(f"{path}: unreadable ({e}); moved to {path.name}.bad", RuntimeWarning, stacklevel=3)
            os.replace(path, path.with_name(path.name + ".bad"))
            merged = {}
    merged.update(results)
    # numpy values and dataclasses as plain JSON first, then every NaN/±inf as null: strict parsers read the file.
    atomic_write_json(path, json.loads(json.dumps(merged, default=_json_default)))
    return json.loads(path.read_text(encoding="utf-8"))


def write_report(run_dir: str | Path, results: dict) -> dict:
    """Write the comparison report of the fusion run in ``run_dir`` against its CLM baseline:

    * ``run_dir/report.md``: headline (fused vs CLM per domain), all models × domains, training curves, teacher win
      rates, the alignment audit, settings and timings — each part only when its input is in ``results``;
    * ``run_dir/plots/{bpb,curves,win_rate}.png`` (plots of a part that is now missing are removed);
    * ``run_dir/report.json``: ``results`` merged over the existing report.json's keys, with ``"gap_closed":
      {domain: share or null}`` (:func:`gap_closed`; and ``"gap_closed_paper"`` for the paper recipe's row when
      ``bpb`` has one), as strict JSON (NaN and ±inf are written as null).

    results: {"bpb": {model: {domain: bpb}}, "curves": {run: metrics.jsonl path}, "audit": AuditReport JSON (or the
    AuditReport), "tasks": {model: {task: {metric: value}}}, "samples": {"prompts": [{"text", "domain"}],
    "outputs": {model: [text per prompt]}, "max_new_tokens"}, "settings": {name: value}, "timings": {stage:
    seconds}}; see the module docstring. Returns the merged report.json dict.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    plots = run_dir / "plots"
    results = dict(results)
    if hasattr(results.get("audit"), "to_json"):
        results["audit"] = results["audit"].to_json()
    bpb = {m: d for m, d in (results.get("bpb") or {}).items() if isinstance(d, dict)}
    if bpb:
        results["gap_closed"] = gap_closed(bpb)
        if "paper" in bpb:
            results["gap_closed_paper"] = gap_closed(bpb, "paper")
    settings = results.get("settings") or {}
    runs = _load_curves(results.get("curves") or {}, run_dir)

    written: list[str] = []
    md = [f"# Fusion report: {run_dir.name}", "", "## Headline", "", *_headline(bpb, settings)]
    md += _bpb_section(bpb, plots, written)
    md += _curves_section(runs, plots, written)
    md += _win_rate_section(runs, plots, written)
    md += _tasks_section(results.get("tasks") or {})
    md += _samples_section(results.get("samples") or {})
    md += _audit_section(results.get("audit") or {})
    md += _settings_section(settings)
    md += _timings_section(results.get("timings") or {})
    for name in PLOTS:
        if f"plots/{name}" not in written:
            (plots / name).unlink(missing_ok=True)
    atomic_write_text(run_dir / "report.md", "\n".join(md).rstrip() + "\n")
    return _merge_json(run_dir / "report.json", results)
