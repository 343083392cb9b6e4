"""python -m fusion_jax.convert SOURCE OUTPUT [--to hf] — Hugging Face ⇄ fusion_jax model directories."""

from __future__ import annotations

import dataclasses
import time
from typing import Literal

import jax

from fusion_jax import cli, config_loader, mesh as mesh_lib
from fusion_jax.convert import checkpoint
from fusion_jax.errors import ConfigError
from fusion_jax.models.config import DType


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    source: str = dataclasses.field(default="", metadata={"help": "HF model directory or fusion_jax checkpoint"})
    output: str = dataclasses.field(default="", metadata={"help": "directory to write (must not exist unless overwrite)"})
    to: Literal["fusion_jax", "hf"] = dataclasses.field(default="fusion_jax", metadata={"help": "output format"})
    param_dtype: DType | None = dataclasses.field(default=None, metadata={"help": "cast params (default: keep)"})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "replace an existing output, if it is a model directory fusion_jax wrote (never other files, never "
                "one that holds the source)"})
    max_shard_gb: float = dataclasses.field(default=5.0, metadata={"help": "HF output: safetensors shard size"})
    # Params are sharded over every device while they pass through, never whole on one.
    mesh: mesh_lib.MeshConfig = mesh_lib.MeshConfig(data=1, fsdp=-1)

    def validate(self) -> None:
        if not self.source or not self.output:
            raise ConfigError("source and output are required: python -m fusion_jax.convert SOURCE OUTPUT")


def main(cfg: ConvertConfig) -> str:
    mesh_lib.initialize_distributed(cfg.mesh)
    checkpoint.kind(cfg.source)  # before anything is read or written: a missing source, a refused output
    checkpoint.check_output(cfg.output, cfg.overwrite, inputs=(cfg.source,))
    mesh = mesh_lib.make_mesh(cfg.mesh)
    start = time.time()
    overrides = {"param_dtype": cfg.param_dtype} if cfg.param_dtype else {}
    model_cfg, params = checkpoint.load(cfg.source, mesh, cfg.mesh.rules, **overrides)
    model_type, hf_config = checkpoint.source_info(cfg.source)
    common = dict(model_type=model_type, hf_config=hf_config, tokenizer_dir=cfg.source, overwrite=cfg.overwrite,
                  inputs=(cfg.source,))
    if cfg.to == "hf":
        out = checkpoint.save_hf(cfg.output, model_cfg, params, max_shard_bytes=int(cfg.max_shard_gb * 2**30), **common)
    else:
        out = checkpoint.save(cfg.output, model_cfg, params, **common)
    n = sum(x.size for x in jax.tree.leaves(params))
    print(f"{model_type}: {n:,} params ({model_cfg.param_dtype}) → {out} [{cfg.to}] in {time.time() - start:.1f}s")
    return str(out)


def parse(argv: list[str] | None = None) -> ConvertConfig:
    parser = cli.config_parser("python -m fusion_jax.convert", __doc__, ConvertConfig)
    parser.add_argument("source", nargs="?", help="HF model directory or fusion_jax checkpoint")
    parser.add_argument("output", nargs="?", help="directory to write")
    parser.add_argument("--to", choices=["fusion_jax", "hf"], help="output format (default fusion_jax)")
    args = parser.parse_args(argv)
    shortcuts = [f"{k}={v}" for k, v in (("source", args.source), ("output", args.output), ("to", args.to)) if v]
    return config_loader.load(ConvertConfig, args.config, [*shortcuts, *args.overrides])


if __name__ == "__main__":
    cli.run(main, parse)
