"""The forward job end to end, and config errors on the real config tree."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fusion_jax.config import loader as config_loader
from fusion_jax.config.schema import Config
from fusion_jax.cli.forward import parse
from fusion_jax.evaluate.forward import main

FORWARD = str(Path(__file__).resolve().parents[1] / "configs" / "forward.yaml")


def test_forward_job_runs_sharded_from_cli_args():
    cfg = parse(["--config", FORWARD, "--set", "forward.steps=1", "--set", "forward.seq_len=32",
                 "--set", "model.num_layers=1"])
    assert cfg.model.num_layers == 1 and cfg.mesh.fsdp == -1
    report = main(cfg)
    assert report["params"] == sum(
        np.prod(s) for s in [(4096, 256), (256, 4096), (256,), (1, 256), (1, 256), (1, 256, 8, 32), (1, 256, 4, 32),
                             (1, 256, 4, 32), (1, 8, 32, 256), (1, 256, 688), (1, 256, 688), (1, 688, 256)]
    )
    # A random model predicts close to uniform.
    assert abs(report["cross_entropy"] - np.log(4096)) < 0.5
    assert report["tokens_per_s"] > 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.norm=batch", "model.norm: invalid choice 'batch'; valid choices: 'rms', 'layer'"),
        ("model.num_heads=true", "model.num_heads"),
        ("model.hiden_size=3", "did you mean 'hidden_size'"),
        ("mesh.fsdp=-1", "at most one of data/fsdp/tensor may be -1"),
        ("model.num_kv_heads=3", "num_heads=4 must be a multiple of num_kv_heads=3"),
        ("mesh.rules.embed=[model]", "rules.embed names unknown mesh axes ['model']"),
    ],
)
def test_config_errors_name_the_key_and_source(override, message):
    with pytest.raises(config_loader.ConfigError) as e:
        config_loader.load(Config, None, [override])
    assert message in str(e.value)
    assert "--set" in str(e.value)


def test_yaml_errors_name_the_file(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  compute_dtype: bf16\n")
    with pytest.raises(config_loader.ConfigError) as e:
        config_loader.load(Config, str(f))
    assert "model.compute_dtype" in str(e.value) and str(f) in str(e.value) and "'bfloat16'" in str(e.value)


def test_help_lists_config_keys():
    out = subprocess.run([sys.executable, "-m", "fusion_jax.forward", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "--config FILE" in out and "model.num_kv_heads" in out and "forward.seq_len" in out


def test_cli_reports_config_errors_in_one_line():
    r = subprocess.run([sys.executable, "-m", "fusion_jax.forward", "--set", "forward.steps=0"], capture_output=True,
                       text=True)
    assert r.returncode != 0
    assert r.stderr.strip().splitlines()[-1].startswith("error: forward")
    assert "Traceback" not in r.stderr
