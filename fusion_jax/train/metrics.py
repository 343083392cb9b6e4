"""The training metrics' sinks and units: ``metrics.jsonl``, TensorBoard event files and Weights & Biases
(:class:`MetricsLog`), and the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from pathlib import Path

import jax

from fusion_jax.config.schema import TrainConfig, WandbConfig
from fusion_jax.errors import ConfigError
from fusion_jax.files import atomic_write_text, json_dumps

# Dense bf16 peak FLOP/s per chip, for MFU (override with train.peak_flops).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12}


WANDB_ID = "wandb_run_id"  # in the run directory: the W&B run a resumed run continues


class MetricsLog:
    """The training metrics to each of ``train.trackers``: ``metrics.jsonl`` (one object per logged step; a resumed
    run appends, later lines win), TensorBoard event files, and a W&B run (its id kept in ``<run_dir>/wandb_run_id``,
    so a resumed run logs into the same W&B run; the run's settings as its config). Only the process that writes
    (`enabled`) opens any of them."""

    def __init__(self, run_dir: Path, enabled: bool, trackers: Sequence[str] = ("jsonl", "tensorboard"),
                 wandb_cfg: WandbConfig | None = None, settings: dict | None = None):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl" if "jsonl" in trackers else None
        self.tb = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in trackers:
            from tensorboardX import SummaryWriter  # heavy (protobuf): only the process that writes imports it

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_run(run_dir: Path, cfg: WandbConfig, settings: dict):
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
                      dir=str(run_dir), config=settings, settings=wandb.Settings(console="off", silent=True))


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
