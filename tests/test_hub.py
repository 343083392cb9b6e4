"""Hub ids where a model directory is expected: resolved from the hub cache offline, a clear error in well under 5 s
when the model is not there (offline) or the hub cannot be reached; local paths pass through untouched."""

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fusion_jax import hub
from fusion_jax.config.schema import TeacherConfig, TrainConfig
from fusion_jax.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _fake_cache(root: Path, repo: str, files: dict[str, bytes]) -> Path:
    """A hub cache holding one snapshot of `repo` (the layout huggingface_hub reads offline)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    base = root / f"models--{repo.replace('/', '--')}"
    snapshot = base / "snapshots" / sha
    snapshot.mkdir(parents=True)
    for name, data in files.items():
        (snapshot / name).write_bytes(data)
    (base / "refs").mkdir()
    (base / "refs" / "main").write_text(sha)
    return snapshot


def test_what_is_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "local").mkdir()
    assert hub.is_hub_id("meta-llama/Llama-2-7b-hf") and hub.is_hub_id("org/name@v1.0")
    assert not hub.is_hub_id("org/local")  # exists here: a local path
    for local in ("/abs/path", "./org/x", "~/models/x", "a/b/c", "model.gguf", "../x/y", ""):
        assert not hub.is_hub_id(local), local
    assert hub.resolve("./not/here", "target") == "./not/here"  # not an id: later checks name the missing path


def _hub_settings(monkeypatch, cache: Path, offline: bool, endpoint: str | None = None) -> None:
    """huggingface_hub reads its environment once, at import: set its constants as that environment would."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    if endpoint is not None:
        monkeypatch.setattr(constants, "ENDPOINT", endpoint)


def test_offline_resolves_a_cached_snapshot(tmp_path, monkeypatch):
    _hub_settings(monkeypatch, tmp_path / "cache", offline=True)
    snapshot = _fake_cache(tmp_path / "cache", "org/tiny", {"config.json": b"{}"})
    assert Path(hub.resolve("org/tiny", "target")) == snapshot
    cfg = TrainConfig(target="org/tiny", target_tokenizer="/local/tok",
                      sources=(TeacherConfig(name="a", checkpoint="org/tiny"),))
    resolved = hub.resolve_config(cfg)
    assert Path(resolved.target) == snapshot and Path(resolved.sources[0].checkpoint) == snapshot
    assert resolved.target_tokenizer == "/local/tok" and resolved.run_dir == cfg.run_dir


def _timed_error(spec: str) -> tuple[str, float]:
    t = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        hub.resolve(spec, "sources[0].checkpoint")
    return str(e.value), time.perf_counter() - t


def test_offline_without_the_model_is_a_clear_error_at_once(tmp_path, monkeypatch):
    _hub_settings(monkeypatch, tmp_path / "cache", offline=True)
    message, seconds = _timed_error("org/missing")
    assert seconds < 5
    assert "HF_HUB_OFFLINE" in message and "sources[0].checkpoint=/path/to/model" in message and "org/missing" in message


def test_unreachable_hub_is_a_clear_error_at_once(tmp_path, monkeypatch):
    _hub_settings(monkeypatch, tmp_path / "cache", offline=False, endpoint="http://127.0.0.1:9")  # refused
    message, seconds = _timed_error("org/missing")
    assert seconds < 5
    assert "could not be reached" in message and "HF_HUB_OFFLINE" in message and "local directory" in message


def test_a_command_takes_a_hub_id(tmp_path):
    """`python -m fusion_jax.generate` with checkpoint=org/name: offline, from the hub cache; a missing one: one
    error line."""
    import jax

    from fusion_jax.config.model import ModelConfig
    from fusion_jax.convert import checkpoint
    from fusion_jax.experiments.demo.tokenizers import train_byte_level_bpe
    from fusion_jax.models import init_params

    tok = train_byte_level_bpe(["the cat sat on the mat"] * 20, tmp_path / "tok", vocab_size=270)
    cfg = ModelConfig(vocab_size=270, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2,
                      num_kv_heads=2, param_dtype="float32", compute_dtype="float32")
    export = checkpoint.save_hf(tmp_path / "export", cfg, init_params(cfg, jax.random.key(0)), model_type="llama",
                                hf_config={}, tokenizer_dir=tok)
    snapshot = _fake_cache(tmp_path / "cache", "org/tiny", {})
    for f in export.iterdir():
        shutil.copy(f, snapshot / f.name)
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "fusion_jax.generate", "--set", "max_new_tokens=3", "the cat", "--set"]
    r = subprocess.run(command + ["checkpoint=org/tiny"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "the cat" in r.stdout, r.stderr[-2000:]
    r = subprocess.run(command + ["checkpoint=org/missing"], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 1 and r.stderr.strip().splitlines()[-1].startswith("error: checkpoint='org/missing'")
    assert "HF_HUB_OFFLINE" in r.stderr


def test_url_paths_where_a_setting_takes_none_are_refused(tmp_path, monkeypatch):
    """A URL where a local path is needed (a model, a generation output), a store other than gs://, or a gs://
    run_dir with the demo or the baseline report is refused with the alternative, not written into a local "gs:"
    directory; run paths in gs:// are tests/test_cloud.py's."""
    from fusion_jax.config.schema import CorpusConfig, DataConfig, DemoConfig, GenerateConfig
    from fusion_jax.files import check_paths
    from fusion_jax.pipeline import open_run

    monkeypatch.chdir(tmp_path)
    for cfg, key, why in [
            (TrainConfig(target="gs://bucket/model"), "target", "takes a local path.*gcsfuse"),
            (TrainConfig(target="/m", sources=(TeacherConfig(name="a", checkpoint="/s", cache="s3://b/c"),)),
             "sources[0].cache", "s3:// is not a supported store"),
            (GenerateConfig(checkpoint="/m", output="gs://b/out.jsonl"), "output", "takes a local path"),
            (TrainConfig(target="/m", run_dir="gs://bucket/run", baseline=True), "run_dir", "local disk only"),
            (TrainConfig(run_dir="gs://bucket/run", demo=DemoConfig(enabled=True)), "run_dir", "local disk only")]:
        with pytest.raises(ConfigError, match=rf"^{key.replace('[', '.').replace(']', '.')}=.*{why}"):
            check_paths(cfg)
    check_paths(TrainConfig(target="/m", data=DataConfig(corpus=CorpusConfig(
        format="hf", paths=("json",), data_files=("hf://datasets/x/y.jsonl",)))))  # a corpus is its reader's
    with pytest.raises(ConfigError, match="takes a local path"):
        with open_run(TrainConfig(target="gs://bucket/m", run_dir="run")):
            pass
    assert not (tmp_path / "gs:").exists()
    assert not (tmp_path / "gs:").exists()
