"""The training metrics' sinks and units: ``metrics.jsonl`` and TensorBoard event files (:class:`MetricsLog`), and
the peak FLOP/s that MFU is measured against."""

from __future__ import annotations

import math
from pathlib import Path

import jax

from fusion_jax.config.schema import TrainConfig
from fusion_jax.files import json_dumps

# Dense bf16 peak FLOP/s per chip, for MFU (override with train.peak_flops).
PEAK_FLOPS = {"TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12,
              "TPU v6 lite": 918e12, "TPU v6e": 918e12, "A100": 312e12, "H100": 989e12, "H200": 989e12}


class MetricsLog:
    """JSONL (one object per logged step; a resumed run appends, later lines win) and TensorBoard event files."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.enabled = enabled
        self.path = run_dir / "metrics.jsonl"
        self.tb = None
        if enabled:
            from tensorboardX import SummaryWriter  # heavy (protobuf): only the process that writes imports it

            self.tb = SummaryWriter(str(run_dir / "tensorboard"))

    def write(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json_dumps({"step": step, "kind": kind, **values}) + "\n")  # NaN as null: strict JSON
        for k, v in _flat(values).items():
            self.tb.add_scalar(f"{kind}/{k}", v, step)
        self.tb.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


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
