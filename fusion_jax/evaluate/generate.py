"""python -m fusion_jax.generate — continue prompts with a model: greedy or sampled, a KV cache, batched, on the mesh.

Prompts are tokenized alone (no BOS unless ``bos``; an empty prompt starts from the EOS token, the document
boundary), sorted by length and decoded ``batch_size`` at a time, left-padded to a shared length (rounded up to a
multiple of 64, so a few shapes compile). A generation ends at the tokenizer's EOS, before the first of the ``stop``
strings, or after ``max_new_tokens``; stop strings are checked every 32 tokens, and a batch ends when all of its rows
have. A sampled prompt's tokens depend on ``seed`` and the prompt's place in the list only, not on its batch.

  python -m fusion_jax.generate --set checkpoint=DIR --set 'prompts=["def fib(n):"]' --set max_new_tokens=64
  python -m fusion_jax.generate --set checkpoint=DIR --set prompts_file=prompts.txt --set sampling.temperature=0.8 \\
      --set sampling.top_p=0.95 --set 'stop=["\\n\\n"]' --set output=samples.jsonl
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import GenerateConfig, SamplingConfig
from fusion_jax.errors import ConfigError, InputError
from fusion_jax.evaluate.model import LoadedModel, load_model
from fusion_jax.files import atomic_write_text
from fusion_jax.models import decode

log = logging.getLogger(__name__)
CHECK_EVERY = 32  # tokens decoded between the host's stop-string checks
PAD_TO = 64  # prompt lengths and cache slots are rounded up to a multiple of this (fewer compiled shapes)


@dataclasses.dataclass(frozen=True)
class Generation:
    text: str                                 # the continuation, cut before a stop string, without the EOS
    tokens: tuple[int, ...]                   # the tokens generated: the EOS included when it ended the text; past
                                              # a stop string, up to the check that found it
    finish: Literal["eos", "stop", "length"]  # what ended it


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


@functools.lru_cache(maxsize=32)
def _compiled(cfg: ModelConfig, rules_key: tuple, mesh, batch: int, prompt_len: int, slots: int, max_new: int,
              sampling: SamplingConfig, eos_ids: tuple[int, ...]):
    """The jitted prefill and decode-chunk steps for one batch shape, and the rows' input sharding."""
    rules = {k: tuple(v) for k, v in rules_key}
    spec = mesh_lib.logical_to_spec(("batch", None), rules, mesh, (batch, prompt_len))
    rows = jax.NamedSharding(mesh, spec)
    with jax.set_mesh(mesh):
        prefill = jax.jit(lambda p, t, v, k, active: {
            **decode.prefill(cfg, p, t, v, k, max_new, slots, rules), "done": ~active})
        step = jax.jit(lambda p, s: decode.decode(cfg, p, s, CHECK_EVERY, sampling, eos_ids, rules),
                       donate_argnums=1)
    return prefill, step, rows


def _global(sharding: jax.NamedSharding, array: np.ndarray) -> jax.Array:
    """The same host array on every process → one global array placed with `sharding`."""
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])


def _cut(text: str, stop: Sequence[str]) -> int | None:
    """Where the first of the `stop` strings starts in `text` (None: none does)."""
    found = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(found) if found else None


class Generator:
    """Prompts → continuations with a loaded model (see the module docstring)."""

    def __init__(self, model: LoadedModel, batch_size: int = 8):
        if batch_size <= 0:
            raise ConfigError(f"batch_size must be positive, got {batch_size}")
        self.model, self.batch_size = model, batch_size
        self.rules_key = tuple(sorted((k, tuple(v)) for k, v in model.rules.items()))

    def encode(self, prompt: str) -> list[int]:
        """The prompt's token ids as the model reads them (BOS if the model was loaded with one; an empty prompt
        with no BOS is the EOS token)."""
        tok = self.model.tokenizer
        ids = [int(i) for i in tok.encode(prompt).ids]
        if self.model.bos_id is not None:
            ids = [self.model.bos_id] + ids
        if not ids:
            if tok.eos_id is None:
                raise InputError(f"an empty prompt needs a token to start from, and tokenizer {tok.name!r} has neither "
                                 "BOS nor EOS: give a non-empty prompt")
            ids = [tok.eos_id]
        return ids

    def generate(self, prompts: Sequence[str], *, max_new_tokens: int, sampling: SamplingConfig = SamplingConfig(),
                 stop: Sequence[str] = (), seed: int = 0) -> list[Generation]:
        """One Generation per prompt, in order."""
        return self.generate_ids([self.encode(p) for p in prompts], max_new_tokens=max_new_tokens, sampling=sampling,
                                 stop=stop, seed=seed)

    def generate_ids(self, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                     sampling: SamplingConfig = SamplingConfig(), stop: Sequence[str] = (),
                     seed: int = 0) -> list[Generation]:
        """Like :meth:`generate`, from prompts already tokenized (each at least one id)."""
        if max_new_tokens <= 0:
            raise ConfigError(f"max_new_tokens must be positive, got {max_new_tokens}")
        if any(not p for p in prompts):
            raise InputError("every prompt needs at least one token")
        if any(not s for s in stop):
            raise ConfigError("stop strings must not be empty")
        order = sorted(range(len(prompts)), key=lambda i: (-len(prompts[i]), i))
        out: list[Generation | None] = [None] * len(prompts)
        base = jax.random.PRNGKey(seed)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            results = self._batch([prompts[i] for i in batch], batch, base, max_new_tokens, sampling, tuple(stop))
            for i, g in zip(batch, results):
                out[i] = g
        return out  # type: ignore[return-value]

    def _batch(self, prompts: list[Sequence[int]], indices: list[int], base: jax.Array, max_new: int,
               sampling: SamplingConfig, stop: tuple[str, ...]) -> list[Generation]:
        m, tok = self.model, self.model.tokenizer
        b = self.batch_size
        prompt_len = _round_up(max(map(len, prompts)), PAD_TO)
        slots = _round_up(prompt_len + max_new, PAD_TO)
        eos_ids = (tok.eos_id,) if tok.eos_id is not None else ()
        prefill, step, rows = _compiled(m.cfg, self.rules_key, m.mesh, b, prompt_len, slots, max_new, sampling,
                                        eos_ids)
        tokens = np.zeros((b, prompt_len), np.int32)
        valid = np.zeros((b, prompt_len), bool)
        for r, p in enumerate(prompts):
            tokens[r, prompt_len - len(p):] = p
            valid[r, prompt_len - len(p):] = True
        valid[len(prompts):, -1] = True  # rows that fill the batch read one token and take no more
        active = np.arange(b) < len(prompts)
        keys = np.asarray(jax.vmap(lambda i: jax.random.fold_in(base, i))(
            jnp.asarray(indices + [0] * (b - len(prompts)), jnp.int32)))
        replicated = jax.NamedSharding(m.mesh, jax.P())
        with jax.set_mesh(m.mesh):
            state = prefill(m.params, _global(rows, tokens), _global(rows, valid), _global(replicated, keys),
                            _global(replicated, active))
        while True:
            with jax.set_mesh(m.mesh):
                state = step(m.params, state)
            steps, done = int(mesh_lib.to_host(state["steps"])), mesh_lib.to_host(state["done"]).copy()
            if stop:
                generated, stopped = mesh_lib.to_host(state["tokens"])[:, :steps], False
                for r in np.flatnonzero(active & ~done):
                    if _cut(tok.decode_bytes(generated[r]).decode("utf-8", "ignore"), stop) is not None:
                        done[r] = stopped = True
                if stopped:
                    state["done"] = _global(state["done"].sharding, done)
            if steps >= max_new or done[active].all():
                break
        generated = mesh_lib.to_host(state["tokens"])[:, :steps]
        return [self._finish(generated[r], stop) for r in range(len(prompts))]

    def _finish(self, tokens: np.ndarray, stop: tuple[str, ...]) -> Generation:
        tok = self.model.tokenizer
        eos = np.flatnonzero(tokens == tok.eos_id) if tok.eos_id is not None else np.zeros(0, int)
        if len(eos):
            kept, finish = tokens[:eos[0] + 1], "eos"
            text = tok.decode_bytes(kept[:-1]).decode("utf-8", "replace")
        else:
            kept, finish = tokens, "length"
            text = tok.decode_bytes(kept).decode("utf-8", "replace")
        cut = _cut(text, stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        return Generation(text, tuple(int(t) for t in kept), finish)


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """The config's prompts, or its prompts_file's: one per line of a text file, the "prompt" of each line of a
    .jsonl file."""
    if cfg.prompts:
        return list(cfg.prompts)
    path = Path(cfg.prompts_file)
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix != ".jsonl":
        return lines
    prompts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            prompts.append(json.loads(line)["prompt"])
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}:{n}: expected a JSON object with a \"prompt\" string ({e})") from None
    return prompts


def main(cfg: GenerateConfig) -> list[Generation]:
    cfg.validate()
    prompts = read_prompts(cfg)
    if not prompts:
        raise InputError(f"no prompts in {cfg.prompts_file}")
    mesh_lib.initialize_distributed(cfg.mesh)
    mesh = mesh_lib.make_mesh(cfg.mesh)
    model = load_model(cfg.checkpoint, cfg.tokenizer, mesh, cfg.mesh.rules, param_dtype=cfg.param_dtype,
                       compute_dtype=cfg.compute_dtype, bos=cfg.bos,
                       allow_tokenizer_mismatch=cfg.allow_tokenizer_mismatch)
    generations = Generator(model, cfg.batch_size).generate(
        prompts, max_new_tokens=cfg.max_new_tokens, sampling=cfg.sampling, stop=cfg.stop, seed=cfg.seed)
    if jax.process_index() == 0:
        for prompt, g in zip(prompts, generations):
            print(f"--- {prompt!r} → ({g.finish}, {len(g.tokens)} tokens)\n{prompt}{g.text}")
        if cfg.output:
            lines = [json.dumps({"prompt": p, "text": g.text, "finish": g.finish, "tokens": list(g.tokens)},
                                ensure_ascii=False) for p, g in zip(prompts, generations)]
            Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(Path(cfg.output), "\n".join(lines) + "\n")
    return generations
