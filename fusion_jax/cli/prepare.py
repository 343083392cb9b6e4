"""`fusion-jax prepare` = `python -m fusion_jax.prepare`: parse the command line, run the stage."""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.config.schema import PrepareConfig
from fusion_jax.data import prepare as stage


def parse(argv: list[str] | None = None) -> PrepareConfig:
    parser = cli.config_parser("python -m fusion_jax.prepare", stage.__doc__, PrepareConfig)
    return cli.parse_config(parser, PrepareConfig, argv)


def main(argv: list[str] | None = None) -> None:
    cli.run(stage.main, lambda: parse(argv))
