"""`fusion-jax train` = `python -m fusion_jax.train`: parse the command line, run the stage."""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.config.schema import TrainConfig
from fusion_jax.experiments import run as experiment
from fusion_jax.pipeline import run as stage


def parse(argv: list[str] | None = None) -> TrainConfig:
    parser = cli.config_parser("python -m fusion_jax.train", stage.__doc__, TrainConfig)
    parser.add_argument("--dry-run", action="store_true", help="print bytes per device of the sharded state and stop")
    return cli.parse_config(parser, TrainConfig, argv, {"dry_run": "dry_run=true"})


def main(argv: list[str] | None = None) -> None:
    cli.run(experiment.main, lambda: parse(argv))
