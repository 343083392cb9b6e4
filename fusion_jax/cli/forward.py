"""`fusion-jax forward` = `python -m fusion_jax.forward`: parse the command line, run the stage."""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.config.schema import Config
from fusion_jax.evaluate import forward as stage


def parse(argv: list[str] | None = None) -> Config:
    parser = cli.config_parser("python -m fusion_jax.forward", stage.__doc__, Config)
    return cli.parse_config(parser, Config, argv)


def main(argv: list[str] | None = None) -> None:
    cli.run(stage.main, lambda: parse(argv))
