"""The demo's benchmark tasks: lm-evaluation-harness tasks over its held-out documents, written as task YAMLs and
JSONL files that lm-eval reads offline (``train.tasks.include``).

Per domain ``d``:

* ``demo_next_line_<d>`` (multiple choice, acc and acc_norm): the beginning of a held-out document up to a line
  end, and four candidate next lines: the true one and three lines of other held-out documents of the domain;
* ``demo_rolling_<d>`` (rolling log-likelihood: bits per byte, byte and word perplexity): the held-out documents.

Deterministic in the documents and the seed; written into ``out_dir`` (replaced as a whole when it changes).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from fusion_jax.data.documents import DocumentStore
from fusion_jax.files import atomic_write_text

CHOICES = 4
MIN_CONTEXT_CHARS = 80  # a question's context: at least this much of its document
MAX_CONTEXT_CHARS = 600


def _lines(text: str) -> list[str]:
    return [line for line in text.split("\n") if line.strip()]


def next_line_items(texts: list[str], seed: int) -> list[dict]:
    """{"context", "choices", "answer"} per document with a context of MIN_CONTEXT_CHARS.. and a next line: the
    document up to a line end, the true next line among CHOICES lines (the others drawn from other documents)."""
    rng = random.Random(seed)
    pool = [(i, line) for i, text in enumerate(texts) for line in _lines(text)]
    items = []
    for i, text in enumerate(texts):
        lines = text.split("\n")
        end, context = 0, ""
        while end < len(lines) - 1 and len(context) < MIN_CONTEXT_CHARS:
            context = "\n".join(lines[:end + 1]) + "\n"
            end += 1
        true = lines[end] if end < len(lines) else ""
        others = [line for j, line in pool if j != i and line != true]
        if not true.strip() or len(context) < MIN_CONTEXT_CHARS or len(set(others)) < CHOICES - 1:
            continue
        choices = rng.sample(sorted(set(others)), CHOICES - 1) + [true]
        rng.shuffle(choices)
        items.append({"context": context[-MAX_CONTEXT_CHARS:], "choices": choices, "answer": choices.index(true)})
    return items


def _yaml(task: str, data: Path, body: str) -> str:
    return (f"task: {task}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            f"test_split: test\n{body}")


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
            data = out_dir / f"next_line_{domain}.jsonl"
            atomic_write_text(data, "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))
            names.append(f"demo_next_line_{domain}")
            atomic_write_text(out_dir / f"{names[-1]}.yaml", _yaml(names[-1], data, (
                "output_type: multiple_choice\ndoc_to_text: \"{{context}}\"\ndoc_to_choice: \"{{choices}}\"\n"
                "doc_to_target: answer\ntarget_delimiter: \"\"\n"
                "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")))
        data = out_dir / f"rolling_{domain}.jsonl"
        atomic_write_text(data, "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts))
        names.append(f"demo_rolling_{domain}")
        atomic_write_text(out_dir / f"{names[-1]}.yaml", _yaml(names[-1], data, (
            "output_type: loglikelihood_rolling\ndoc_to_text: \"\"\ndoc_to_target: \"{{text}}\"\n"
            "metric_list:\n  - metric: bits_per_byte\n  - metric: byte_perplexity\n  - metric: word_perplexity\n")))
    return tuple(names)
