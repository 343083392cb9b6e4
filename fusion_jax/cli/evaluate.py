"""`fusion-jax evaluate` = `python -m fusion_jax.evaluate`: parse the command line, run the stage."""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.config.schema import EvaluateConfig
from fusion_jax.evaluate import bpb as stage


def parse(argv: list[str] | None = None) -> EvaluateConfig:
    parser = cli.config_parser("python -m fusion_jax.evaluate", stage.__doc__, EvaluateConfig)
    return cli.parse_config(parser, EvaluateConfig, argv)


def main(argv: list[str] | None = None) -> None:
    cli.run(stage.main, lambda: parse(argv))
