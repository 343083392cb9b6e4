"""The demo's benchmark tasks: lm-evaluation-harness tasks over its held-out documents, written as task YAMLs and
JSONL files that lm-eval reads offline (``train.tasks.include``).

Per domain ``d``:

* ``demo_next_line_<d>`` (multiple choice, acc and acc_norm): a held-out document up to a line end, and four
  candidate next lines: the true one and the next lines of three other held-out documents of the domain;
* ``demo_rolling_<d>`` (rolling log-likelihood: bits per byte, byte and word perplexity): the held-out documents.

Deterministic in the documents and the seed; written into ``out_dir`` (replaced as a whole when it changes).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

from fusion_jax.data.documents import DocumentStore
from fusion_jax.files import atomic_write_text

CHOICES = 4
MIN_CONTEXT_CHARS = 80  # a question's context: at least this much of its document
MAX_CONTEXT_CHARS = 600


def next_line_items(texts: list[str], seed: int) -> list[dict]:
    """{"context", "choices", "answer"} per document that has a line end after MIN_CONTEXT_CHARS characters followed
    by a non-blank line: the document up to a line end drawn at random among those (its last MAX_CONTEXT_CHARS
    characters), and the true next line among CHOICES lines, the others the next lines of other documents' items (the
    same kind of line, so that neither length nor position gives the answer away)."""
    rng = random.Random(seed)
    cuts = []
    for i, text in enumerate(texts):
        lines = text.split("\n")
        ends = [k for k in range(1, len(lines))
                if lines[k].strip() and len("\n".join(lines[:k])) + 1 >= MIN_CONTEXT_CHARS]
        if ends:
            k = rng.choice(ends)
            cuts.append((i, "\n".join(lines[:k]) + "\n", lines[k]))
    items = []
    for i, context, true in cuts:
        others = sorted({line for j, _, line in cuts if j != i and line != true})
        if len(others) < CHOICES - 1:
            continue
        choices = rng.sample(others, CHOICES - 1) + [true]
        rng.shuffle(choices)
        items.append({"context": context[-MAX_CONTEXT_CHARS:], "choices": choices, "answer": choices.index(true)})
    return items


def _metric(name: str, aggregation: str, higher_is_better: bool) -> dict:
    return {"metric": name, "aggregation": aggregation, "higher_is_better": higher_is_better}


def _task(name: str, data: Path, **fields) -> str:
    """An lm-eval task YAML over one local JSONL file."""
    return yaml.safe_dump({"task": name, "dataset_path": "json",
                           "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test", **fields},
                          sort_keys=False, allow_unicode=True)


def write_tasks(documents: str, out_dir: Path, seed: int = 0) -> tuple[str, ...]:
    """The demo's tasks over the validation split of `documents`, written into `out_dir` → their names."""
    store = DocumentStore(documents, "validation")
    by_domain: dict[str, list[str]] = {}
    for i in range(len(store)):
        doc = store[i]
        by_domain.setdefault(doc.domain, []).append(doc.text)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = []
    for domain, texts in sorted(by_domain.items()):
        items = next_line_items(texts, seed)
        if items:
            names.append(f"demo_next_line_{domain}")
            data = out_dir / f"next_line_{domain}.jsonl"
            atomic_write_text(data, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
            atomic_write_text(out_dir / f"{names[-1]}.yaml", _task(
                names[-1], data, output_type="multiple_choice", doc_to_text="{{context}}",
                doc_to_choice="{{choices}}", doc_to_target="answer", target_delimiter="",
                metric_list=[_metric(m, "mean", True) for m in ("acc", "acc_norm")]))
        names.append(f"demo_rolling_{domain}")
        data = out_dir / f"rolling_{domain}.jsonl"
        atomic_write_text(data, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
        atomic_write_text(out_dir / f"{names[-1]}.yaml", _task(
            names[-1], data, output_type="loglikelihood_rolling", doc_to_text="", doc_to_target="{{text}}",
            metric_list=[_metric("bits_per_byte", "bits_per_byte", False),
                         _metric("byte_perplexity", "weighted_perplexity", False),
                         _metric("word_perplexity", "weighted_perplexity", False)]))
    return tuple(names)
