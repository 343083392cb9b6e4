"""python -m fusion_jax.convert SOURCE OUTPUT [--to hf] — Hugging Face ⇄ fusion_jax model directories; GGUF in."""

from __future__ import annotations

import time

import jax

from fusion_jax import cli
from fusion_jax import mesh as mesh_lib
from fusion_jax.config.schema import ConvertConfig
from fusion_jax.convert import checkpoint


def run(cfg: ConvertConfig) -> str:
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
    parser.add_argument("source", nargs="?", help="HF model directory, fusion_jax checkpoint or GGUF file")
    parser.add_argument("output", nargs="?", help="directory to write")
    parser.add_argument("--to", choices=["fusion_jax", "hf"], help="output format (default fusion_jax)")
    return cli.parse_config(parser, ConvertConfig, argv, shortcuts={"source": "source", "output": "output", "to": "to"})


def main(argv: list[str] | None = None) -> None:
    cli.run(run, lambda: parse(argv))
