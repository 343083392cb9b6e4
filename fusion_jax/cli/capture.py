"""`fusion-jax capture` = `python -m fusion_jax.capture`: parse the command line, run the stage."""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.config.schema import CaptureConfig
from fusion_jax.data import capture as stage


def parse(argv: list[str] | None = None) -> CaptureConfig:
    parser = cli.config_parser("python -m fusion_jax.capture", stage.__doc__, CaptureConfig)
    parser.add_argument("--estimate", action="store_true", help="print the disk and time the capture needs, then stop")
    return cli.parse_config(parser, CaptureConfig, argv, {"estimate": "estimate=true"})


def main(argv: list[str] | None = None) -> None:
    cli.run(stage.main, lambda: parse(argv))
