"""The main job (configs/demo.yaml), scaled down: every stage produces its output, the report exists and its numbers
are finite, a second invocation reuses everything, changed settings are refused. The quality margin is
bench/fusion_quality.py's job, not this test's."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from fusion_jax.config import loader as config_loader
from fusion_jax.experiments import run as experiment
from fusion_jax.config import schema
from fusion_jax import pipeline

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "demo.code_bytes=120000", "demo.prose_bytes=120000", "demo.mix_bytes=40000", "demo.max_document_bytes=4000",
    "data.max_tokens=200", "data.validation_fraction=0.25", "capture.seq_len=256", "capture.batch_size=8",
    "demo.pretrain_batch_size=8", "demo.pretrain_seq_len=64", "loader.seq_len=64", "loader.global_batch_size=8",
    "train.steps=4", "train.checkpoint_every=2", "train.eval_every=2", "train.eval_batches=1", "train.log_every=1",
    "train.progress=false",
    *[f"demo.{m}.{k}={v}" for m in ("target", "code", "prose")
      for k, v in (("hidden_size", 32), ("num_layers", 1), ("num_heads", 2), ("steps", 3))],
    "demo.target.vocab_size=400", "demo.code.vocab_size=400", "demo.prose.vocab_size=500",
]


def demo_config(run_dir: Path, *extra: str) -> schema.TrainConfig:
    return config_loader.load(schema.TrainConfig, str(ROOT / "configs" / "demo.yaml"),
                              [f"run_dir={run_dir}", *SMALL, *extra])


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("demo") / "run"
    return run, experiment.main(demo_config(run))


def test_every_stage_produces_its_output(demo_run):
    run, report = demo_run
    assets = run / "assets"
    for p in ("corpus/code.jsonl", "corpus/prose.jsonl", "corpus/mix.jsonl", "corpus/stage.json",
              "documents/documents.json", "cache/target/train/manifest.json", "cache/mpt_code/validation/manifest.json",
              "cache/neox_prose/train/manifest.json", "checkpoints/4", "metrics.jsonl", "export/config.json",
              "clm/metrics.jsonl", "clm/checkpoints/4", "paper/metrics.jsonl", "paper/checkpoints/4",
              "evaluations.json", "audit.json", "report.md",
              "plots/bpb.png", "plots/curves.png", "plots/win_rate.png"):
        assert (assets.parent / p).exists() or (assets / p).exists(), p
    for other in ("clm", "paper"):  # the comparison runs read the main run's documents and caches
        assert not (run / other / "cache").exists()
    assert not (run / "paper" / "export").exists()
    # the CLM baseline is exported next to the fused target, as a Hugging Face checkpoint of the same family
    import transformers

    assert transformers.AutoConfig.from_pretrained(run / "clm" / "export").model_type == "llama"
    assert (run / "clm" / "export" / "tokenizer.json").exists()
    for p in run.glob("plots/*.png"):
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_has_benchmark_tasks_and_samples(demo_run):
    """demo.tasks: the demo's lm-eval tasks ran on each run at its end (lm_eval.json beside its report), side by side
    in report.md; samples of every model on held-out prompts."""
    run, _ = demo_run
    report = json.loads((run / "report.json").read_text())
    assert set(report["tasks"]) == {"fused", "clm", "paper"}
    for model, tasks in report["tasks"].items():
        assert {"demo_rolling_code", "demo_rolling_prose"} <= set(tasks), model
        assert all(0 < v["bits_per_byte"] < 20 for k, v in tasks.items() if k.startswith("demo_rolling")), tasks
        assert all(0 <= v["acc"] <= 1 for k, v in tasks.items() if k.startswith("demo_next_line")), tasks
    for sub in ("", "clm", "paper"):
        results = json.loads((run / sub / "lm_eval.json").read_text())
        assert "demo_rolling_code" in results["results"]
    samples = report["samples"]
    assert set(samples["outputs"]) == {"fused", "clm", "target_init", "source:mpt_code", "source:neox_prose"}
    assert len(samples["prompts"]) == 4 and all(len(v) == 4 for v in samples["outputs"].values())
    md = (run / "report.md").read_text()
    assert "## Benchmark tasks" in md and "## Samples" in md and "demo_rolling_prose" in md


def test_sources_are_hugging_face_checkpoints_of_three_families(demo_run):
    import transformers

    run, _ = demo_run
    kinds = {}
    for name in ("llama_mix", "mpt_code", "neox_prose"):
        hf = run / "assets" / "hf" / name
        assert list(hf.glob("*.safetensors")) and (hf / "tokenizer.json").exists()
        kinds[name] = transformers.AutoConfig.from_pretrained(hf).model_type
    assert kinds == {"llama_mix": "llama", "mpt_code": "mpt", "neox_prose": "gpt_neox"}
    from fusion_jax.tokenizers import load_tokenizer

    toks = {n: load_tokenizer(run / "assets" / "hf" / n) for n in kinds}
    assert toks["llama_mix"].dummy_prefix and not toks["mpt_code"].dummy_prefix
    assert len({t.vocab_size for t in toks.values()}) == 2 and len({t.fingerprint for t in toks.values()}) == 3


def test_report_holds_every_model_and_finite_numbers(demo_run):
    run, report = demo_run
    saved = json.loads((run / "report.json").read_text())
    bpb = saved["bpb"]
    assert set(bpb) == {"fused", "paper", "clm", "target_init", "source:mpt_code", "source:neox_prose"}
    assert set(saved["gap_closed"]) == set(saved["gap_closed_paper"]) == {"code", "prose", "all"}
    # the demo runs the transfer recipe; the paper's is the report's "paper" row
    sources = saved["config"]["sources"]
    assert [(x["continuation"], x["in_context"], x["tail"]) for x in sources] == [(True, True, "next_token")] * 2
    assert saved["config"]["loss"]["lm_weight_schedule"] == "hard_and_decay"
    assert "The paper's recipe" in (run / "report.md").read_text()
    for model, domains in bpb.items():
        assert {"code", "prose", "all"} <= set(domains), model
        assert all(math.isfinite(v) and 0 < v < 20 for v in domains.values()), (model, domains)
    assert report["bpb"] == bpb
    md = (run / "report.md").read_text()
    assert "CLM baseline" in md and "source:mpt_code" in md and "plots/bpb.png" in md
    for name in ("fused", "clm", "paper"):
        lines = [json.loads(x) for x in (run / ("" if name == "fused" else name) / "metrics.jsonl").read_text()
                 .splitlines()]
        train_lines = [x for x in lines if x["kind"] == "train"]
        assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
        assert np.isfinite([x["loss"] for x in train_lines]).all()
    assert {p["source"] for p in saved["audit"]["pairs"]} == {"mpt_code", "neox_prose"}


def test_second_invocation_reuses_every_stage(demo_run, caplog):
    run, first = demo_run
    stamps = {p: p.stat().st_mtime_ns for p in (run / "assets").rglob("stage.json")}
    caplog.set_level("INFO")
    again = experiment.main(demo_config(run))
    assert {p: p.stat().st_mtime_ns for p in (run / "assets").rglob("stage.json")} == stamps
    assert "pretraining" not in caplog.text and again["bpb"] == first["bpb"]


def test_changed_settings_are_refused_not_mixed(demo_run):
    run, _ = demo_run
    with pytest.raises(ValueError, match=r"code_bytes differ.*another run_dir"):
        experiment.main(demo_config(run, "demo.code_bytes=130000"))


def test_demo_refuses_a_user_target():
    with pytest.raises(config_loader.ConfigError, match="demo.enabled builds the target"):
        config_loader.load(schema.TrainConfig, str(ROOT / "configs" / "demo.yaml"), ["target=/some/model"])


def test_relative_run_dir_and_another_mesh_are_the_same_run(demo_run, monkeypatch, caplog):
    """The run_dir given relative instead of absolute, on another mesh: every stage (the demo's pretraining runs,
    the documents, the fusion run and its baseline) is recognised as done, nothing is refused or redone."""
    run, first = demo_run
    monkeypatch.chdir(run.parent)
    caplog.set_level("INFO")
    again = experiment.main(demo_config(Path(run.name), "mesh.data=2", "mesh.fsdp=4"))
    assert "pretraining" not in caplog.text and again["bpb"]["fused"] == pytest.approx(first["bpb"]["fused"], rel=1e-5)
    assert json.loads((run / pipeline.RUN_CONFIG).read_text())["steps"] == [4]


def test_demo_takes_extra_sources_after_its_own(monkeypatch, tmp_path):
    """configs/real_teacher.yaml's shape: the demo plus a source of the user's, fused after the demo's two; its
    sources are part of the run's identity (an empty list is left out, as before users could add one)."""
    from fusion_jax.experiments.demo import build

    gguf = tmp_path / "teacher.gguf"
    cfg = demo_config(tmp_path / "run", f"sources=[{{name: smol, checkpoint: {gguf}}}]")
    assets = build.Assets(code="c.jsonl", prose="p.jsonl", mix="m.jsonl", target="hf/target",
                          sources={"mpt_code": "hf/mpt_code", "neox_prose": "hf/neox_prose"})
    monkeypatch.setattr(build, "build", lambda _: assets)
    applied = build.apply(cfg)
    assert [(s.name, s.checkpoint) for s in applied.sources] == [
        ("mpt_code", "hf/mpt_code"), ("neox_prose", "hf/neox_prose"), ("smol", str(gguf))]
    assert applied.target == "hf/target" and applied.data.corpus.paths == ("m.jsonl",)
    identity = pipeline.run_identity(config_loader.to_dict(cfg))
    assert [s["checkpoint"] for s in identity["sources"]] == [str(gguf)]
    assert "sources" not in pipeline.run_identity(config_loader.to_dict(demo_config(tmp_path / "run")))
    with pytest.raises(schema.ConfigError, match=r"\['mpt_code'\] have the names of the demo's own sources"):
        demo_config(tmp_path / "run", f"sources=[{{name: mpt_code, checkpoint: {gguf}}}]")
    with pytest.raises(schema.ConfigError, match=r"sources\[0\].*smol.*checkpoint"):
        demo_config(tmp_path / "run", "sources=[{name: smol}]")


def test_a_missing_source_is_named_before_the_demo_builds_anything(tmp_path):
    from fusion_jax.errors import InputError

    cfg = demo_config(tmp_path / "run", f"sources=[{{name: smol, checkpoint: {tmp_path / 'none.gguf'}}}]")
    with pytest.raises(InputError, match=r"not found: sources\[0\]\.checkpoint = .*none\.gguf: fix the path .*make "
                                         r"real-model"):
        experiment.main(cfg)
    assert not (tmp_path / "run" / "assets").exists()


def test_real_teacher_config_is_the_demo_plus_smollm2():
    cfg = config_loader.load(schema.TrainConfig, str(ROOT / "configs" / "real_teacher.yaml"))
    assert cfg.demo.enabled and cfg.baseline and [s.name for s in cfg.sources] == ["smollm2"]
    assert cfg.sources[0].checkpoint == str(Path.home() / ".cache/fusion_jax/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    # the demo's recipe, SmolLM2's rows included
    demo = config_loader.load(schema.TrainConfig, str(ROOT / "configs" / "demo.yaml"))
    assert cfg.loss == demo.loss and cfg.fusion == demo.fusion and cfg.demo.in_context == demo.demo.in_context
    s = cfg.sources[0]
    assert (s.continuation, s.in_context, s.tail) == (True, True, "next_token")


def test_next_line_items_hold_the_true_next_line():
    from fusion_jax.experiments.demo.tasks import CHOICES, MIN_CONTEXT_CHARS, next_line_items

    texts = [f"# file {i}\n" + "".join(f"line {i}.{j} of some length here\n" for j in range(8)) for i in range(6)]
    items = next_line_items(texts, seed=0)
    assert len(items) == 6 and items == next_line_items(texts, seed=0)
    for i, item in enumerate(items):
        text = texts[i]
        assert text.startswith(item["context"]) and len(item["context"]) >= MIN_CONTEXT_CHARS
        assert item["context"].endswith("\n")
        assert text[len(item["context"]):].split("\n")[0] == item["choices"][item["answer"]]
        assert len(set(item["choices"])) == CHOICES
        assert all(f"line {i}." not in c for k, c in enumerate(item["choices"]) if k != item["answer"])
    assert len({x["answer"] for x in items}) > 1  # the true line is not always in one place
