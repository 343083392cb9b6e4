"""The fusion-vs-CLM report (`fusion_jax.experiments.report`): files written, headline numbers, tables, robustness to NaN and
missing parts, report.json merging, and read_metrics on resumed and crashed runs.

`python tests/test_report.py DIR` renders the realistic synthetic case into DIR to look at the plots."""

from __future__ import annotations

import json
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tiny_tokenizers, also when run as a script

from fusion_jax.experiments.report import PLOTS, gap_closed, margin, read_metrics, write_report  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TEACHERS = ("llama_2_7b", "mpt_7b", "openllama_7b")
DOMAINS = ("code", "math", "prose")
TEXT = (
    "the quick brown fox jumps over the lazy dog\n"
    "numbers 0123456789 and 42, 2024 and tabs\tand newlines\n\n"
    "café naïve résumé — déjà vu\n"
    "fusion of large language models by knowledge distillation\n"
) * 4


# ------------------------------------------------------------------------------------------------ synthetic inputs


def _train_line(step: int, run: str, rng: np.random.Generator, steps: int) -> dict:
    """A train record like fusion_jax.pipeline.run writes: losses falling with noise, the fusion run a bit lower."""
    t = step / steps
    clm = 2.6 - 0.7 * t ** 0.5 - (0.06 * t if run == "fused" else 0.0) + rng.normal(0, 0.04)
    rec = {"step": step, "kind": "train", "clm": clm, "lm_weight": 0.9 if run == "fused" else 1.0,
           "learning_rate": 1e-5 * min(1.0, step / 100), "grad_norm": 0.8 + rng.normal(0, 0.1),
           "tokens_per_s": 51000 + rng.normal(0, 800), "mfu": float("nan")}
    if run == "fused":
        fusion = 2.1 - 0.5 * t ** 0.5 + rng.normal(0, 0.05)
        shares = np.array([0.45 - 0.1 * t, 0.25 + 0.05 * t, 0.30 + 0.05 * t]) + rng.normal(0, 0.02, 3)
        shares = np.clip(shares, 0.01, None) / np.clip(shares, 0.01, None).sum()
        rec.update(fusion=fusion, loss=0.9 * clm + 0.1 * fusion, win_rate=dict(zip(TEACHERS, shares.tolist())))
    else:
        rec.update(loss=clm)
    return rec


def _eval_line(step: int, run: str, steps: int) -> dict:
    t = step / steps
    gain = 0.03 * t if run == "fused" else 0.0
    domains = {"code": 0.92 - 0.12 * t - gain, "math": 1.05 - 0.10 * t - 1.5 * gain, "prose": 1.10 - 0.08 * t - gain}
    rec = {"step": step, "kind": "eval", "bits_per_byte": float(np.mean(list(domains.values()))), "domains": domains,
           "clm": 2.3 - 0.6 * t - gain}
    if run == "fused":
        rec.update(fusion=1.9 - 0.4 * t,
                   win_rate={"llama_2_7b": 0.40 - 0.05 * t, "mpt_7b": 0.27, "openllama_7b": 0.33 + 0.05 * t})
    return rec


def write_metrics(path: Path, run: str, steps: int = 2000, log_every: int = 10, eval_every: int = 500,
                  seed: int = 0) -> Path:
    """A metrics.jsonl of a run that crashed mid-write after step steps/2, was resumed from a checkpoint 9 logged
    steps earlier (those steps logged twice, the second time with ``resumed: True``; the first resumed record glued
    onto the cut line, as an append after a crash mid-write does) and crashed again mid-line after the last step."""
    rng = np.random.default_rng(seed)
    crash = steps // 2
    resume = crash - 9 * log_every

    def records(first: int, last: int, resumed: bool) -> list[str]:
        out = []
        for step in range(first, last + 1, log_every):
            out.append(json.dumps({**_train_line(step, run, rng, steps), **({"resumed": True} if resumed else {})}))
            if step % eval_every == 0:
                out.append(json.dumps(_eval_line(step, run, steps)))
        return out

    before = [json.dumps(_eval_line(0, run, steps)), *records(log_every, crash, False)]
    after = records(resume + log_every, steps, True)
    cut = json.dumps(_train_line(crash + log_every, run, rng, steps))[:25]
    text = "\n".join([*before, cut + after[0], *after[1:]]) + "\n" + after[-1][:30]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def tiny_audit(tmp: Path, n_sources: int = 1) -> dict:
    """A real AuditReport JSON: SentencePiece source(s) → byte-level BPE target over a short text."""
    from fusion_jax.align.audit import audit
    from tiny_tokenizers import train_byte_level, train_sentencepiece

    tmp.mkdir(parents=True, exist_ok=True)
    target = train_byte_level(tmp / "bl.json")
    sources = []
    for i in range(n_sources):  # renamed: the tokenizer's name is its file's stem, "tok" for every one trained
        model = train_sentencepiece(tmp / f"sp{i}", vocab_size=320 + 60 * i)
        sources.append(model.rename(model.with_name(f"sp_{320 + 60 * i}.model")))
    text = tmp / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return audit(sources, target, [text], max_tokens=256, cache_dir=tmp / "cache").to_json()


def realistic_results(tmp: Path, audit_json: dict | None = None) -> dict:
    """Results as the pipeline passes them: five models, three domains and "all", both runs' curves, an audit."""
    bpb = {
        "fused": {"all": 0.9050, "code": 0.7650, "math": 0.9100, "prose": 1.0400},
        "clm": {"all": 0.9230, "code": 0.7800, "math": 0.9400, "prose": 1.0490},
        "target_init": {"all": 1.0233, "code": 0.9200, "math": 1.0500, "prose": 1.1000},
        "source:openllama_7b": {"all": 0.8890, "code": 0.8100, "math": 0.8700, "prose": 0.9870},
        "source:mpt_7b": {"all": 0.9010, "code": 0.7400, "math": 0.9500, "prose": 1.0130},
        "source:llama_2_7b": {"all": 0.8720, "code": 0.7900, "math": 0.8300, "prose": 0.9960},
    }
    return {
        "bpb": bpb,
        "curves": {"fused": str(write_metrics(tmp / "fused" / "metrics.jsonl", "fused")),
                   "clm": str(write_metrics(tmp / "clm" / "metrics.jsonl", "clm", seed=1))},
        **({"audit": audit_json} if audit_json else {}),
        "settings": {"seed": 42, "steps": 2000, "lm_weight": 0.9, "fusion": "min_ce", "target": "llama-2-7b",
                     "teachers": list(TEACHERS), "learning_rate": 1e-5},
        "timings": {"capture": 5400.5, "train_fused": 7301.2, "train_clm": 6950.0, "evaluate": 412.3},
    }


# ------------------------------------------------------------------------------------------------ helpers


def _check_png(path: Path, min_px: int = 300) -> None:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] >= min_px and img.shape[1] >= min_px, (path, img.shape)
    assert float(np.asarray(img[..., :3]).std()) > 0.01, f"{path} is blank"


def _write_quiet(run_dir: Path, results: dict) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the synthetic metrics have cut lines on purpose
        return write_report(run_dir, results)


@pytest.fixture(scope="module")
def audit_json(tmp_path_factory) -> dict:
    return tiny_audit(tmp_path_factory.mktemp("audit"))


@pytest.fixture(scope="module")
def full(tmp_path_factory, audit_json):
    """The realistic case rendered once: (run_dir, results, returned dict, report.md text)."""
    run = tmp_path_factory.mktemp("run")
    (run / "report.json").write_text(json.dumps({"run_dir": str(run), "train": {"loss": 1.5, "mfu": float("nan")},
                                                 "settings": {"old": True}}))
    results = realistic_results(run / "inputs", audit_json)
    out = _write_quiet(run, results)
    return run, results, out, (run / "report.md").read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------------------ read_metrics


def test_read_metrics_later_line_wins_and_cut_last_line(tmp_path):
    p = tmp_path / "metrics.jsonl"
    lines = [{"step": 10, "kind": "train", "loss": 3.0}, {"step": 20, "kind": "train", "loss": 2.5},
             {"step": 20, "kind": "eval", "bits_per_byte": 1.2},
             {"step": 20, "kind": "train", "loss": 2.4},  # resumed from step 10: step 20 again
             {"step": 30, "kind": "train", "loss": 2.2}]
    p.write_text("\n".join(map(json.dumps, lines)) + '\n{"step": 40, "kind": "tra')
    with pytest.warns(RuntimeWarning, match="last line"):
        m = read_metrics(p)
    assert set(m) == {"train", "eval"}
    assert list(m["train"]) == [10, 20, 30]
    assert m["train"][20]["loss"] == 2.4
    assert m["eval"][20]["bits_per_byte"] == 1.2


def test_read_metrics_resumed_line_glued_on_a_cut_one(tmp_path):
    """A crash mid-write leaves no newline; the resumed run's first record follows on the same line and is kept
    (the cut one is dropped, with a warning)."""
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "kind": "train", "loss": 3.0}\n{"step": 2, "kind": "tr'
                 '{"step": 2, "kind": "train", "loss": 2.9}\n{"step": 3, "kind": "train", "loss": NaN}\n')
    with pytest.warns(RuntimeWarning, match="line 2: dropped a cut-short record") as record:
        m = read_metrics(p)
    assert len(record) == 1
    assert m["train"][2]["loss"] == 2.9 and math.isnan(m["train"][3]["loss"])


def test_synthetic_metrics_file(tmp_path):
    p = write_metrics(tmp_path / "m.jsonl", "fused", steps=200, log_every=10, eval_every=50)
    with pytest.warns(RuntimeWarning):
        m = read_metrics(p)
    assert m["train"][20].get("resumed") and m["train"][100].get("resumed")   # logged twice, the resumed line won
    assert not m["train"][10].get("resumed")
    assert list(m["train"]) == list(range(10, 201, 10))
    assert list(m["eval"]) == [0, 50, 100, 150, 200]


# ------------------------------------------------------------------------------------------------ the full report


def test_files_exist_and_pngs_are_valid(full):
    run, _, _, md = full
    for name in PLOTS:
        _check_png(run / "plots" / name)
        assert f"](plots/{name})" in md
    assert (run / "report.json").is_file()


def test_report_json_merges_and_keeps_keys(full):
    run, results, out, _ = full
    on_disk = json.loads((run / "report.json").read_text())
    assert json.dumps(on_disk, sort_keys=True) == json.dumps(out, sort_keys=True)  # (NaN ≠ NaN for ==)
    assert out["run_dir"] == str(run) and out["train"]["loss"] == 1.5      # kept
    assert out["train"]["mfu"] is None                                    # NaN written as null: strict JSON
    assert out["settings"] == results["settings"]                          # replaced by the new one
    assert out["bpb"] == results["bpb"] and out["curves"] == results["curves"]
    assert out["audit"]["pairs"][0]["modes"]["default"]["positions"] > 0
    assert out["timings"] == results["timings"]


def test_headline_numbers(full):
    _, results, _, md = full
    bpb = results["bpb"]
    headline = md.split("## Bits per byte")[0]
    # all: 0.9050 vs 0.9230 → −0.0180 bpb, −1.95 %
    assert margin(0.905, 0.923) == "-0.0180 bpb (-1.95 %)"
    assert "on all documents: 0.9050 vs 0.9230, -0.0180 bpb (-1.95 %)" in headline
    assert "on 4 of 4 domains" in headline
    for d in ("all", *DOMAINS):
        f, c = bpb["fused"][d], bpb["clm"][d]
        row = next(line for line in headline.splitlines() if line.startswith(f"| {d} |"))
        assert f"{f:.4f}" in row and f"{c:.4f}" in row and f"{f - c:+.4f}" in row
        assert f"{100 * (f - c) / c:+.2f} %" in row and "won" in row
    assert "λ = 0.9" in headline


def test_gap_closed_in_headline_and_json(full):
    _, results, out, md = full
    bpb = results["bpb"]
    headline = md.split("## Bits per byte")[0]
    sources = [m for m in bpb if m.startswith("source:")]
    for d in ("all", *DOMAINS):
        best = min(bpb[m][d] for m in sources)
        clm, fused = bpb["clm"][d], bpb["fused"][d]
        want = (clm - fused) / (clm - best) if clm > best else None
        assert out["gap_closed"][d] == pytest.approx(want) if want is not None else out["gap_closed"][d] is None
        row = next(line for line in headline.splitlines() if line.startswith(f"| {d} |"))
        assert (f"{100 * want:+.1f} %" if want is not None else "n/a") in row
    # code: the best source is mpt_7b (0.7400), CLM 0.7800, fused 0.7650 → 37.5 % of the gap
    assert out["gap_closed"]["code"] == pytest.approx(0.375)
    assert "0.7400 (`mpt_7b`)" in headline and "code +37.5 %" in headline


def test_gap_closed_edge_cases():
    # no source beats CLM in prose; a NaN fused; a source without the domain; fused worse than CLM (< 0)
    bpb = {"fused": {"code": 1.1, "prose": 1.0, "math": math.nan}, "clm": {"code": 1.0, "prose": 1.0, "math": 2.0},
           "target_init": {"code": 0.1}, "source:a": {"code": 0.8, "prose": 1.2, "math": 1.0}, "source:b": {"code": 0.9}}
    assert gap_closed(bpb) == {"code": pytest.approx(-0.5), "math": None, "prose": None}
    assert gap_closed({"fused": {"all": 1.0}, "clm": {"all": 1.2}}) == {"all": None}  # no sources


def test_table_lists_every_model_with_best_in_bold(full):
    _, results, _, md = full
    table = md.split("## Bits per byte")[1].split("##")[0]
    for m in results["bpb"]:
        assert f"| `{m}` |" in table
    order = [line.split("`")[1] for line in table.splitlines() if line.startswith("| `")]
    assert order == ["fused", "clm", "target_init", "source:llama_2_7b", "source:mpt_7b", "source:openllama_7b"]
    assert "**0.8720**" in table and "**0.7400**" in table     # best on all (llama), on code (mpt)
    assert "**0.9050**" not in table


def test_other_sections(full):
    _, results, _, md = full
    for head in ("## Training curves", "## Teacher win rates", "## Alignment audit", "## Settings", "## Timings"):
        assert head in md
    wr = md.split("## Teacher win rates")[1].split("##")[0]
    for t in TEACHERS:
        assert f"`{t}`" in wr
    assert "final eval (step 2000)" in wr
    audit = md.split("## Alignment audit")[1].split("## Settings")[0]
    assert "oracle teacher" in audit and "1:1 groups" in audit and "mass exact" in audit
    assert "`default`" in audit and "`fusellm`" in audit and "mass mined" in audit
    assert "| `fusion` | min_ce |" in md and '["llama_2_7b", "mpt_7b", "openllama_7b"]' in md
    assert "| **total** | **20064.0** | **5 h 34 min** |" in md


def test_training_curve_plots_use_the_winning_lines(full):
    """The curves come from read_metrics: the resumed duplicate steps appear once."""
    _, results, _, md = full
    assert "`fused`: 200 logged train steps (steps 10–2000), 5 eval steps" in md


# ------------------------------------------------------------------------------------------------ robustness


def test_nan_missing_domains_and_only_all(tmp_path):
    bpb = {"fused": {"all": 1.0, "code": float("nan"), "prose": 0.9},
           "clm": {"all": 1.25, "code": 0.8},                  # no prose
           "source:a": {"all": float("inf")},                  # only "all", and not finite
           "target_init": {"all": 1.4}}
    out = write_report(tmp_path, {"bpb": bpb})
    md = (tmp_path / "report.md").read_text()
    assert "-0.2500 bpb (-20.00 %)" in md
    code_row = next(line for line in md.splitlines() if line.startswith("| code |"))
    assert code_row.count("n/a") == 6                  # fused value, Δ, Δ %, verdict, best source, gap closed
    assert out["gap_closed"] == {"all": None, "code": None, "prose": None}  # inf is no number: no source
    prose_row = next(line for line in md.splitlines() if line.startswith("| prose |"))
    assert "0.9000" in prose_row and "n/a" in prose_row
    assert "on 1 of 1 domain**" in md and "(2 more without a number for both.)" in md
    src_row = next(line for line in md.splitlines() if line.startswith("| `source:a` |"))
    assert src_row.count("n/a") == 3                            # all (inf), code, prose
    _check_png(tmp_path / "plots" / "bpb.png", min_px=200)
    for name in ("curves.png", "win_rate.png"):
        assert not (tmp_path / "plots" / name).exists()
    for head in ("## Training curves", "## Teacher win rates", "## Alignment audit", "## Settings", "## Timings"):
        assert head not in md
    assert out["bpb"]["source:a"]["all"] is None  # inf written as null: strict JSON


def test_headline_omitted_without_clm(tmp_path):
    write_report(tmp_path, {"bpb": {"fused": {"all": 1.0}, "target_init": {"all": 1.2}}})
    md = (tmp_path / "report.md").read_text()
    assert "_No headline: the results have no bits per byte for clm._" in md
    assert "| `fused` | **1.0000** |" in md


def test_all_nan_and_empty_bpb(tmp_path):
    write_report(tmp_path / "a", {"bpb": {"fused": {"all": float("nan")}, "clm": {"all": float("nan")}}})
    md = (tmp_path / "a" / "report.md").read_text()
    assert "| all | n/a | n/a | n/a | n/a | n/a |" in md
    assert not (tmp_path / "a" / "plots" / "bpb.png").exists()
    write_report(tmp_path / "b", {"bpb": {}})
    assert "No headline" in (tmp_path / "b" / "report.md").read_text()


def test_curves_without_eval_steps_and_missing_file(tmp_path):
    """Train lines only (no eval after step 0): two panels; a missing curves file is warned about and left out."""
    p = tmp_path / "fused.jsonl"
    p.write_text("\n".join(json.dumps({"step": s, "kind": "train", "clm": 3 - s / 10, "fusion": 2 - s / 20,
                                       "win_rate": {"a": 0.5, "b": 0.5}}) for s in range(1, 6)) + "\n"
                 + json.dumps({"step": 0, "kind": "eval", "bits_per_byte": 1.0}) + "\n")
    with pytest.warns(RuntimeWarning, match="not found"):
        write_report(tmp_path / "run", {"bpb": {"fused": {"all": 1.0}, "clm": {"all": 1.1}},
                                        "curves": {"fused": str(p), "clm": str(tmp_path / "nope.jsonl")}})
    md = (tmp_path / "run" / "report.md").read_text()
    assert "`fused`: 5 logged train steps" in md and "`clm`" not in md.split("## Training curves")[1]
    _check_png(tmp_path / "run" / "plots" / "curves.png", min_px=200)
    _check_png(tmp_path / "run" / "plots" / "win_rate.png", min_px=200)
    assert "| `a` | 50.0 % | n/a |" in md


def test_rewrite_removes_stale_plots_and_bad_json(tmp_path, audit_json):
    (tmp_path / "report.json").write_text("{not json")
    results = realistic_results(tmp_path / "inputs", audit_json)
    out = _write_quiet(tmp_path, results)
    assert (tmp_path / "report.json.bad").read_text() == "{not json"
    assert (tmp_path / "plots" / "win_rate.png").exists()
    out = write_report(tmp_path, {"bpb": results["bpb"], "note": "second pass"})
    assert not (tmp_path / "plots" / "win_rate.png").exists() and not (tmp_path / "plots" / "curves.png").exists()
    assert out["note"] == "second pass" and out["timings"] == results["timings"]  # the first pass's keys stay


def test_audit_report_object_is_accepted(tmp_path, audit_json):
    """The dataclass itself works as well as its JSON."""
    from fusion_jax.align.audit import AuditReport

    report = AuditReport(**audit_json)  # (its pairs stay dicts here; to_json copies them)
    out = write_report(tmp_path, {"bpb": {"fused": {"all": 1.0}, "clm": {"all": 1.0}}, "audit": report})
    assert out["audit"]["target"] == audit_json["target"]
    md = (tmp_path / "report.md").read_text()
    assert "| all | 1.0000 | 1.0000 | +0.0000 | +0.00 % | tie |" in md and "## Alignment audit" in md


if __name__ == "__main__":
    out_dir = Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/report_example")
    _write_quiet(out_dir, realistic_results(out_dir / "inputs", tiny_audit(out_dir / "inputs" / "audit", 2)))
    print(out_dir / "report.md")


def test_report_json_is_strict_json(tmp_path):
    """NaN and ±inf (MFU on CPU, a diverged model's bits per byte), numpy ones included, are written as null:
    strict JSON parsers reject NaN."""
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    write_report(tmp_path, {"bpb": {"fused": {"all": float("nan")}, "clm": {"all": 1.0}},
                            "settings": {"peak": float("inf"), "per_step": np.array([1.0, np.nan])}})
    saved = json.loads((tmp_path / "report.json").read_text(), parse_constant=reject)
    assert saved["bpb"]["fused"]["all"] is None and saved["settings"] == {"peak": None, "per_step": [1.0, None]}


def test_paper_recipe_row(tmp_path):
    """A run whose recipe is not the paper's shows the paper's row: its bpb, the difference and both gaps closed."""
    bpb = {"fused": {"all": 1.00, "code": 0.70}, "paper": {"all": 1.10, "code": 0.76}, "clm": {"all": 1.20, "code": 0.80},
           "source:a": {"all": 0.90, "code": 0.60}}
    out = _write_quiet(tmp_path, {"bpb": bpb})
    assert out["gap_closed"]["code"] == pytest.approx(0.5) and out["gap_closed_paper"]["code"] == pytest.approx(0.2)
    md = (tmp_path / "report.md").read_text(encoding="utf-8")
    headline = md.split("## Bits per byte")[0]
    assert "The paper's recipe" in headline
    row = next(line for line in headline.splitlines() if line.startswith("| code |") and "0.7600" in line)
    assert "-0.0600" in row and "+20.0 %" in row and "+50.0 %" in row
    assert "`paper`" in md.split("## Bits per byte")[1]  # a row of the full table too
    without = _write_quiet(tmp_path / "plain", {"bpb": {k: v for k, v in bpb.items() if k != "paper"}})
    assert "gap_closed_paper" not in without
    assert "The paper's recipe" not in (tmp_path / "plain" / "report.md").read_text(encoding="utf-8")


def test_headline_names_a_rising_lambda(tmp_path):
    bpb = {"fused": {"all": 1.0}, "clm": {"all": 1.1}}
    _write_quiet(tmp_path, {"bpb": bpb, "settings": {"lm_weight": 0.5, "lm_weight_schedule": "hard_and_decay"}})
    assert "the fused run used λ rising linearly from 0.5 to 1." in (tmp_path / "report.md").read_text()
