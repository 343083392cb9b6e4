"""What defines a run: its settings without the keys that only change how it is watched, laid out or fed, with
local paths absolute; and the dotted keys where two settings trees differ (what a refusal names)."""

from __future__ import annotations

import json
import os
from typing import Any

from fusion_jax.data import prepare
from fusion_jax.files import json_dumps

# Keys of the config that change how a run is watched, evaluated, laid out on the devices or fed, but not what it
# computes: they may change between invocations of one run (a run resumes on another mesh, with accumulation for
# memory, more or fewer evaluations). Every other key defines the run.
NOT_IDENTITY = (
    "run_dir", "dry_run", "baseline", "compare_paper", "samples", "remat", "mesh", "allow_tokenizer_mismatch",
    "train.checkpoint_every", "train.keep_checkpoints", "train.log_every", "train.eval_every", "train.eval_batches",
    "train.eval_documents", "train.peak_flops", "train.export", "train.export_dtype", "train.trackers", "train.wandb",
    "train.tasks", "train.tasks_every", "train.progress", "train.extend", "train.stall_steps",
    "capture.batch_size", "capture.fit_rows", "optimizer.accumulation", "loss.chunk_size",
    "loader.worker_count", "loader.prefetch", "loader.cache_dir", "loader.doc_cache", "loader.verify",
)
# Keys added after runs were recorded, with the value that means what the runs before them did: left out of the
# identity at that value, so that those runs are still recognised.
ADDED_LATER = {"sources": {"continuation": False, "in_context": False, "tail": "renormalize"},
               "loss": {"likelihood_weight": 0.0, "likelihood_temperature": 100.0},
               "demo": {"in_context": False, "tasks": False}}
# What the demo fills in from its own settings (which its stages check): not part of a demo run's identity. The
# sources a user adds to the demo's are (an empty list is left out, as it was before users could add any).
DEMO_FILLED = ("target", "target_tokenizer", "data.documents", "data.corpus")


def differences(have: Any, want: Any, key: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, have, want) wherever two settings trees differ; dicts by key, equally long lists item by item."""
    if isinstance(have, dict) and isinstance(want, dict):
        return [d for k in sorted(set(have) | set(want), key=str)
                for d in differences(have.get(k), want.get(k), f"{key}.{k}" if key else str(k))]
    if isinstance(have, list) and isinstance(want, list) and len(have) == len(want) and have != want:
        return [d for i, (a, b) in enumerate(zip(have, want)) for d in differences(a, b, f"{key}[{i}]")]
    return [] if have == want else [(key or "(settings)", have, want)]


def differing_keys(have: Any, want: Any) -> list[str]:
    """The dotted keys (``optimizer.learning_rate``, ``sources[1].checkpoint``) whose values differ between two
    settings trees: what the refusals of a changed run, document store or demo stage name."""
    return [k for k, _, _ in differences(have, want)]


def _absolute(path: str) -> str:
    return os.path.normpath(os.path.abspath(os.path.expanduser(path))) if path else path


def _drop_not_identity(out: dict) -> None:
    demo = out.get("demo")
    is_demo = isinstance(demo, dict) and demo.get("enabled")
    if is_demo and not out.get("sources"):
        out.pop("sources", None)
    for section, defaults in ADDED_LATER.items():
        node = out.get(section)
        for item in [node] if isinstance(node, dict) else node or ():  # a section, or a list of them
            for key, value in defaults.items():
                if isinstance(item, dict) and key in item and item[key] == value:
                    item.pop(key)
    for key in NOT_IDENTITY + (DEMO_FILLED if is_demo else ()):
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)


def _absolute_paths(out: dict) -> None:
    for key in ("target", "target_tokenizer", "cache_dir"):
        if isinstance(out.get(key), str):
            out[key] = _absolute(out[key])
    for source in out.get("sources") or ():
        for key in ("checkpoint", "tokenizer", "cache"):
            if isinstance(source, dict) and isinstance(source.get(key), str):
                source[key] = _absolute(source[key])
    data = out.get("data")
    if isinstance(data, dict):
        if isinstance(data.get("documents"), str):
            data["documents"] = _absolute(data["documents"])
        if isinstance(data.get("corpus"), dict):
            data["corpus"] = prepare.normalised({"corpus": data["corpus"]})["corpus"]


def run_identity(settings: dict) -> dict:
    """The settings that define a run: ``config_loader.to_dict(cfg)`` (or a run's recorded config) without the keys
    of :data:`NOT_IDENTITY`, with local paths absolute, so that a run given ``corpus.jsonl`` once and
    ``./corpus.jsonl`` (or a relative and an absolute run_dir) the next time is the same run."""
    out = json.loads(json_dumps(settings))
    _drop_not_identity(out)
    _absolute_paths(out)
    return out
