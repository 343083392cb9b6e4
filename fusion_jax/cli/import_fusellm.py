"""python -m fusion_jax.import_fusellm DATASET_DIR OUT --tokenizer TOK — train on official FuseLLM features directly.

Imports a dataset saved by the official pipeline (``token_alignment.py``, step 3b, or ``packing.py``, step 4; a
``datasets`` ``save_to_disk`` directory) into OUT: ``documents/`` (a document store, one document per row),
``teacher_base/`` and ``teacher_aligned_{j}/`` (teacher caches in the target tokenization) and ``import.json``
(counts of empty, one-hot and re-sorted rows, special-id candidates, rows the loader re-tokenizes differently).
See ``fusion_jax/data/importer.py`` for the exact conversion. Train on it with, per teacher::

    {cache: OUT/teacher_base, tokenizer: TOK, align: bytes, vocab_map: identity, fallback: mask}

and the document store ``OUT/documents`` with the same target tokenizer TOK.
"""

from __future__ import annotations

import argparse

from fusion_jax import cli
from fusion_jax.data import teacher_cache as tc
from fusion_jax.data.importer import import_fusellm


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m fusion_jax.import_fusellm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dataset_dir", metavar="DATASET_DIR", help="the official dataset (save_to_disk directory)")
    p.add_argument("output", metavar="OUT", help="output directory (created)")
    p.add_argument("--tokenizer", required=True,
                   help="the base (target) model's tokenizer the dataset was built with (.model, tokenizer.json, dir)")
    p.add_argument("--split", default="train", help="split of a DatasetDict to import (default: train)")
    p.add_argument("--store-split", default=None, choices=["train", "validation"],
                   help="document-store split to write (default: --split)")
    p.add_argument("--docs-per-shard", type=_positive_int, default=256, metavar="N",
                   help="documents per cache shard, >= 1 (default: 256)")
    p.add_argument("--logprob-format", default="quantized", choices=list(tc.LOGPROB_FORMATS),
                   help="cache storage: quantized (37 B/token at k=10) or float16 (46 B/token)")
    p.add_argument("--no-check-reencode", dest="check_reencode", action="store_false",
                   help="skip re-tokenizing each text to count rows the loader will tokenize differently")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier import at OUT")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    return import_fusellm(args.dataset_dir, args.tokenizer, args.output, args.split, store_split=args.store_split,
                          docs_per_shard=args.docs_per_shard, logprob_format=args.logprob_format,
                          check_reencode=args.check_reencode, overwrite=args.overwrite, progress=True)


def main(argv: list[str] | None = None) -> None:
    cli.run(run, lambda: parse(argv))
