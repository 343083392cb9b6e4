"""`fusion-jax generate` = `python -m fusion_jax.generate`: parse the command line, run the stage."""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.config.schema import GenerateConfig
from fusion_jax.evaluate import generate as stage


def parse(argv: list[str] | None = None) -> GenerateConfig:
    parser = cli.config_parser("python -m fusion_jax.generate", stage.__doc__, GenerateConfig)
    parser.add_argument("prompt", nargs="*", help="prompts (instead of --set prompts=[...])")
    return cli.parse_config(parser, GenerateConfig, argv, shortcuts={"prompt": "prompts"})


def main(argv: list[str] | None = None) -> None:
    cli.run(stage.main, lambda: parse(argv))
