"""Generation: the KV-cache decoder against transformers' generate, sampling filters against a naive reference, and
the Generator's batching, stop strings, seeds and command line."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.config.schema import SamplingConfig
from fusion_jax.evaluate.generate import Generator
from fusion_jax.evaluate.model import LoadedModel
from fusion_jax.models import apply, decode, init_params, param_shardings
from fusion_jax.tokenizers import load_tokenizer

from tiny_tokenizers import train_byte_level

REPO = Path(__file__).resolve().parents[1]


def greedy_ids(cfg, params, prompts, max_new, eos_ids=()):
    """Our decoder, left-padded batch, greedy: the new tokens [B, max_new] and the state."""
    p = max(map(len, prompts))
    tokens = np.zeros((len(prompts), p), np.int32)
    valid = np.zeros((len(prompts), p), bool)
    for r, x in enumerate(prompts):
        tokens[r, p - len(x):], valid[r, p - len(x):] = x, True
    keys = jnp.zeros((len(prompts), 2), jnp.uint32)
    state = jax.jit(lambda pa, t, v, k: decode.prefill(cfg, pa, t, v, k, max_new, p + max_new))(params, tokens, valid, keys)
    state = jax.jit(lambda pa, s: decode.decode(cfg, pa, s, max_new, SamplingConfig(), eos_ids))(params, state)
    return np.asarray(state["tokens"]), state


# ------------------------------------------------------------------------------------------------ parity


@functools.cache
def _converted(name: str, root: str):
    from fusion_jax.convert import load
    from hf_models import build

    model = build(name)
    model.save_pretrained(f"{root}/{name}")
    cfg, params = load(f"{root}/{name}", compute_dtype="float32")
    return model, cfg, params


@pytest.fixture(scope="module")
def hf_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_generate"))


def _hf_archs():
    try:
        from hf_models import hf_configs

        return list(hf_configs())
    except ImportError:
        return []


@pytest.mark.parametrize("name", _hf_archs())
def test_greedy_matches_transformers_generate(name, hf_root):
    """Every family, prompts of different lengths decoded together (left padding), past Mistral's window (6): the
    same tokens as transformers' generate on each prompt alone."""
    torch = pytest.importorskip("torch")
    model, cfg, params = _converted(name, hf_root)
    rng = np.random.RandomState(3)
    prompts = [list(rng.randint(0, cfg.vocab_size, n)) for n in (5, 9, 2)]
    ours, _ = greedy_ids(cfg, params, prompts, max_new=12)
    for row, prompt in enumerate(prompts):
        with torch.inference_mode():
            out = model.generate(torch.as_tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
        np.testing.assert_array_equal(ours[row], out[0, len(prompt):].numpy(), err_msg=f"{name} prompt {row}")


def _tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                compute_dtype="float32", param_dtype="float32")
    return ModelConfig(**{**base, **kw})


@pytest.mark.parametrize("kw", [{}, {"position": "alibi", "norm": "layer"}, {"sliding_window": 4}],
                         ids=["rope", "alibi", "window"])
def test_cached_logits_equal_the_full_forward(kw):
    """Each step's logits from the cache equal the full forward's logits at that position (no transformers)."""
    cfg = _tiny_cfg(**kw)
    params = init_params(cfg, jax.random.key(0), std=0.3)
    prompts = [[5, 6, 7], [9, 10, 11, 12, 13, 14]]
    new, state = greedy_ids(cfg, params, prompts, max_new=6)
    for r, p in enumerate(prompts):
        seq = np.asarray(p + list(new[r]))[None]
        full = np.asarray(apply(cfg, params, seq))[0]
        np.testing.assert_array_equal(new[r], full[len(p) - 1:-1].argmax(-1))
        np.testing.assert_allclose(np.asarray(state["logits"])[r], full[-1], atol=1e-4)


def test_eos_ends_a_row_and_the_rest_are_zeros():
    cfg = _tiny_cfg()
    params = init_params(cfg, jax.random.key(1), std=0.3)
    free, _ = greedy_ids(cfg, params, [[1, 2, 3]], max_new=8)
    eos = int(free[0, 2])
    first = int(np.flatnonzero(free[0] == eos)[0])
    stopped, state = greedy_ids(cfg, params, [[1, 2, 3]], max_new=8, eos_ids=(eos,))
    np.testing.assert_array_equal(stopped[0, :first + 1], free[0, :first + 1])
    assert (stopped[0, first + 1:] == 0).all() and bool(state["done"][0])
    assert int(state["steps"]) == first + 1  # the loop stopped when every row was done


# ------------------------------------------------------------------------------------------------ sampling


def _naive_filter(logits: np.ndarray, s: SamplingConfig) -> np.ndarray:
    """Temperature, then top-k, then top-p over what top-k kept (transformers' order of its logits warpers)."""
    out = logits / s.temperature
    for row in out:
        order = np.argsort(-row, kind="stable")
        keep = np.zeros(len(row), bool)
        keep[order[:s.top_k or len(row)]] = True
        probs = np.where(keep[order], np.exp(row[order] - row[order].max()), 0.0)
        probs /= probs.sum()
        nucleus = np.searchsorted(np.cumsum(probs), s.top_p - 1e-7) + 1  # fewest tokens with mass >= top_p
        top_p_keep = np.zeros(len(row), bool)
        top_p_keep[order[:nucleus]] = True
        row[~(keep & top_p_keep)] = -np.inf
    return out


@pytest.mark.parametrize("s", [SamplingConfig(1.0, 5, 1.0), SamplingConfig(0.7, 0, 0.8), SamplingConfig(2.0, 10, 0.5),
                               SamplingConfig(1.0, 0, 0.01)])
def test_filter_logits_matches_a_naive_reference(s):
    logits = np.random.RandomState(0).normal(size=(4, 50)).astype(np.float32) * 3
    np.testing.assert_allclose(np.asarray(decode.filter_logits(jnp.asarray(logits), s)), _naive_filter(logits.copy(), s),
                               rtol=1e-6)


def test_sampling_frequencies_follow_the_filtered_distribution():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    s = SamplingConfig(temperature=1.0, top_p=0.75)  # keeps 0.5 and 0.3 (0.5 alone is short of 0.75)
    keys = jnp.zeros((1, 2), jnp.uint32)
    draws = np.asarray(jax.vmap(lambda i: decode.sample(logits, keys, i, s))(jnp.arange(4000)))[:, 0]
    counts = np.bincount(draws, minlength=4) / len(draws)
    assert counts[2] == counts[3] == 0
    assert abs(counts[0] - 0.5 / 0.8) < 0.03


# ------------------------------------------------------------------------------------------------ the Generator


@pytest.fixture(scope="module")
def generator_setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    tok = load_tokenizer(train_byte_level(root / "tok.json"))
    cfg = _tiny_cfg(vocab_size=tok.vocab_size)
    params = init_params(cfg, jax.random.key(2), std=0.5)
    mesh_cfg = mesh_lib.MeshConfig()
    mesh = mesh_lib.make_mesh(mesh_cfg)
    sharded = jax.device_put(params, param_shardings(cfg, mesh, mesh_cfg.rules))
    return LoadedModel("tiny", cfg, sharded, tok, None, mesh, mesh_cfg.rules), params


def test_generator_greedy_is_independent_of_the_batch(generator_setup):
    model, _ = generator_setup
    prompts = ["the cat", "a", "", "hello world, the quick brown fox"]
    together = Generator(model, batch_size=8).generate(prompts, max_new_tokens=20)
    alone = [Generator(model, batch_size=1).generate([p], max_new_tokens=20)[0] for p in prompts]
    assert together == alone
    assert all(g.finish in ("eos", "length") for g in together)
    assert {len(g.tokens) for g in together if g.finish == "length"} <= {20}


def test_generator_text_equals_the_tokens_decoded(generator_setup):
    model, params = generator_setup
    g = Generator(model, batch_size=2).generate(["the cat"], max_new_tokens=10)[0]
    tok = model.tokenizer
    kept = [t for t in g.tokens if t != tok.eos_id]
    assert g.text == tok.decode_bytes(kept).decode("utf-8", "replace")
    ids, _ = greedy_ids(model.cfg, params, [list(tok.encode("the cat").ids)], max_new=10, eos_ids=(tok.eos_id,))
    assert list(g.tokens) == list(ids[0, :len(g.tokens)])


def test_stop_strings_cut_the_text(generator_setup):
    model, _ = generator_setup
    free = Generator(model, batch_size=2).generate(["the"], max_new_tokens=40)[0]
    if len(free.text) < 6:
        pytest.skip("the random model ended too early to pick a stop string")
    stop = free.text[3:5]
    cut = Generator(model, batch_size=2).generate(["the"], max_new_tokens=40, stop=[stop, "never there"])[0]
    assert cut.finish == "stop" and cut.text == free.text[:free.text.find(stop)]


def test_sampling_is_reproducible_from_the_seed(generator_setup):
    model, _ = generator_setup
    s = SamplingConfig(temperature=1.0, top_k=50, top_p=0.95)
    prompts = ["the cat", "a dog", "x"]
    a = Generator(model, batch_size=4).generate(prompts, max_new_tokens=16, sampling=s, seed=7)
    b = Generator(model, batch_size=1).generate(prompts, max_new_tokens=16, sampling=s, seed=7)
    c = Generator(model, batch_size=4).generate(prompts, max_new_tokens=16, sampling=s, seed=8)
    assert a == b and a != c


def test_generate_command_writes_jsonl(tmp_path, generator_setup):
    from fusion_jax.convert import checkpoint

    model, params = generator_setup
    ckpt = tmp_path / "ckpt"
    (tmp_path / "tok").mkdir()
    train_byte_level(tmp_path / "tok" / "tokenizer.json")
    checkpoint.save(ckpt, model.cfg, params, model_type="llama", hf_config={}, tokenizer_dir=tmp_path / "tok")
    (tmp_path / "prompts.txt").write_text("the cat\nhello\n")
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "fusion_jax.generate", "--set", f"checkpoint={ckpt}", "--set",
                        f"prompts_file={tmp_path / 'prompts.txt'}", "--set", "max_new_tokens=8", "--set",
                        f"output={out}", "--set", "compute_dtype=float32", "--set", "param_dtype=float32"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == ["the cat", "hello"]
    direct = Generator(model, batch_size=8).generate(["the cat", "hello"], max_new_tokens=8)
    assert [row["text"] for row in rows] == [g.text for g in direct]
    r = subprocess.run([sys.executable, "-m", "fusion_jax.generate", "--set", f"checkpoint={ckpt}"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 1 and "give exactly one of prompts" in r.stderr
