"""Multi-host correctness on one machine: 2 JAX processes × 4 fake CPU devices (``jax.distributed`` on localhost,
gloo collectives) run the whole fusion job — documents, capture, loader, train steps, Orbax checkpoints, evaluation,
export — and a resume; everything equals the single-process run on 8 fake devices, and each host reads only its
own rows of every batch.

One reference run in this process (8 devices, mesh data=2 × fsdp=4, 6 steps, constant learning rate so that the
first 4 steps are those of a 4-step run, eval at step 4 and at the end) is compared with
1. a 4-step run of the same config in 2 processes (``tests/multihost_worker.py``): the per-step losses, the
   teacher caches (byte for byte), the held-out evaluation, per-host loading, one writer per shared file;
2. its resume in 2 processes with ``train.steps`` raised to 6: steps 5–6 and the final evaluation equal the
   uninterrupted reference, lm-eval tasks included (train.tasks: log-likelihoods scored across the hosts, greedy
   generation on both);
3. the 2-process step-6 checkpoint restored here, in one process, onto another mesh (data=1 × fsdp=8): the same
   params and optimizer state as the reference's step 6, and the same loader state.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fusion_jax.experiments import run as experiment
from fusion_jax.config import schema
from fusion_jax import pipeline
from fusion_jax.config.loader import to_dict
from fusion_jax.data import teacher_cache as tc
from fusion_jax.files import LOCK_FILE
from fusion_jax.mesh import MeshConfig

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).with_name("multihost_worker.py")
TIMEOUT_S = 300
RTOL = 1e-5

# test_train's tiny assets (a SentencePiece target and a byte-level source, both fusion_jax checkpoints, a jsonl
# corpus) and its config; its module fixture ``assets`` is reused through this import.
from test_train import _train_losses, assets, config  # noqa: E402,F401


TASKS = ("mh_choice", "mh_rolling", "mh_gen")


def _write_tasks(assets: Path) -> Path:
    """lm-eval tasks over the corpus's texts, run by every run at its end (train.tasks): a two-way choice between a
    text's second half and another's, the texts' rolling log-likelihood, and a 4-token greedy continuation."""
    from fusion_jax.experiments.demo.tasks import _metric, _task

    out = assets / "tasks"
    if out.is_dir():
        return out
    out.mkdir()
    texts = [json.loads(line)["text"] for line in (assets / "corpus.jsonl").read_text().splitlines()][:12]
    halves = [(" ".join(t.split()[:len(t.split()) // 2]), " " + " ".join(t.split()[len(t.split()) // 2:]))
              for t in texts]
    items = [{"context": c, "choices": [end, halves[(i + 1) % len(halves)][1]], "answer": 0}
             for i, (c, end) in enumerate(halves)]
    (out / "items.jsonl").write_text("".join(json.dumps(x) + "\n" for x in items))
    (out / "texts.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (out / "mh_choice.yaml").write_text(_task("mh_choice", out / "items.jsonl", output_type="multiple_choice",
                                              doc_to_text="{{context}}", doc_to_choice="{{choices}}",
                                              doc_to_target="answer", target_delimiter="",
                                              metric_list=[_metric("acc", "mean", True)]))
    (out / "mh_rolling.yaml").write_text(_task("mh_rolling", out / "texts.jsonl", output_type="loglikelihood_rolling",
                                               doc_to_text="", doc_to_target="{{text}}",
                                               metric_list=[_metric("bits_per_byte", "bits_per_byte", False)]))
    (out / "mh_gen.yaml").write_text(_task("mh_gen", out / "items.jsonl", output_type="generate_until",
                                           doc_to_text="{{context}}", doc_to_target="{{choices[0]}}",
                                           generation_kwargs={"until": ["."], "max_gen_toks": 4, "do_sample": False},
                                           metric_list=[_metric("exact_match", "mean", True)]))
    return out


def _cfg(assets: Path, run_dir: Path, steps: int, export: bool) -> schema.TrainConfig:
    # seq_len rows in the one-process reference too (a multi-process capture always uses them), so bytes compare
    capture = schema.CaptureSettings(k=4, seq_len=48, batch_size=8, docs_per_shard=8, param_dtype="float32",
                                     compute_dtype="float32", fit_rows=False)
    tasks = schema.TasksConfig(names=TASKS, include=(str(_write_tasks(assets)),), max_length=32, max_gen_toks=4,
                               batch_size=4)
    return config(assets, run_dir, capture=capture,
                  optimizer=schema.OptimizerConfig(learning_rate=1e-3, schedule="constant", warmup_ratio=0.0),
                  train=schema.LoopConfig(steps=steps, checkpoint_every=2, keep_checkpoints=3, log_every=1,
                                         eval_every=4, eval_batches=1, progress=False, export=export, tasks=tasks),
                  mesh=MeshConfig(data=2, fsdp=4))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(cfg: schema.TrainConfig, out: Path, cache: Path, ocdbt: bool = True) -> list[dict]:
    """Run ``cfg`` in 2 processes × 4 CPU devices → each process's result (multihost_worker.py); ``ocdbt``: Orbax's
    default checkpoint layout (off for the Cloud Storage emulator: tests/test_cloud.py)."""
    out.mkdir(parents=True)
    args = out / "args.json"
    args.write_text(json.dumps({"cfg": to_dict(cfg), "out": str(out), "ocdbt": ocdbt}))
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "SLURM_", "OMPI_", "TPU_"))}
    env.update(XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", HF_HUB_OFFLINE="1",
               FUSION_JAX_CACHE=str(cache), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")])))
    logs = [out / f"log-{i}.txt" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as f:
            procs.append(subprocess.Popen([sys.executable, str(WORKER), str(args)], cwd=ROOT,
                                          env={**env, "JAX_PROCESS_ID": str(i),  # datasets' cache: one per process
                                               "HF_DATASETS_CACHE": str(out / f"datasets-{i}")},
                                          stdout=f, stderr=subprocess.STDOUT))
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    codes = [p.returncode for p in procs]
    if codes != [0, 0]:
        tails = "\n".join(f"--- process {i} (exit {c}) ---\n{logs[i].read_text()[-6000:]}"
                          for i, c in enumerate(codes))
        pytest.fail(f"multi-host run failed or timed out after {TIMEOUT_S}s: exit codes {codes}\n{tails}")
    return [json.loads((out / f"process-{i}.json").read_text()) for i in range(2)]


def _evals(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if rec["kind"] == "eval":
            out[rec["step"]] = rec
    return out


def _assert_close_eval(got: dict, want: dict) -> None:
    np.testing.assert_allclose(got["bits_per_byte"], want["bits_per_byte"], rtol=RTOL)
    assert set(got["domains"]) == set(want["domains"])
    for d in want["domains"]:
        np.testing.assert_allclose(got["domains"][d], want["domains"][d], rtol=RTOL)
    np.testing.assert_allclose([got["clm"], got["fusion"]], [want["clm"], want["fusion"]], rtol=RTOL)
    for name, rate in want["win_rate"].items():
        np.testing.assert_allclose(got["win_rate"][name], rate, atol=1e-6)
    if "tasks" in got and "tasks" in want:  # lm-eval (at a run's end): log-likelihoods scored across hosts
        np.testing.assert_allclose(got["tasks"]["mh_rolling"]["bits_per_byte"],
                                   want["tasks"]["mh_rolling"]["bits_per_byte"], rtol=RTOL)
        for task, metric in (("mh_choice", "acc"), ("mh_gen", "exact_match")):
            assert got["tasks"][task][metric] == want["tasks"][task][metric], (task, got["tasks"], want["tasks"])


def _assert_same_cache(a: Path, b: Path) -> None:
    """The same shards, sidecars and manifest (the capture's lock file, kept on disk and deleted from a bucket, is
    not part of the cache)."""
    names = sorted(p.name for p in a.iterdir() if p.name != LOCK_FILE)
    assert names == sorted(p.name for p in b.iterdir() if p.name != LOCK_FILE)
    assert any(n.endswith(".array_record") for n in names)
    for name in names:
        if name.endswith(".array_record"):
            assert (a / name).read_bytes() == (b / name).read_bytes(), name
    ma, mb = (json.loads((d / tc.MANIFEST).read_text()) for d in (a, b))
    assert ma == mb


SHARED_FILES = ("metrics.jsonl", "report.json", "run_config.json", "tensorboard", "export", "documents", "lm_eval.json")


def _shared(writes: list[str]) -> list[str]:
    return [w for w in writes if w.split(os.sep)[0] in SHARED_FILES or w.endswith((tc.MANIFEST, "capture.json"))]


def _restore(run_dir: Path, step: int, abstract):
    from fusion_jax.train.checkpoint import Checkpoints

    ckpts = Checkpoints(run_dir / "checkpoints")
    try:
        state, loader_state, got = ckpts.restore(abstract, step)
    finally:
        ckpts.close()
    assert got == step
    return state, loader_state


def _abstract_state(cfg: schema.TrainConfig, mesh_cfg: MeshConfig):
    from fusion_jax import mesh as mesh_lib
    from fusion_jax.convert import checkpoint
    from fusion_jax.train.optim import make_optimizer
    from fusion_jax.train.step import abstract_state

    mesh = mesh_lib.make_mesh(mesh_cfg)
    model_cfg = checkpoint.model_config(cfg.target, param_dtype=cfg.param_dtype, compute_dtype=cfg.compute_dtype)
    return abstract_state(model_cfg, make_optimizer(cfg.optimizer, cfg.train.steps), mesh, mesh_cfg.rules)


def test_two_processes_equal_one_process(assets, tmp_path):
    assert jax.device_count() == 8 and jax.process_count() == 1
    cache = tmp_path / "fusion_jax_cache"
    # The reference: one process, 8 devices, 6 steps (checkpoints 2, 4, 6; evaluations at 4 and 6).
    ref_dir = tmp_path / "ref"
    ref = experiment.main(_cfg(assets, ref_dir, steps=6, export=True))
    ref_losses, ref_evals = _train_losses(ref_dir), _evals(ref_dir)
    assert sorted(ref_losses) == [1, 2, 3, 4, 5, 6] and sorted(ref_evals) == [4, 6]

    # 1. Two processes × 4 devices, 4 steps, preparing the documents and capturing the caches themselves.
    run = tmp_path / "multi"
    first = _two_processes(_cfg(assets, run, steps=4, export=False), tmp_path / "first", cache)
    for i, r in enumerate(first):
        assert (r["process_index"], r["process_count"], r["local_devices"], r["devices"]) == (i, 2, 4, 8)
        assert r["report"]["resumed_from"] == 0
    losses = _train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4]
    np.testing.assert_allclose([losses[s] for s in range(1, 5)], [ref_losses[s] for s in range(1, 5)], rtol=RTOL)
    # Every process returns the same (valid) metrics, not only process 0.
    for key in ("loss", "clm", "fusion", "grad_norm"):
        np.testing.assert_allclose(first[1]["report"]["train"][key], first[0]["report"]["train"][key], rtol=1e-6)
    np.testing.assert_allclose(first[0]["report"]["train"]["loss"], ref_losses[4], rtol=RTOL)
    for r in first:
        _assert_close_eval(r["report"]["eval"], ref_evals[4])
    assert first[0]["report"]["eval"]["tasks"] == first[1]["report"]["eval"]["tasks"]  # the same on every host
    assert sorted(_evals(run)) == [4]
    _assert_close_eval(_evals(run)[4], ref_evals[4])
    for teacher in ("target", "src"):
        for split in pipeline.SPLITS:
            _assert_same_cache(ref_dir / "cache" / teacher / split, run / "cache" / teacher / split)
    assert (run / "checkpoints" / "4").is_dir() and (run / "report.json").exists()

    # Per-host loading: each process built only the blocks of its rows of every global batch, train and validation.
    B = _cfg(assets, run, 4, False).loader.global_batch_size
    for i, r in enumerate(first):
        lo, hi = r["loader"]["rows"]
        assert (lo, hi) == (i * B // 2, (i + 1) * B // 2)
        assert r["built"]["train"] and r["built"]["validation"]
        for split, blocks in r["built"].items():
            assert all(lo <= g % B < hi for g in blocks), (i, split, blocks)
        # The steps' batches (4 + prefetch) were all built, each from this host's B/2 rows only.
        assert {g // B for g in r["built"]["train"]} >= {0, 1, 2, 3}
        for leaf in r["loader"]["leaves"]:
            assert leaf["local_rows"] == B // 2 and leaf["global_shape"][0] == B, leaf
            assert not leaf["fully_addressable"], leaf
            assert all(lo <= s < e <= hi for s, e in leaf["spans"]), leaf
            assert leaf["held_equals_local"], leaf
    # The two hosts' rows are the single-process loader's global batch 0.
    from fusion_jax.data.loader import FusionLoader

    ref_cfg = _cfg(assets, ref_dir, 6, True)
    ld = FusionLoader(pipeline.loader_config(ref_cfg, pipeline.teacher_list(ref_cfg), "train"), str(ref_dir / "documents"),
                      ref_cfg.target, progress=False, process_index=0, process_count=1)
    whole = ld.local_batch(0)
    parts = [np.load(tmp_path / "first" / f"batch-{i}.npz") for i in range(2)]
    for path, x in jax.tree_util.tree_leaves_with_path(whole):
        key = jax.tree_util.keystr(path)
        np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), x, err_msg=key)

    # One writer per shared file: process 0 writes the metrics, TensorBoard, reports, documents and manifests.
    assert "metrics.jsonl" in first[0]["writes"] and "run_config.json" in first[0]["writes"]
    assert any(w.startswith("documents") for w in first[0]["writes"])
    assert _shared(first[1]["writes"]) == [], first[1]["writes"]

    # 2. Resume in two processes with more steps: steps 5-6 and the final evaluation equal the uninterrupted run.
    # train.extend: a run's train.steps changes only when asked for (constant schedule: the same steps 5-6).
    extended = _cfg(assets, run, steps=6, export=True)
    extended = dataclasses.replace(extended, train=dataclasses.replace(extended.train, extend=True))
    second = _two_processes(extended, tmp_path / "second", cache)
    assert [r["report"]["resumed_from"] for r in second] == [4, 4]
    losses = _train_losses(run)
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([losses[s] for s in (5, 6)], [ref_losses[s] for s in (5, 6)], rtol=RTOL)
    assert sorted(_evals(run)) == [4, 6]
    _assert_close_eval(_evals(run)[6], ref_evals[6])
    _assert_close_eval(second[1]["report"]["eval"], ref["eval"])
    assert set(ref["eval"]["tasks"]) == set(TASKS) and second[0]["report"]["eval"]["tasks"] == \
        second[1]["report"]["eval"]["tasks"]
    assert json.loads((run / "report.json").read_text())["resumed_from"] == 4
    assert _shared(second[1]["writes"]) == [], second[1]["writes"]
    from safetensors.numpy import load_file

    exported, ref_exported = (load_file(str(d / "export" / "model.safetensors")) for d in (run, ref_dir))
    assert sorted(exported) == sorted(ref_exported)
    for name, x in ref_exported.items():
        np.testing.assert_allclose(exported[name], x, rtol=RTOL, atol=1e-6, err_msg=name)

    # 3. The 2-process checkpoint restored in this one process onto another mesh (data=1 × fsdp=8).
    other = MeshConfig(data=1, fsdp=8)
    abstract = _abstract_state(ref_cfg, other)
    got, got_loader = _restore(run, 6, abstract)
    want, want_loader = _restore(ref_dir, 6, abstract)
    assert got_loader == want_loader and got_loader["step"] == 6
    for (path, a), b, s in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want),
                               jax.tree.leaves(abstract)):
        assert a.sharding == s.sharding, jax.tree_util.keystr(path)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))
