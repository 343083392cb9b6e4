"""The training metrics' sinks and units: ``metrics.jsonl``, TensorBoard event files and Weights & Biases
(:class:`MetricsLog`), and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Sequence
from pathlib import Path

import jax

from fusion_jax.config.schema import TrainConfig, WandbConfig
from fusion_jax.errors import ConfigError
from fusion_jax.files import AnyPath, as_path, atomic_write_text, copy_file, is_url, json_dumps, staging_path

# Dense bf16 peak FLOP/s per chip, for MFU (override with train.peak_flops).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12}


WANDB_ID = "wandb_run_id"  # in the run directory: the W&B run a resumed run continues
UPLOAD_EVERY_S = 30.0  # how often the metrics files of a run in an object store are copied there


class MetricsLog:
    """The training metrics to each of ``train.trackers``: ``metrics.jsonl`` (one object per logged step; a resumed
    run appends, later lines win), TensorBoard event files, and a W&B run (its id kept in ``<run_dir>/wandb_run_id``,
    so a resumed run logs into the same W&B run; the run's settings as its config). Only the process that writes
    (`enabled`) opens any of them.

    A run directory in an object store, whose objects cannot be appended to: the files are written in a local
    directory standing in for it (:func:`fusion_jax.files.staging_path`, metrics.jsonl first filled with the run's
    earlier lines) and copied to the run directory every :data:`UPLOAD_EVERY_S` seconds and at :meth:`close`; a
    crash loses at most those seconds of lines, which the resumed run logs again. W&B keeps its files locally."""

    def __init__(self, run_dir: str | AnyPath, enabled: bool, trackers: Sequence[str] = ("jsonl", "tensorboard"),
                 wandb_cfg: WandbConfig | None = None, settings: dict | None = None):
        run_dir = as_path(run_dir)
        self.enabled = enabled
        self._remote = run_dir if is_url(run_dir) else None  # where the local files are copied to
        self._local = staging_path(run_dir) if self._remote else run_dir  # where the sinks write
        self.path = self._local / "metrics.jsonl" if "jsonl" in trackers else None
        self.tb = self.wandb = None
        self._uploaded: dict[Path, tuple[int, int]] = {}  # file → (size, mtime) when last copied to the store
        self._upload_time = time.monotonic()
        if not enabled:
            return
        if self._remote is not None:
            self._local.mkdir(parents=True, exist_ok=True)
            if self.path is not None:
                earlier = self._remote / self.path.name
                self.path.write_bytes(earlier.read_bytes() if earlier.exists() else b"")
        if "tensorboard" in trackers:
            from tensorboardX import SummaryWriter  # heavy (protobuf): only the process that writes imports it

            self.tb = SummaryWriter(str(self._local / "tensorboard"))
        if "wandb" in trackers:
            self.wandb = _wandb_run(run_dir, wandb_cfg or WandbConfig(), settings or {})

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json_dumps({"step": step, "kind": kind, **values}) + "\n")  # NaN as null: strict JSON
        flat = {f"{kind}/{k}": v for k, v in _flat(values).items()}
        if self.tb is not None:
            for k, v in flat.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)
        if self._remote is not None and time.monotonic() - self._upload_time >= UPLOAD_EVERY_S:
            self._upload()

    def _upload(self) -> None:
        """Copy the local files that changed since the last copy to the run directory in the store (each object
        replaced whole)."""
        for f in sorted(p for p in self._local.rglob("*") if p.is_file()):
            st = f.stat()
            if self._uploaded.get(f) != (st.st_size, st.st_mtime_ns):
                copy_file(f, self._remote / f.relative_to(self._local).as_posix())  # an object is replaced whole
                self._uploaded[f] = (st.st_size, st.st_mtime_ns)
        self._upload_time = time.monotonic()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            self.tb = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.enabled and self._remote is not None:
            self._upload()


def _wandb_run(run_dir: AnyPath, cfg: WandbConfig, settings: dict):
    """The run directory's W&B run: a new one (its id written first, so that even a crash right after leaves it to
    resume), or the one whose id the directory holds."""
    try:
        import wandb
    except ImportError:
        raise ConfigError("train.trackers has wandb, but the wandb package is not installed: pip install "
                         "'fusion_jax[wandb]' (or drop wandb from train.trackers)") from None
    id_file = run_dir / WANDB_ID
    run_id = id_file.read_text().strip() if id_file.exists() else ""
    if not run_id:
        run_id = secrets.token_hex(6)  # W&B accepts any short alphanumeric id
        atomic_write_text(id_file, run_id + "\n")
    return wandb.init(project=cfg.project, entity=cfg.entity or None, name=cfg.name or str(run_dir),
                      tags=list(cfg.tags) or None, mode=cfg.mode or None, id=run_id, resume="allow",
                      dir=str(_wandb_dir(run_dir)), config=settings, settings=wandb.Settings(console="off", silent=True))


def _wandb_dir(run_dir: AnyPath) -> AnyPath:
    """Where W&B keeps its files (it writes only local ones): the run directory, or a local one for a store's."""
    if not is_url(run_dir):
        return run_dir
    local = staging_path(run_dir / "wandb")
    local.mkdir(parents=True, exist_ok=True)
    return local


def _flat(values: dict, prefix: str = "") -> dict[str, float]:
    out = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[prefix + k] = float(v)
    return out


def peak_flops(cfg: TrainConfig) -> float:
    """Peak FLOP/s of one device: ``train.peak_flops``, else :data:`PEAK_FLOPS` by device kind (0.0: unknown)."""
    if cfg.train.peak_flops:
        return cfg.train.peak_flops
    kind = jax.devices()[0].device_kind
    return next((v for k, v in PEAK_FLOPS.items() if kind.startswith(k) or k in kind), 0.0)
