"""python -m fusion_jax.align audit --source TOK [--source TOK ...] --target TOK --text FILE [FILE ...]

Audit how well each source tokenizer's next-token predictions carry over to the target's tokens, before any compute
is spent: per source → target pair, the target positions by byte-group type, the positions with a teacher row in
each alignment mode (default: byte alignment + prefix vocab map; in_context: that with rows inside source tokens and
the text's next token mapped in context; fusellm: the official DTW + MinED), the share of
teacher top-1 mass transferred exactly / by prefix / by MinED / dropped, the most frequent lossy mappings, and the
coverage of special tokens, digits, whitespace runs and non-ASCII text.

No model is run. The teacher is an ORACLE: at each source position its top-1 (probability 1) is the source's actual
next token, so the mass shown is what an always-right teacher would transfer, not a real model's mass.

The flags are shortcuts for config keys (`--source A --source B` is `--set sources=[A,B]`, `--no-eos` is
`--set eos=false`); `--config FILE` and `--set KEY=VALUE` work too (`fusion-jax align` is the same command).
"""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.align import report as stage
from fusion_jax.config.schema import AuditConfig

# argparse dest → config key
SHORTCUTS = {"source": "sources", "target": "target", "text": "texts", "mode": "alignments", "top": "top",
             "max_tokens": "max_tokens", "eos": "eos", "json": "json", "cache_dir": "cache_dir"}


def parse(argv: list[str] | None = None) -> AuditConfig:
    parser = cli.config_parser("python -m fusion_jax.align", __doc__, AuditConfig)
    parser.usage = "%(prog)s audit [--source TOK ...] [--target TOK] [--text FILE ...] [options]"
    parser.add_argument("command", choices=["audit"], metavar="audit",
                        help="alignment quality of source → target tokenizer pairs on a text (oracle teacher, no "
                             "model)")
    parser.add_argument("--source", action="append", metavar="TOK",
                        help="source (teacher) tokenizer: tokenizer.json, SentencePiece .model or a directory; repeat "
                             "for several (one report per source → target pair)")
    parser.add_argument("--target", metavar="TOK", help="target tokenizer")
    parser.add_argument("--text", nargs="+", action="extend", metavar="FILE", help="UTF-8 text file(s)")
    parser.add_argument("--mode", metavar="{default,in_context,fusellm,all}",
                        help="default: byte alignment + prefix vocab map; in_context: that with rows inside source "
                             "tokens and the next token mapped in context; fusellm: official DTW + MinED (soft); "
                             "all (default)")
    parser.add_argument("--top", type=int, metavar="N", help="worst mappings to list per mode (default 10)")
    parser.add_argument("--max-tokens", type=int, metavar="N",
                        help="cut each file into documents of whole lines with at most N target tokens (default "
                             "2048; DTW is quadratic in it)")
    parser.add_argument("--no-eos", dest="eos", action="store_const", const=False,
                        help="do not append each tokenizer's EOS to every document (the official pipeline does)")
    parser.add_argument("--json", metavar="PATH", help="also write the numbers as JSON")
    parser.add_argument("--cache-dir", metavar="DIR",
                        help="vocab map cache (default $FUSION_JAX_CACHE or ~/.cache/fusion_jax)")
    return cli.parse_config(parser, AuditConfig, argv, shortcuts=SHORTCUTS)


def main(argv: list[str] | None = None) -> None:
    cli.run(stage.run, lambda: parse(argv))
