"""python -m fusion_jax.import_fusellm DATASET_DIR OUT --tokenizer TOK — train on official FuseLLM features directly.

Imports a dataset saved by the official pipeline (``token_alignment.py``, step 3b, or ``packing.py``, step 4; a
``datasets`` ``save_to_disk`` directory) into OUT: ``documents/`` (a document store, one document per row),
``teacher_base/`` and ``teacher_aligned_{j}/`` (teacher caches in the target tokenization) and ``import.json``
(counts of empty, one-hot and re-sorted rows, special-id candidates, rows the loader re-tokenizes differently).
See ``fusion_jax/data/importer.py`` for the exact conversion. Train on it with, per teacher::

    {cache: OUT/teacher_base, tokenizer: TOK, align: bytes, vocab_map: identity, fallback: mask}

and the document store ``OUT/documents`` with the same target tokenizer TOK.

DATASET_DIR, OUT and the flags are shortcuts for config keys (`--set dataset_dir=... output=...`,
`--no-check-reencode` is `--set check_reencode=false`); `--config FILE` and `--set KEY=VALUE` work too
(`fusion-jax import_fusellm` is the same command).
"""

from __future__ import annotations

from fusion_jax import cli
from fusion_jax.config.schema import ImportConfig
from fusion_jax.data import importer as stage

# argparse dest → config key
SHORTCUTS = {"dataset_dir": "dataset_dir", "output": "output", "tokenizer": "tokenizer", "split": "split",
             "store_split": "store_split", "docs_per_shard": "docs_per_shard", "logprob_format": "logprob_format",
             "check_reencode": "check_reencode", "overwrite": "overwrite"}


def parse(argv: list[str] | None = None) -> ImportConfig:
    p = cli.config_parser("python -m fusion_jax.import_fusellm", __doc__, ImportConfig)
    p.add_argument("dataset_dir", metavar="DATASET_DIR", nargs="?",
                   help="the official dataset (save_to_disk directory)")
    p.add_argument("output", metavar="OUT", nargs="?", help="output directory (created)")
    p.add_argument("--tokenizer",
                   help="the base (target) model's tokenizer the dataset was built with (.model, tokenizer.json, dir)")
    p.add_argument("--split", help="split of a DatasetDict to import (default: train)")
    p.add_argument("--store-split", metavar="{train,validation}",
                   help="document-store split to write (default: --split)")
    p.add_argument("--docs-per-shard", type=int, metavar="N", help="documents per cache shard, >= 1 (default: 256)")
    p.add_argument("--logprob-format", metavar="{quantized,float16}",
                   help="cache storage: quantized (37 B/token at k=10) or float16 (46 B/token)")
    p.add_argument("--no-check-reencode", dest="check_reencode", action="store_const", const=False,
                   help="skip re-tokenizing each text to count rows the loader will tokenize differently")
    p.add_argument("--overwrite", action="store_const", const=True, help="replace an earlier import at OUT")
    return cli.parse_config(p, ImportConfig, argv, shortcuts=SHORTCUTS)


def main(argv: list[str] | None = None) -> None:
    cli.run(stage.run_import, lambda: parse(argv))
