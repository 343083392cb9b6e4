"""Hugging Face checkpoints: read tensor by tensor into sharded params, and write params back out.

Reading checks every name, shape and dtype against the architecture from the safetensors headers before any
tensor data is read, then builds each param with `jax.make_array_from_callback`, so a host reads only the layers
and slices its own devices hold.
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from fusion_jax import mesh as mesh_lib
from fusion_jax.config.model import ModelConfig
from fusion_jax.convert.architectures import HF_CLASSES, TensorGroup, architecture
from fusion_jax.errors import CheckpointError
from fusion_jax.files import read_json
from fusion_jax.models import decoder

FLOAT_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}  # safetensors → param_dtype
# Buffers some checkpoints carry that are recomputed, not learned.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "attention.bias", "attention.masked_bias")
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
    "merges.txt", "added_tokens.json", "generation_config.json",
)
REDOWNLOAD = "download the model again, or save it again with transformers (model.save_pretrained)"


class HFCheckpoint:
    """A Hugging Face model directory: config.json plus model.safetensors or a sharded index."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path} is not a directory")
        config = self.path / "config.json"
        if not config.exists():
            raise CheckpointError(f"{self.path} is not a Hugging Face checkpoint: it has no config.json")
        self.config = read_json(config, CheckpointError, REDOWNLOAD)
        if not isinstance(self.config, dict):
            raise CheckpointError(f"{config}: expected a JSON object, got {type(self.config).__name__}; {REDOWNLOAD}")
        self._handles: dict[str, object] = {}
        index = self.path / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index, CheckpointError, REDOWNLOAD)
            weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
            if not isinstance(weight_map, dict):
                raise CheckpointError(f"{index}: has no weight_map; {REDOWNLOAD}")
        elif (self.path / "model.safetensors").exists():
            weight_map = {k: "model.safetensors" for k in self._file("model.safetensors").keys()}
        elif any(self.path.glob("*.bin")):
            raise CheckpointError(
                f"{self.path} holds PyTorch .bin weights only; re-save it as safetensors "
                "(transformers: model.save_pretrained(dir, safe_serialization=True))"
            )
        else:
            raise CheckpointError(f"{self.path} has config.json but no model.safetensors or model.safetensors.index.json")
        missing_files = sorted({f for f in weight_map.values() if not (self.path / f).exists()})
        if missing_files:
            raise CheckpointError(f"{self.path}: the index names shard files that are missing: {missing_files}")
        self.weight_map: dict[str, str] = weight_map

    @property
    def model_type(self) -> str:
        if "model_type" not in self.config:
            raise CheckpointError(f"{self.path}/config.json has no model_type")
        return self.config["model_type"]

    def _file(self, name: str):
        # One open handle per shard file for the life of this checkpoint object (not a class-wide cache).
        if name not in self._handles:
            try:
                self._handles[name] = safe_open(self.path / name, "np")
            except SafetensorError as e:  # a truncated file or a damaged header: the library does not name the file
                raise CheckpointError(f"{self.path / name}: cannot be read as safetensors ({e}): the file is "
                                      f"truncated or corrupted; {REDOWNLOAD}") from None
        return self._handles[name]

    def header(self, name: str) -> tuple[tuple[int, ...], str]:
        try:
            sl = self._file(self.weight_map[name]).get_slice(name)
        except SafetensorError as e:  # the index names a tensor that its shard file does not hold
            raise CheckpointError(f"{self.path / self.weight_map[name]}: no tensor {name} ({e}), although "
                                  f"model.safetensors.index.json says so; {REDOWNLOAD}") from None
        return tuple(sl.get_shape()), sl.get_dtype()

    def dtype(self) -> str:
        """The param_dtype that keeps the stored weights as they are (float32 when they mix dtypes)."""
        found = {self.header(n)[1] for n in self.weight_map if not n.endswith(IGNORED_SUFFIXES)}
        return FLOAT_DTYPES[found.pop()] if len(found) == 1 and found <= FLOAT_DTYPES.keys() else "float32"

    def read(self, name: str) -> np.ndarray:
        try:
            return self._file(self.weight_map[name]).get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{self.path / self.weight_map[name]}: tensor {name} cannot be read ({e}); "
                                  f"{REDOWNLOAD}") from None


def _layer_names(group: TensorGroup, layer: int | None) -> list[str]:
    return [n.format(i=layer) for n in group.hf] if group.layered else list(group.hf)


def _our_layer_shapes(specs: dict, group: TensorGroup) -> list[tuple[int, ...]]:
    shapes = []
    for path in group.ours:
        spec = functools.reduce(lambda d, k: d[k], path, specs)
        shapes.append(spec.shape[1:] if group.layered else spec.shape)
    return shapes


def check_tensors(ckpt: HFCheckpoint, cfg: ModelConfig, groups: list[TensorGroup]) -> None:
    """Missing, unexpected, mis-shaped or non-float tensors: one error naming them all."""
    specs = decoder.param_specs(cfg)
    expected: dict[str, tuple[int, ...]] = {}
    for g in groups:
        dummies = [np.empty(s, np.int8) for s in _our_layer_shapes(specs, g)]
        hf_shapes = [a.shape for a in g.to_hf(dummies)]
        for layer in range(cfg.num_layers) if g.layered else [None]:
            expected.update(zip(_layer_names(g, layer), hf_shapes))
    present = set(ckpt.weight_map)
    problems = []
    missing = sorted(set(expected) - present)
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    ignorable = lambda n: n.endswith(IGNORED_SUFFIXES) or (cfg.tie_embeddings and n in ("lm_head.weight", "embed_out.weight"))
    unexpected = sorted(n for n in present - set(expected) if not ignorable(n))
    if unexpected:
        problems.append(
            f"unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}"
        )
    for name in sorted(set(expected) & present):
        shape, dtype = ckpt.header(name)
        if shape != tuple(expected[name]):
            problems.append(f"{name} has shape {list(shape)} but config.json implies {list(expected[name])}")
        if dtype not in FLOAT_DTYPES:
            problems.append(f"{name} has dtype {dtype}; expected one of {sorted(FLOAT_DTYPES)}")
    if problems:
        raise CheckpointError(f"{ckpt.path} does not match its {ckpt.model_type} config (restore "
                              f"{ckpt.path}/config.json if it was edited, or {REDOWNLOAD}): " + "; ".join(problems))


def _load_group(ckpt: HFCheckpoint, cfg: ModelConfig, g: TensorGroup, our_shapes, shardings, dtype) -> list[jax.Array]:
    """The params of one group, each HF tensor read once: every layer is converted once and its slices are
    copied into the buffers of the local devices that hold them."""
    layers = range(cfg.num_layers) if g.layered else [None]
    full_shapes = [((cfg.num_layers, *s) if g.layered else s) for s in our_shapes]
    # One buffer per distinct index (replicas share it), only for this host's devices.
    device_index = [sh.addressable_devices_indices_map(shape) for sh, shape in zip(shardings, full_shapes)]
    buffers = []
    for shape, indices in zip(full_shapes, device_index):
        by_index = {}
        for index in indices.values():
            key = tuple((sl.start, sl.stop) for sl in index)
            if key not in by_index:
                by_index[key] = (index, np.empty([len(range(n)[sl]) for n, sl in zip(shape, index)], dtype))
        buffers.append(by_index)
    for layer in layers:
        ours = g.to_ours([ckpt.read(n) for n in _layer_names(g, layer)], our_shapes)
        for arr, by_index in zip(ours, buffers):
            for index, buf in by_index.values():
                if layer is None:
                    buf[...] = arr[index]
                elif layer in range(cfg.num_layers)[index[0]]:
                    buf[layer - (index[0].start or 0)] = arr[index[1:]]
    out = []
    for sharding, shape, indices, by_index in zip(shardings, full_shapes, device_index, buffers):
        shards = [
            jax.device_put(by_index[tuple((sl.start, sl.stop) for sl in index)][1], device)
            for device, index in indices.items()
        ]
        out.append(jax.make_array_from_single_device_arrays(shape, sharding, shards))
    return out


def tensor_namer(model_type: str, cfg: ModelConfig):
    """(our param path, layer) → the name a user knows: ours plus the Hugging Face tensors it is read from."""
    by_path = {path: g for g in architecture(model_type).groups(cfg) for path in g.ours}

    def name(path: tuple[str, ...], layer: int | None) -> str:
        ours = ".".join(path) + ("" if layer is None else f" layer {layer}")
        g = by_path.get(path)
        return f"{ours} (from {', '.join(_layer_names(g, layer))})" if g is not None else ours

    return name


def load_hf_params(ckpt: HFCheckpoint, cfg: ModelConfig, shardings) -> dict:
    """Read `ckpt` into params of `cfg` (dtype cfg.param_dtype) placed with the `shardings` tree.

    Each host reads only the slices its devices hold; each HF tensor is read once.
    """
    groups = architecture(ckpt.model_type).groups(cfg)
    check_tensors(ckpt, cfg, groups)
    specs = decoder.param_specs(cfg)
    dtype = jnp.dtype(cfg.param_dtype)
    params: dict = {}
    for g in groups:
        group_shardings = [functools.reduce(lambda d, k: d[k], path, shardings) for path in g.ours]
        arrays = _load_group(ckpt, cfg, g, _our_layer_shapes(specs, g), group_shardings, dtype)
        for path, leaf in zip(g.ours, arrays):
            node = params
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = leaf
    return params


def hf_config(cfg: ModelConfig, model_type: str, base: dict | None = None) -> dict:
    """config.json for `cfg`: the original HF config (ids, names, extras) updated with our architecture fields."""
    out = {k: v for k, v in (base or {}).items() if k not in ("rope_scaling", "rope_theta", "rotary_pct", "rotary_emb_base")}
    out.update(architecture(model_type).config_to_hf(cfg))
    out.update(model_type=model_type, architectures=[HF_CLASSES[model_type]], dtype=cfg.param_dtype)
    return out


def write_hf_dir(
    out: Path, cfg: ModelConfig, params: dict, model_type: str, base_config: dict | None, max_shard_bytes: int
) -> None:
    """Write safetensors shards (+ index when more than one) and config.json into the existing directory `out`.

    Tensors stream to disk a shard at a time. Multi-host: every process gathers; process 0 writes.
    """
    writer = jax.process_index() == 0
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str], int]] = []  # (file, tensor names, bytes)

    def flush():
        if shard:
            name = f"part-{len(written):05d}.safetensors"
            if writer:
                save_file(shard, str(out / name), metadata={"format": "pt"})
            written.append((name, list(shard), sum(a.nbytes for a in shard.values())))
            shard.clear()

    for g in architecture(model_type).groups(cfg):
        for layer in range(cfg.num_layers) if g.layered else [None]:
            ours = []
            for path in g.ours:
                x = functools.reduce(lambda d, k: d[k], path, params)
                ours.append(mesh_lib.to_host(x[layer] if g.layered else x))
            for name, arr in zip(_layer_names(g, layer), g.to_hf(ours)):
                arr = np.ascontiguousarray(arr)
                if shard and sum(a.nbytes for a in shard.values()) + arr.nbytes > max_shard_bytes:
                    flush()
                shard[name] = arr
    flush()
    if not writer:
        return
    n = len(written)
    final = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for (tmp, _, _), name in zip(written, final):
        os.replace(out / tmp, out / name)
    if n > 1:
        index = {
            "metadata": {"total_size": sum(b for _, _, b in written)},
            "weight_map": {t: name for (_, tensors, _), name in zip(written, final) for t in tensors},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (out / "config.json").write_text(json.dumps(hf_config(cfg, model_type, base_config), indent=2))
