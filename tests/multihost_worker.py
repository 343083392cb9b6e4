"""One process of a multi-host fusion run on this machine (spawned twice by tests/test_multihost.py).

    python tests/multihost_worker.py ARGS.json

The parent sets the environment before JAX starts: ``XLA_FLAGS`` (4 fake CPU devices), ``JAX_PLATFORMS=cpu``,
``JAX_COORDINATOR_ADDRESS``, ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID`` (read by ``mesh.initialize_distributed``).
ARGS.json: ``{"cfg": TrainConfig as a dict, "out": directory for this process's results, "ocdbt": Orbax's default
checkpoint layout}``.

The worker runs ``experiment.main`` while recording
* which packed blocks this process built (``BlockBuilder.__call__``): per host loading means only the rows of
  the global batch this process's devices hold;
* which files under the run directory this process opened for writing, renamed into place or created (a Python
  audit hook; C++ writers, Orbax's tensorstore and ArrayRecord, are not seen): one writer per shared file;
then builds the train loader once more and checks that its first batch is this host's rows only and that the global
``jax.Array`` made from them is not fully addressable here. It writes ``<out>/process-<i>.json`` and
``<out>/batch-<i>.npz`` (its local rows of global batch 0).
"""

from __future__ import annotations

import json
import os
import sys
import threading
from pathlib import Path

ARGS = json.loads(Path(sys.argv[1]).read_text())
RUN_DIR = os.path.realpath(ARGS["cfg"]["run_dir"])
WRITES: set[str] = set()
_LOCK = threading.Lock()
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _note(path) -> None:
    if isinstance(path, bytes):
        path = os.fsdecode(path)
    if not isinstance(path, (str, os.PathLike)):
        return  # a file descriptor
    full = os.path.realpath(os.path.abspath(path))
    if full == RUN_DIR or full.startswith(RUN_DIR + os.sep):
        with _LOCK:
            WRITES.add(os.path.relpath(full, RUN_DIR))


def _audit(event: str, args: tuple) -> None:
    try:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if mode else isinstance(flags, int) and flags & _WRITE_FLAGS
            if writing:
                _note(path)
        elif event == "os.rename":  # os.rename and os.replace
            _note(args[1])
        elif event == "os.mkdir":
            _note(args[0])
    except Exception:  # noqa: BLE001 - an audit hook must never break the program
        pass


sys.addaudithook(_audit)

import jax  # noqa: E402  (after the hook; the environment is the parent's)
import numpy as np  # noqa: E402

from fusion_jax import mesh as mesh_lib  # noqa: E402
from fusion_jax.experiments import run as experiment  # noqa: E402
from fusion_jax.config import schema  # noqa: E402
from fusion_jax import pipeline  # noqa: E402
from fusion_jax.config.loader import from_dict  # noqa: E402
from fusion_jax.data import loader as loader_lib  # noqa: E402

BUILT: dict[str, list[int]] = {"train": [], "validation": []}
_orig_call = loader_lib.BlockBuilder.__call__


def _recording_call(self, g, *a, **kw):
    with _LOCK:
        BUILT.setdefault(getattr(self.store, "split", "?"), []).append(int(g))
    return _orig_call(self, g, *a, **kw)


loader_lib.BlockBuilder.__call__ = _recording_call


def _loader_check(cfg: schema.TrainConfig, out: Path, pid: int) -> dict:
    """This host's rows of global batch 0, and what the global arrays made from them hold here."""
    documents = pipeline.documents_stage(cfg)  # complete: only checks (and syncs)
    teachers = pipeline.teacher_list(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    ld = loader_lib.FusionLoader(pipeline.loader_config(cfg, teachers, "train"), documents,
                                 cfg.target_tokenizer or cfg.target, mesh=mesh, rules=cfg.mesh.rules, progress=False)
    local = ld.local_batch(0)
    glob = ld.to_global(local)
    B = cfg.loader.global_batch_size
    lo, hi = ld.rows
    leaves = []
    for (path, x), g in zip(jax.tree_util.tree_leaves_with_path(local), jax.tree.leaves(glob)):
        spans = sorted({s.index[0].indices(B)[:2] for s in g.addressable_shards})
        # The rows this process's shards hold, put together, are exactly its local rows.
        held = np.concatenate([np.asarray(next(s.data for s in g.addressable_shards
                                               if s.index[0].indices(B)[:2] == span)) for span in spans])
        leaves.append({"leaf": jax.tree_util.keystr(path), "local_rows": int(np.shape(x)[0]),
                       "global_shape": list(g.shape), "fully_addressable": bool(g.is_fully_addressable),
                       "spans": [list(s) for s in spans], "held_equals_local": bool(np.array_equal(held, x))})
    np.savez(out / f"batch-{pid}.npz", **{jax.tree_util.keystr(p): np.asarray(x)
                                          for p, x in jax.tree_util.tree_leaves_with_path(local)})
    ld.close()
    return {"rows": [lo, hi], "leaves": leaves}


def main() -> None:
    from fusion_jax.train import checkpoint

    checkpoint.USE_OCDBT = ARGS.get("ocdbt", True)
    cfg = from_dict(schema.TrainConfig, ARGS["cfg"])
    out = Path(ARGS["out"])
    report = experiment.main(cfg)  # initializes jax.distributed from the JAX_* variables
    pid = jax.process_index()
    result = {"process_index": pid, "process_count": jax.process_count(),
              "local_devices": jax.local_device_count(), "devices": jax.device_count(),
              "report": {k: report[k] for k in ("steps", "resumed_from", "train", "eval")}}
    with _LOCK:
        result["built"] = {k: sorted(set(v)) for k, v in BUILT.items()}
        result["writes"] = sorted(WRITES)
    result["loader"] = _loader_check(cfg, out, pid)
    (out / f"process-{pid}.json").write_text(json.dumps(result, indent=1, default=float))
    mesh_lib.sync("multihost_worker:done")
    print(f"process {pid}: done", flush=True)


if __name__ == "__main__":
    main()
