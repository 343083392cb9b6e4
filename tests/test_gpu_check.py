"""bench/gpu_check.{sh,py}: the GPU check runs end to end at --tiny size on the CPU (both modes, through the shell
script with GPU_CHECK_PYTHON = this interpreter, so no venv is made), its plan's parameter counts are the models'
real ones, and --dry-run says what it would do without doing it."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "gpu_check.sh"


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(**kw) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPU_CHECK_")}
    env.update(kw)
    return env


def test_tiny_run_on_cpu(tmp_path):
    out_json = tmp_path / "result.json"
    t = time.perf_counter()
    proc = subprocess.run(["bash", str(SCRIPT), "--tiny", "--json-out", str(out_json)], cwd=ROOT, text=True,
                          capture_output=True, timeout=300,
                          env=_env(GPU_CHECK_PYTHON=sys.executable, TMPDIR=str(tmp_path)))
    wall = time.perf_counter() - t
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    modes = {x["mode"]: x for x in lines if "mode" in x}
    assert list(modes) == ["online", "cached"]
    for m in modes.values():
        assert m["device"]["platform"] == "cpu"
        assert m["steps"] == 4 and m["timed_steps"] == 2
        assert math.isfinite(m["step_s"]) and m["step_s"] > 0
        assert math.isfinite(m["tokens_per_s"]) and m["tokens_per_s"] > 0
        assert abs(m["tokens_per_s"] * m["step_s"] - m["tokens_per_step"]) < 1e-6 * m["tokens_per_step"]
        assert m.get("peak_bytes_in_use") is None  # the CPU has no memory_stats: null, not a crash
        assert m["mfu"] is None and m["mfu_with_teachers"] is None  # no peak FLOP/s for a CPU
        assert m["final_loss_finite"] and m["loader_s_per_batch"] > 0
    assert modes["online"]["src_overflow_tokens_max_per_batch"] is not None
    assert modes["online"]["teacher_forward_flops_per_token"] > 0
    assert modes["cached"]["teacher_forward_flops_per_token"] is None
    assert modes["cached"]["capture_s"] > 0
    assert "summary" in lines[-1]  # the last JSON line (the shell script's own lines follow it)
    summary = lines[-1]
    assert summary["summary"] == "gpu_check" and summary["size"] == "tiny"
    ratio = summary["cached_over_online_tokens_per_s"]
    assert math.isfinite(ratio) and ratio > 0
    assert ratio == modes["cached"]["tokens_per_s"] / modes["online"]["tokens_per_s"]
    saved = json.loads(out_json.read_text())
    assert set(saved["modes"]) == {"online", "cached"} and saved["summary"]["size"] == "tiny"
    assert not list(tmp_path.glob("fusion_gpu_check_*")), "the work directory was left behind"
    assert "using GPU_CHECK_PYTHON" in proc.stdout
    print(f"tiny gpu_check: {wall:.1f}s, cached/online tokens/s {ratio:.2f}")


def test_dry_run_says_what_it_would_do(tmp_path):
    venv = tmp_path / "venv"
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--batch", "24"], cwd=ROOT, text=True,
                          capture_output=True, timeout=60, env=_env(GPU_CHECK_VENV=str(venv)))
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"-m venv {venv}" in out
    assert "pip install" in out and "-e '.[cuda]'" in out
    assert "bench/gpu_check.py --batch 24" in out
    assert not venv.exists()  # nothing made
    plan = json.loads(out[out.index("{"):])
    assert plan["size"] == "full" and plan["batch"] == 24 and plan["seq"] == 2048
    assert plan["models"]["target"]["params"] == 1_041_836_032
    assert plan["models"]["mpt"]["params"] == 515_950_080 and plan["models"]["neox"]["params"] == 377_808_896
    assert plan["modes"] == ["online", "cached"]

    own = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--tiny"], cwd=ROOT, text=True, capture_output=True,
                         timeout=60, env=_env(GPU_CHECK_PYTHON=sys.executable))
    assert own.returncode == 0, own.stderr
    assert f"use GPU_CHECK_PYTHON={sys.executable} as it is" in own.stdout and "-m venv" not in own.stdout
    assert json.loads(own.stdout[own.stdout.index("{"):])["size"] == "tiny"


def test_plan_counts_are_the_models_params():
    """The plan's formula (no JAX, for --plan) against the real param layout, at full size, abstractly."""
    from fusion_jax.models import decoder
    from fusion_jax.config.model import ModelConfig
    from fusion_jax.train.step import flops_per_token

    g = _module()
    a = g.parse([])
    for role, f in g.fields(a).items():
        cfg = ModelConfig(**f)
        cfg.validate()
        real = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(decoder.abstract_params(cfg)))
        assert g.param_count(f) == real, role
        assert g.flops_per_token(f, 2048) == flops_per_token(cfg, 2048), role


def test_full_size_refuses_a_machine_without_gpu():
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, text=True, capture_output=True, timeout=120,
                          env=_env(GPU_CHECK_PYTHON=sys.executable))
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "JAX sees no GPU (platform 'cpu')" in proc.stdout and "--tiny" in proc.stdout
