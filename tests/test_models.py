"""Parity of our decoder family with transformers' PyTorch models: per module, end to end, packed, sharded."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fusion_jax import mesh as mesh_lib  # noqa: E402
from fusion_jax.convert import load  # noqa: E402
from fusion_jax.models import apply, decoder, layers  # noqa: E402
from fusion_jax.config.model import ModelConfig  # noqa: E402

from hf_models import VOCAB, build, hf_configs, torch_logits  # noqa: E402

ARCHS = list(hf_configs())


@functools.cache
def converted(name: str, tmp_root: str):
    model = build(name)
    path = f"{tmp_root}/{name}"
    model.save_pretrained(path)
    cfg, params = load(path, compute_dtype="float32")
    return model, cfg, params


@pytest.fixture(scope="module")
def tmp_root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf"))


def tokens(batch: int, length: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, VOCAB, (batch, length))


@functools.cache
def jitted(cfg: ModelConfig):
    return jax.jit(lambda p, t, s: apply(cfg, p, t, s))


@pytest.mark.parametrize("name", ARCHS)
def test_logits_match_transformers(name, tmp_root):
    model, cfg, params = converted(name, tmp_root)
    t = tokens(2, 16)
    ours = np.asarray(jitted(cfg)(params, t, None))
    np.testing.assert_allclose(ours, torch_logits(model, t), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ARCHS)
def test_packed_segments_match_separate_runs(name, tmp_root):
    """Three documents packed into two rows (plus padding) give the logits of running each document alone."""
    model, cfg, params = converted(name, tmp_root)
    docs = [tokens(1, n, seed=n)[0] for n in (7, 9, 10)]
    packed = np.zeros((2, 16), np.int64)
    segments = np.zeros((2, 16), np.int32)
    packed[0, :7], packed[0, 7:16] = docs[0], docs[1]
    segments[0, :7], segments[0, 7:16] = 1, 2
    packed[1, :10], segments[1, :10] = docs[2], 1  # the rest of row 1 is padding (segment 0)
    ours = np.asarray(jitted(cfg)(params, packed, segments))
    for row, start, doc in ((0, 0, docs[0]), (0, 7, docs[1]), (1, 0, docs[2])):
        ref = torch_logits(model, doc[None])[0]
        np.testing.assert_allclose(ours[row, start : start + len(doc)], ref, atol=1e-4, rtol=0)
    assert np.isfinite(ours).all()


def test_sliding_window_is_applied(tmp_root):
    """Mistral's window (6) changes logits beyond it; without the window they would differ from transformers."""
    model, cfg, params = converted("mistral", tmp_root)
    t = tokens(1, 16)
    windowless = ModelConfig(**{**cfg.__dict__, "sliding_window": None})
    ours_full = np.asarray(jitted(windowless)(params, t, None))
    ref = torch_logits(model, t)
    assert np.abs(ours_full[:, 10:] - ref[:, 10:]).max() > 1e-3
    np.testing.assert_allclose(ours_full[:, :6], ref[:, :6], atol=1e-4, rtol=0)


def _hf_layer(model, name):
    if name.startswith("gpt_neox"):
        return model.gpt_neox.layers[0], model.gpt_neox.rotary_emb
    if name == "mpt":
        return model.transformer.blocks[0], None
    return model.model.layers[0], model.model.rotary_emb


def _layer0(params):
    return jax.tree.map(lambda x: x[0], params["layers"])


@pytest.mark.parametrize("name", ARCHS)
def test_per_module_parity(name, tmp_root):
    """Norm, MLP and attention of layer 0 each equal the transformers module on the same input."""
    model, cfg, params = converted(name, tmp_root)
    hf_layer, rotary = _hf_layer(model, name)
    p = _layer0(params)
    x = np.random.RandomState(1).normal(size=(2, 12, cfg.hidden_size)).astype(np.float32)
    xt = torch.as_tensor(x)
    hf_norm = hf_layer.norm_1 if name == "mpt" else hf_layer.input_layernorm
    hf_mlp = (lambda h: hf_layer.ffn(h, torch.zeros_like(h))) if name == "mpt" else hf_layer.mlp

    seg = jnp.ones((2, 12), jnp.int32)
    positions = decoder.segment_positions(seg)
    mask = layers.attention_mask(cfg, seg)
    rope = layers.rope_cos_sin(cfg, positions) if cfg.position == "rope" else None
    causal = torch.as_tensor(np.array(mask))
    with torch.inference_mode():
        ref_norm = hf_norm(xt).numpy()
        ref_mlp = hf_mlp(xt).numpy()
        if name == "mpt":
            alibi = model.transformer.build_mpt_alibi_tensor(cfg.num_heads, 12)
            ref_attn = hf_layer.attn(xt, position_bias=alibi, attention_mask=~causal)[0].numpy()
        else:
            additive = torch.where(causal, 0.0, torch.finfo(torch.float32).min)
            emb = rotary(xt, torch.as_tensor(np.array(positions)))
            attn = hf_layer.attention if name.startswith("gpt_neox") else hf_layer.self_attn
            ref_attn = attn(xt, attention_mask=additive, position_embeddings=emb)[0].numpy()
    np.testing.assert_allclose(layers.norm(cfg, p["attn_norm"], x), ref_norm, atol=1e-5, rtol=0)
    np.testing.assert_allclose(layers.mlp(cfg, p["mlp"], x), ref_mlp, atol=1e-5, rtol=0)
    np.testing.assert_allclose(layers.attention(cfg, p["attn"], x, mask, rope, positions), ref_attn, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 4, 1), (2, 2, 2)], ids=["data2-fsdp4", "data2-fsdp2-tensor2"])
@pytest.mark.parametrize("name", ["llama", "gpt_neox", "mpt"])
def test_sharded_forward_equals_single_device(name, shape, tmp_root):
    _, cfg, params = converted(name, tmp_root)
    mesh_cfg = mesh_lib.MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2])
    mesh = mesh_lib.make_mesh(mesh_cfg)
    sharded = jax.device_put(params, decoder.param_shardings(cfg, mesh, mesh_cfg.rules))
    assert len(sharded["embed"].sharding.device_set) == 8 and not sharded["embed"].sharding.is_fully_replicated
    t = np.tile(tokens(2, 16), (4, 1))  # batch 8 divides the (data, fsdp) batch sharding
    seg = np.ones_like(t, np.int32)
    single = np.asarray(jitted(cfg)(jax.device_put(params, jax.devices()[0]), t, seg))
    with jax.set_mesh(mesh):
        fn = jax.jit(lambda p, t, s: apply(cfg, p, t, s, rules=mesh_cfg.rules))
        out = fn(sharded, t, seg)
    assert not out.sharding.is_fully_replicated  # activations really were split over the batch
    np.testing.assert_allclose(np.asarray(out), single, atol=1e-5, rtol=0)


def test_init_sharded_never_whole_on_one_device():
    cfg = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=3, num_heads=4, num_kv_heads=2)
    mesh_cfg = mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2)
    params = decoder.init_sharded(cfg, jax.random.key(0), mesh_lib.make_mesh(mesh_cfg), mesh_cfg.rules)
    q = params["layers"]["attn"]["q"]
    assert q.shape == (3, 64, 4, 16)
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    assert q.addressable_shards[0].data.shape == (3, 16, 2, 16)
    assert params["embed"].addressable_shards[0].data.shape == (64, 16)
    abstract = decoder.abstract_params(cfg)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, params)


@pytest.mark.parametrize("policy", ["full", "dots", "dots_no_batch"])
def test_remat_policies_keep_values_and_gradients(policy):
    base = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2,
                       compute_dtype="float32")
    params = decoder.init_params(base, jax.random.key(0))
    t = tokens(2, 8)

    def loss(cfg, p):
        return jnp.mean(jax.nn.log_softmax(apply(cfg, p, t))[..., 0])

    ref_val, ref_grad = jax.jit(jax.value_and_grad(functools.partial(loss, base)))(params)
    remat = ModelConfig(**{**base.__dict__, "remat": policy})
    val, grad = jax.jit(jax.value_and_grad(functools.partial(loss, remat)))(params)
    np.testing.assert_allclose(val, ref_val, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), grad, ref_grad)


def test_bf16_compute_stays_close_to_fp32(tmp_root):
    _, cfg, params = converted("llama", tmp_root)
    t = tokens(2, 16)
    fp32 = np.asarray(jitted(cfg)(params, t, None))
    bf16_cfg = ModelConfig(**{**cfg.__dict__, "compute_dtype": "bfloat16"})
    bf16 = jitted(bf16_cfg)(params, t, None)
    assert bf16.dtype == jnp.float32  # logits accumulate in fp32 whatever the compute dtype
    assert np.abs(np.asarray(bf16) - fp32).max() < 0.05 * np.abs(fp32).max()


def test_segment_positions_restart_per_document():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(decoder.segment_positions(seg), [[0, 1, 2, 0, 1, 0, 0, 1]])


def test_alibi_slopes_match_mpt_for_non_power_of_two_heads():
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    ref = build_mpt_alibi_tensor(6, 4, 8).numpy()[:, 0, -2]  # slope × (−1) at distance one
    np.testing.assert_allclose(-layers.alibi_slopes(6, 8.0), ref, rtol=1e-6)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="num_heads=6 must be a multiple of num_kv_heads=4"):
        ModelConfig(num_heads=6, num_kv_heads=4, hidden_size=48).validate()
    with pytest.raises(ValueError, match="hidden_size=50 is not divisible by num_heads=4"):
        ModelConfig(hidden_size=50).validate()
