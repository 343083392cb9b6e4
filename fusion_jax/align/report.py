"""The alignment audit's command (``python -m fusion_jax.align audit``, :func:`run`) and its text report
(:func:`format_report`); the numbers come from :mod:`fusion_jax.align.audit`."""

from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from fusion_jax.align.audit import APPROX_NAME, CATEGORIES, AuditReport, PairReport, audit
from fusion_jax.config.schema import AuditConfig
from fusion_jax.files import atomic_write_text, json_dumps


def run(cfg: AuditConfig) -> AuditReport:
    """Audit every source → target pair of `cfg`, print the report and, with `cfg.json`, write its numbers."""
    cfg.validate()
    if cfg.json:
        _check_writable(Path(cfg.json))
    report = audit(cfg.sources, cfg.target, cfg.texts, modes=cfg.modes, top=cfg.top, max_tokens=cfg.max_tokens,
                   eos=cfg.eos, cache_dir=cfg.cache_dir)
    print(format_report(report))
    if cfg.json:
        path = Path(cfg.json)
        atomic_write_text(path, json_dumps(report.to_json(), indent=1, ensure_ascii=False) + "\n")
        print(f"\nwrote {path}")
    return report


def _check_writable(path: Path) -> None:
    """Fail before the audit, not after it, when `path` cannot be written (an OSError naming `path`)."""
    probe = path.with_name(f".{path.name}.probe{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe.touch()
    except OSError as e:
        raise type(e)(e.errno, f"cannot write --json: {e.strerror}", str(path)) from None
    probe.unlink()


# ---------------------------------------------------------------------------------------------------------------
# Printing


def _pct(x: float) -> str:
    return f"{100 * x:6.1f}%"


def _piece(p: str) -> str:
    """A raw vocabulary piece, quoted when it is empty or holds whitespace (GPT-NeoX's literal-space tokens)."""
    if p and p.isprintable() and not any(c.isspace() for c in p):
        return p
    return f"{p[0]!r}×{len(p)}" if len(p) >= 4 and len(set(p)) == 1 else repr(p)


def _width(s: str) -> int:
    """Terminal columns of s (East Asian wide and full-width characters take two)."""
    return sum(2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in s)


def _table(header: list[str], rows: list[list[str]], indent: str = "  ", left: tuple[int, ...] = (0,)) -> list[str]:
    """Columns in ``left`` left-aligned, the others right-aligned."""
    widths = [max(_width(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def fmt(r: list[str]) -> str:
        cells = [(c + " " * (w - _width(c))) if i in left else (" " * (w - _width(c)) + c)
                 for i, (c, w) in enumerate(zip(r, widths))]
        return (indent + "  ".join(cells)).rstrip()

    return [fmt(header), *map(fmt, rows)]


def format_pair(p: PairReport) -> list[str]:
    modes = list(p.modes)
    out = [f"== {p.source} → {p.target} ==", ""]
    eos = f"EOS appended: {p.eos[0]} / {p.eos[1]}" if p.eos else "no EOS appended"
    out.append(f"tokens: source {p.source_tokens:,}  target {p.target_tokens:,}  bytes {p.bytes:,}  "
               f"documents {p.documents:,}  ({eos}; {p.seconds:.1f}s)")
    out += ["", "target positions by group type (byte alignment):"]
    out += _table(["group", "tokens", "share"],
                  [[k, f"{p.group_counts[k]:,}", _pct(v)] for k, v in p.groups.items()])

    out += ["", f"target rows ({p.positions:,} positions with a next token):"]
    rows = [
        ["source row used", *(_pct(p.modes[m].matched / max(p.positions, 1)) for m in modes)],
        ["teacher row", *(_pct(p.modes[m].teacher / max(p.positions, 1)) for m in modes)],
        ["fallback (one-hot)", *(_pct(p.modes[m].fallback / max(p.positions, 1)) for m in modes)],
    ]
    out += _table(["", *modes], rows)

    out += ["", "oracle teacher top-1 mass:"]
    rows = [["exact", *(_pct(p.modes[m].mass["exact"]) for m in modes)]]
    for m in modes:
        name = APPROX_NAME[m]
        rows.append([name, *(_pct(p.modes[k].mass[name]) if k == m else "—" for k in modes)])
    rows.append(["dropped", *(_pct(p.modes[m].mass["dropped"]) for m in modes)])
    for part in ("unmapped", "fallback"):
        rows.append([f"  {part}", *(_pct(p.modes[m].counts[part] / max(p.positions, 1)) for m in modes)])
    rows.append(["agrees with next token", *(_pct(p.modes[m].agrees) for m in modes)])
    out += _table(["", *modes], rows)

    out += ["", "vocab maps (source ids):"]
    for v in p.vocab:
        em = f" · EM strings {v.string_matches:,}" if v.string_matches >= 0 else ""
        out.append(f"  {v.method:<7} V={v.vocab_size:,}: same bytes {v.same:,} · prefix {v.prefix:,} · other "
                   f"{v.other:,} · unmapped {v.unmapped:,}{em} · specials mapped {v.specials_mapped}/{v.specials}")

    if "default" in p.modes:
        worst = p.modes["default"].worst
        out += ["", "worst prefix mappings (default mode; next tokens at transfer positions that lose bytes or drop):"]
        rows = [[f"{w.source} → {w.target}", f"{w.count:,}", str(w.bytes_lost)] for w in worst]
        out += _table(["source → target", "count", "bytes lost"], rows) if rows else ["  (none)"]
    if "fusellm" in p.modes:
        worst = p.modes["fusellm"].worst
        out += ["", "worst MinED mappings (fusellm mode; next tokens mapped to different bytes):"]
        rows = [[f"{w.source} → {w.target}", f"{w.count:,}", f"{_piece(w.source_piece)} → {_piece(w.target_piece)}"]
                for w in worst]
        out += _table(["source → target", "count", "pieces"], rows, left=(0, 2)) if rows else ["  (none)"]

    out += ["", "coverage by the target's next token (share with a teacher row / share where the oracle agrees):"]
    header = ["category", "count"] + [f"{m} {c}" for m in modes for c in ("row", "agrees")]
    rows = []
    for c in CATEGORIES:
        cov = [p.modes[m].coverage[c] for m in modes]
        shares = (f for v in cov for f in (_pct(v.teacher), _pct(v.agrees)))
        rows.append([c.replace("_", "-"), f"{cov[0].count:,}", *shares])
    out += _table(header, rows)
    return out


def format_report(r: AuditReport) -> str:
    out = [
        "fusion_jax alignment audit",
        f"NOTE: {r.oracle}.",
        f"target {r.target}; text: {len(r.texts)} file(s), {r.bytes:,} bytes, {r.documents:,} documents "
        f"(whole lines, ≤ {r.max_tokens:,} target tokens each)",
    ]
    for p in r.pairs:
        out += ["", *format_pair(p)]
    return "\n".join(out)
