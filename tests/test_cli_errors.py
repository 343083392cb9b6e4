"""cli.run: one `error: …` line for what the user can fix (UserError, OSError), exit 130 on Ctrl-C, and a full
traceback for everything else (a bare ValueError included)."""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest

from fusion_jax import cli
from fusion_jax.errors import CheckpointError, ConfigError, InputError, RunDirError, UserError


def _raiser(exc: BaseException):
    def main(cfg):
        raise exc
    return main


@pytest.mark.parametrize("cls", [UserError, ConfigError, InputError, CheckpointError, RunDirError])
def test_user_error_is_one_line(cls, capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(_raiser(cls("cfg.yaml: key 'lr' must be positive; set lr > 0")), lambda: None)
    assert e.value.code == "error: cfg.yaml: key 'lr' must be positive; set lr > 0"  # sys.exit(str) → exit 1


@pytest.mark.parametrize("exc", [ValueError("shape mismatch deep inside"), RuntimeError("internal invariant"),
                                 TypeError("bad call"), FloatingPointError("nan")])
def test_other_errors_propagate(exc):
    with pytest.raises(type(exc)) as e:
        cli.run(_raiser(exc), lambda: None)
    assert e.value is exc


def test_os_error_names_the_path():
    with pytest.raises(SystemExit) as e:
        cli.run(_raiser(PermissionError(errno.EACCES, "Permission denied", "/data/out.bin")), lambda: None)
    assert isinstance(e.value.code, str) and "\n" not in e.value.code
    assert e.value.code.startswith("error: Permission denied: /data/out.bin")


def test_keyboard_interrupt_exits_130(capsys):
    with pytest.raises(SystemExit) as e:
        cli.run(_raiser(KeyboardInterrupt()), lambda: None)
    assert e.value.code == 130
    assert "run the same command again to resume" in capsys.readouterr().err


def _run_script(body: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(f"""
        from fusion_jax import cli
        from fusion_jax.errors import ConfigError
        def main(cfg):
            {body}
        cli.run(main, lambda: None)
    """)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_subprocess_user_error_one_stderr_line():
    r = _run_script("raise ConfigError('run.yaml: lr must be > 0, got -1; set lr to a positive number')")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == ["error: run.yaml: lr must be > 0, got -1; set lr to a positive number"]


def test_subprocess_value_error_keeps_traceback():
    r = _run_script("raise ValueError('shapes (3,) and (4,) do not broadcast')")
    assert r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert "ValueError: shapes (3,) and (4,) do not broadcast" in r.stderr
    assert "error: " not in r.stderr.splitlines()[-1][:7]
