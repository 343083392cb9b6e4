"""Benchmarks through lm-evaluation-harness (lm-eval 0.4) on our JAX model: no torch, no conversion.

:class:`FusionJaxLM` is an ``lm_eval`` model (``TemplateLM``: lm-eval splits each context/continuation pair into
tokens as it does for its ``hf`` model):

* ``loglikelihood`` scores each request's continuation after its context, the pair cut from the left to
  ``max_length`` + 1 tokens, exactly as the ``hf`` model does; requests are packed into rows of a few lengths
  (several short requests share a row, segment masks keep them apart), ``batch_size`` rows per forward on the mesh;
* ``loglikelihood_rolling`` scores a whole text in disjoint windows of ``max_length`` tokens (lm-eval's own
  ``get_rolling_token_windows``), the first token conditioned on the prefix token;
* ``generate_until`` continues contexts (cut from the left to ``max_length − max_gen_toks`` tokens) with
  :class:`~fusion_jax.evaluate.generate.Generator`: greedy unless a task asks to sample, ending at EOS, at the
  task's ``until`` strings or after ``max_gen_toks``.

The prefix token (what an empty context conditions on) is the BOS when the model was loaded with ``bos``, else the
EOS (the document boundary our pipeline trains on); no BOS is prepended otherwise. For the same numbers from
lm-eval's ``hf`` model on an export, give it ``add_bos_token=False`` and ``prefix_token_id=<that id>``.

In a multi-host run every process scores its share of the requests (``i ≡ process_index mod process_count``) and
the results are gathered, so every process returns all of them; generation runs every prompt on every process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from lm_eval.api.model import TemplateLM

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.schema import SamplingConfig, TasksConfig
from fusion_jax.data.scoring import RowStep, compiled_ce_step, pack_batches, row_lengths, score_rows
from fusion_jax.errors import ConfigError, InputError
from fusion_jax.evaluate.generate import Generator
from fusion_jax.evaluate.model import LoadedModel

class FusionJaxLM(TemplateLM):
    """lm-eval's model API over a :class:`LoadedModel` (see the module docstring)."""

    def __init__(self, model: LoadedModel, *, batch_size: int = 8, max_length: int = 2048, max_gen_toks: int = 256,
                 logits_chunk: int = 512):
        super().__init__()
        if batch_size <= 0 or max_length < 2 or max_gen_toks <= 0 or logits_chunk <= 0:
            raise ConfigError(f"batch_size, max_gen_toks and logits_chunk must be positive and max_length >= 2, got "
                             f"{batch_size}, {max_gen_toks}, {logits_chunk}, {max_length}")
        if max_gen_toks >= max_length:
            raise ConfigError(f"max_gen_toks ({max_gen_toks}) must be less than max_length ({max_length}): the "
                             "context needs room")
        if model.tokenizer.eos_id is None and model.bos_id is None:
            raise ConfigError(f"tokenizer {model.tokenizer.name!r} has neither EOS nor BOS: lm-eval needs a token for "
                             "an empty context to condition on")
        self.model = model
        self._batch_size, self._max_length, self._max_gen_toks, self.logits_chunk = (
            batch_size, max_length, max_gen_toks, logits_chunk)
        self.generator = Generator(model, batch_size)
        self.rules_key = tuple(sorted((k, tuple(v)) for k, v in model.rules.items()))

    # ------------------------------------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int:
        eos = self.model.tokenizer.eos_id
        return eos if eos is not None else self.model.bos_id

    @property
    def prefix_token_id(self) -> int:
        return self.model.bos_id if self.model.bos_id is not None else self.model.tokenizer.eos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        ids = [int(i) for i in self.model.tokenizer.encode(string).ids]
        if self.model.bos_id is not None and add_special_tokens is not False:
            ids = [self.model.bos_id] + ids
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, tokens: Sequence[int], **kwargs) -> str:
        return self.model.tokenizer.decode_bytes(tokens).decode("utf-8", "replace")

    # ------------------------------------------------------------------------------------------------ requests

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) → (log p(continuation | context), greedy)."""
        pieces = []
        for _, context, continuation in requests:
            if not context or not continuation or len(continuation) > self.max_length:
                raise InputError(f"a loglikelihood request needs a context and a continuation of 1..{self.max_length} "
                                 f"tokens, got {len(context)} and {len(continuation)}")
            pieces.append(((list(context) + list(continuation))[-(self.max_length + 1):], len(continuation)))
        return self._score(pieces)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        windows, owner = [], []
        for r, request in enumerate(requests):
            (text,) = request.args
            for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, context, continuation))
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[r] += logprob
        for request, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs

        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str] = [""] * len(requests)
        for indices in groups.values():
            kwargs = normalize_gen_kwargs(requests[indices[0]].args[1], self.max_gen_toks)
            eos = self.tok_decode([self.eot_token_id]) or None
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen = int(kwargs.pop("max_gen_toks"))
            if max_gen >= self.max_length:
                raise ConfigError(f"a task asks for {max_gen} generated tokens, max_length is {self.max_length}: raise "
                                 "max_length")
            sampling = SamplingConfig()
            if kwargs.get("do_sample") and float(kwargs.get("temperature") or 0) > 0:
                sampling = SamplingConfig(float(kwargs["temperature"]), int(kwargs.get("top_k") or 0),
                                          float(kwargs.get("top_p") or 1.0))
            contexts = [self.tok_encode(requests[i].args[0], left_truncate_len=self.max_length - max_gen)
                        for i in indices]
            contexts = [c or [self.prefix_token_id] for c in contexts]
            results = self.generator.generate_ids(contexts, max_new_tokens=max_gen, sampling=sampling, stop=until)
            for i, g in zip(indices, results):
                out[i] = g.text
                self.cache_hook.add_partial("generate_until", requests[i].args, g.text)
        return out

    # ------------------------------------------------------------------------------------------------ the device

    def _score(self, pieces: list[tuple[list[int], int]]) -> list[tuple[float, bool]]:
        """(tokens, n): the sum of log p of the last n tokens, each given the tokens before it, and whether every one
        of them is the model's most likely next token."""
        pid, nproc = jax.process_index(), jax.process_count()
        if self._batch_size % nproc:
            raise ConfigError(f"batch_size {self._batch_size} must be a multiple of the process count {nproc}")
        local = self._batch_size // nproc
        seq_len = -(-(self.max_length + 1) // 8) * 8
        step, sharding = compiled_ce_step(self.model.cfg, self.logits_chunk, self.rules_key, self.model.mesh,
                                          self._batch_size, seq_len, greedy=True)
        run = RowStep(step, self.model.params, self.model.mesh, sharding, sharding.spec, local, _row_arrays)
        mine = [(i, tokens, n) for i, (tokens, n) in enumerate(pieces) if i % nproc == pid]
        batches = pack_batches([len(t) for _, t, _ in mine], local, row_lengths(seq_len), mine)
        results: dict[int, tuple[float, bool]] = {}

        def on_batch(rows, outputs):
            ce, greedy = outputs
            for j, row in enumerate(rows):
                off = 0
                for i, tokens, n in row:
                    m = len(tokens)
                    span = slice(off + m - 1 - n, off + m - 1)
                    results[i] = (-float(ce[j, span].sum(dtype=np.float64)), bool(greedy[j, span].all()))
                    off += m

        score_rows(run, batches, on_batch)
        merged: dict[int, Any] = {}
        for part in mesh_lib.allgather_json({str(i): r for i, r in results.items()}):
            merged.update({int(i): tuple(r) for i, r in part.items()})
        return [merged[i] for i in range(len(pieces))]


def _row_arrays(row: list | None, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A row of (index, tokens, n) pieces (None: padding) → (tokens, segment ids, scored) [length]: each piece's
    last n tokens are scored (the positions before them predict them)."""
    tokens = np.zeros(length, np.int32)
    segs = np.zeros(length, np.int32)
    score = np.zeros(length, bool)
    off = 0
    for s, (_, ids, n) in enumerate(row or (), start=1):
        m = len(ids)
        tokens[off:off + m] = ids
        segs[off:off + m] = s
        score[off + m - 1 - n:off + m - 1] = True
        off += m
    return tokens, segs, score


def run_tasks(model: LoadedModel, tasks: TasksConfig, seed: int = 0) -> dict:
    """lm-eval's `simple_evaluate` of `model` on `tasks.names` (lm-eval's registry, or the task YAMLs in the
    `tasks.include` directories) → its results dict (JSON-safe: lm-eval's own encoder applied; per-sample logs left
    out)."""
    from lm_eval import evaluator, utils
    from lm_eval.tasks import TaskManager

    tasks.validate()
    missing = [p for p in tasks.include if not Path(p).is_dir()]
    if missing:
        raise ConfigError(f"task directories {missing} do not exist (tasks.include: directories of lm-eval task YAMLs)")
    manager = None
    if tasks.include:  # local tasks alone: lm-eval's own index of thousands of YAMLs takes seconds to build
        manager = TaskManager(include_path=list(tasks.include), include_defaults=False)
        if any(not manager.match_tasks([t]) for t in tasks.names):
            manager = None
    manager = manager or TaskManager(include_path=list(tasks.include) or None)
    unknown = [t for t in tasks.names if not manager.match_tasks([t])]
    if unknown:
        where = f" nor in {list(tasks.include)}" if tasks.include else ""
        raise ConfigError(f"unknown lm-eval tasks {unknown}: not in lm-eval's registry{where} (`lm-eval ls tasks` "
                         "lists them; a local task is a YAML file in a tasks.include directory)")
    lm = FusionJaxLM(model, batch_size=tasks.batch_size, max_length=tasks.max_length, max_gen_toks=tasks.max_gen_toks)
    results = evaluator.simple_evaluate(
        model=lm, tasks=list(tasks.names), num_fewshot=None if tasks.num_fewshot < 0 else tasks.num_fewshot,
        limit=tasks.limit or None, task_manager=manager, log_samples=False, bootstrap_iters=0, random_seed=seed,
        numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    if results is None:
        raise InputError(f"lm-eval returned no results for {list(tasks.names)}")
    return json.loads(json.dumps(results, default=utils.handle_non_serializable))


def task_metrics(results: dict) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} of a results dict: the numbers only, without lm-eval's "none" filter suffix and
    without stderrs (what training logs and reports compare)."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        for key, value in metrics.items():
            metric, comma, filt = key.partition(",")  # "acc,none"; "alias", "sample_len" are not metrics
            if comma and isinstance(value, (int, float)) and not isinstance(value, bool) and not metric.endswith("_stderr"):
                out.setdefault(task, {})[metric if filt in ("", "none") else f"{metric} ({filt})"] = float(value)
    return out


def format_tasks_table(results: dict) -> str:
    """lm-eval's markdown table of a results dict."""
    from lm_eval.utils import make_table

    return make_table(results)
