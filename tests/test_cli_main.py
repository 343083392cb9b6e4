"""`fusion-jax COMMAND` (fusion_jax.cli.main) dispatches every command, each also `python -m fusion_jax.COMMAND`;
every command parses with the config loader, its flags being shortcuts for `--set` overrides."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_jax import cli
from fusion_jax.cli import align as align_cli
from fusion_jax.cli import import_fusellm as import_cli
from fusion_jax.cli.main import COMMANDS, main
from fusion_jax.config import loader as config_loader
from fusion_jax.config.schema import AuditConfig, ImportConfig

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in COMMANDS:
        assert f"\n  {command} " in out, command
    r = subprocess.run([sys.executable, "-m", "fusion_jax.cli.main", "--help"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and all(f"  {command} " in r.stdout for command in COMMANDS), r.stderr


def test_unknown_command_is_one_error_line():
    r = subprocess.run([sys.executable, "-m", "fusion_jax.cli.main", "fuse"], cwd=REPO, env=ENV,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown command 'fuse'"), r.stderr


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "config keys (--set KEY=VALUE):" in capsys.readouterr().out


# `python -m fusion_jax.COMMAND` is runpy.run_module(..., run_name="__main__"): every command in one interpreter
# (one JAX import instead of one per command).
_RUN_EVERY_HELP = """
import runpy, sys
for command in sys.argv[1:]:
    sys.argv = [command, "--help"]
    print("=== " + command, flush=True)
    try:
        runpy.run_module("fusion_jax." + command, run_name="__main__", alter_sys=True)
    except SystemExit as e:
        print("=== exit %s" % e.code, flush=True)
"""


def test_python_dash_m_runs_every_command():
    r = subprocess.run([sys.executable, "-c", _RUN_EVERY_HELP, *COMMANDS], cwd=REPO, env=ENV, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    parts = r.stdout.split("=== ")[1:]
    assert [p.split()[0] for p in parts[0::2]] == list(COMMANDS), r.stdout[-2000:]
    for command, help_text, exit_line in zip(COMMANDS, parts[0::2], parts[1::2]):
        assert "config keys (--set KEY=VALUE):" in help_text, command
        assert exit_line.split()[1] in ("0", "None"), (command, exit_line)


def test_align_flags_are_set_overrides():
    flags = align_cli.parse(["audit", "--source", "a", "--source", "b", "--target", "t", "--text", "x", "y",
                             "--text", "z", "--mode", "fusellm", "--top", "3", "--max-tokens", "64", "--no-eos",
                             "--json", "out.json", "--cache-dir", "cache"])
    assert flags == config_loader.load(AuditConfig, None, [
        "sources=[a, b]", "target=t", "texts=[x, y, z]", "alignments=fusellm", "top=3", "max_tokens=64", "eos=false",
        "json=out.json", "cache_dir=cache"])
    assert align_cli.parse(["audit", "--set", "sources=[a]", "--set", "target=t", "--set", "texts=[x]"]).eos
    # --set given after a flag's key wins, as for convert's shortcuts
    assert align_cli.parse(["audit", "--source", "a", "--target", "t", "--text", "x", "--set", "top=2"]).top == 2


def test_align_range_and_choice_errors_come_from_the_config(capsys):
    for args, message in ((["--top", "-1"], "error: --top must be ≥ 0"),
                          (["--mode", "dtw"], "error: alignments: invalid choice 'dtw'")):
        with pytest.raises(SystemExit) as e:
            cli.run(lambda cfg: pytest.fail("main ran"),
                    lambda: align_cli.parse(["audit", "--source", "a", "--target", "t", "--text", "x", *args]))
        assert str(e.value).startswith(message), e.value


def test_import_fusellm_flags_are_set_overrides():
    flags = import_cli.parse(["ds", "out", "--tokenizer", "tok", "--split", "test", "--store-split", "validation",
                              "--docs-per-shard", "8", "--logprob-format", "float16", "--no-check-reencode",
                              "--overwrite"])
    assert flags == ImportConfig(dataset_dir="ds", output="out", tokenizer="tok", split="test",
                                 store_split="validation", docs_per_shard=8, logprob_format="float16",
                                 check_reencode=False, overwrite=True)
    assert import_cli.parse(["ds", "out", "--tokenizer", "tok"]) == ImportConfig(
        dataset_dir="ds", output="out", tokenizer="tok")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda cfg: pytest.fail("main ran"),
                lambda: import_cli.parse(["ds", "out", "--tokenizer", "tok", "--logprob-format", "bf16"]))
    assert str(e.value).startswith("error: logprob_format: invalid choice 'bf16'")


@pytest.mark.parametrize("path", ["out/run", "123", "null", "~", "a #b", "'q'", "a: b", "[x", "true", "é x", "1e5",
                                  "-", "a,b"])
def test_a_string_shortcut_keeps_its_text(path):
    cfg = import_cli.parse(["ds", path, "--tokenizer", "tok", "--split", path])
    assert cfg.output == path and cfg.split == path
    cfg = align_cli.parse(["audit", "--source", path, "--target", "t", "--text", path, "--json", path])
    assert cfg.sources == (path,) and cfg.texts == (path,) and cfg.json == path
    assert cli.override_text("json", "") == 'json=""' and cli.override_text("top", 3) == "top=3"
