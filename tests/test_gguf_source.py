"""A .gguf file used directly where a model directory is: a run's source, `capture`'s source and `evaluate`'s
checkpoint, its tokenizer rebuilt from the GGUF metadata (fusion_jax.tokenizers.gguf) — the same cache bytes and bits
per byte as the model converted to a fusion_jax directory.

The GGUF (tests/tiny_gguf.py) is a tiny random llama written as llama.cpp does, with a byte-level BPE vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("gguf")

from fusion_jax.cli.convert import parse, run  # noqa: E402
from fusion_jax.config import schema  # noqa: E402
from fusion_jax.convert import checkpoint  # noqa: E402
from fusion_jax.data import capture  # noqa: E402
from fusion_jax.data.capture import CaptureConfig  # noqa: E402
from fusion_jax.data.corpus import Document  # noqa: E402
from fusion_jax.data.documents import write_documents  # noqa: E402
from fusion_jax.errors import CheckpointError  # noqa: E402
from fusion_jax.evaluate import bpb  # noqa: E402
from fusion_jax.experiments import run as experiment  # noqa: E402
from fusion_jax.mesh import MeshConfig  # noqa: E402
from fusion_jax.tokenizers import load_tokenizer  # noqa: E402
from test_train import assets, config  # noqa: E402,F401
from tiny_gguf import gpt2_vocab, write_gguf  # noqa: E402
from tiny_tokenizers import train_byte_level  # noqa: E402

TEXTS = ["the quick brown fox jumps over the lazy dog", "hello world, hello there", "café naïve résumé — déjà vu",
         "numbers 0123456789 and tabs\tand newlines\n\nend", "def f(x):\n    return [x,  x]\n", "x"]
MESH = MeshConfig(data=2, fsdp=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{"gguf": tiny.gguf, "dir": the same model converted to a fusion_jax directory, "docs": a document store}."""
    root = tmp_path_factory.mktemp("gguf_source")
    vocab, _ = gpt2_vocab(root, vocab_size=300)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=len(vocab.tokens), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2, max_position_embeddings=128)).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    path = write_gguf(root / "tiny.gguf", model, "llama", vocab=vocab)
    run(parse([str(path), str(root / "converted")]))
    docs = [Document(f"d{i}", t, "prose") for i, t in enumerate(TEXTS)]
    write_documents(root / "docs", docs, docs[:3], {"test": True})
    return {"gguf": path, "dir": root / "converted", "docs": root / "docs"}


def test_the_gguf_is_its_own_tokenizer_cached_and_checked(models, tmp_path):
    tok = load_tokenizer(models["gguf"])
    assert tok.name == "tiny" and tok is load_tokenizer(models["gguf"])  # rebuilt once per (path, size, mtime)
    assert tok.fingerprint == load_tokenizer(models["dir"]).fingerprint
    assert checkpoint.own_tokenizer(models["gguf"])["fingerprint"] == tok.fingerprint
    checkpoint.check_tokenizer(models["gguf"], tokenizer_path=models["dir"])  # the same tokenizer: accepted
    other = tmp_path / "other"
    other.mkdir()
    train_byte_level(other / "tokenizer.json")
    with pytest.raises(CheckpointError, match="is not the tokenizer"):
        checkpoint.check_tokenizer(models["gguf"], tokenizer_path=other)
    bos = bpb.bos_token_id(models["gguf"], tok)  # from tokenizer.ggml.bos_token_id
    assert bos == tok.eos_id and bos == bpb.bos_token_id(models["dir"], load_tokenizer(models["dir"]))


def _capture(models, source: Path, out: Path) -> dict:
    return capture.main(CaptureConfig(documents=str(models["docs"]), source=str(source), output=str(out), k=4,
                                      seq_len=64, batch_size=8, docs_per_shard=2, logits_chunk=16,
                                      param_dtype="float32", compute_dtype="float32", mesh=MESH))


def test_capture_of_the_gguf_equals_the_converted_directory(models, tmp_path):
    a, b = tmp_path / "from_gguf", tmp_path / "from_dir"
    _capture(models, models["gguf"], a)
    _capture(models, models["dir"], b)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file()) and len(files) > 2
    for f in files:
        if f.suffix == ".array_record" or f.name.startswith("shard-"):  # the records and their sidecars
            assert (a / f).read_bytes() == (b / f).read_bytes(), f
    for name in ("capture.json", "manifest.json"):  # differ only in what names the source model and its tokenizer
        ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
        assert {k for k in ma.keys() | mb.keys() if ma.get(k) != mb.get(k)} <= {"model", "tokenizer_name"}, name
        assert ma["tokenizer"] == mb["tokenizer"] and ma["model"]["name"] == "tiny.gguf"


@pytest.mark.parametrize("bos", [False, True])
def test_evaluate_of_the_gguf_equals_the_converted_directory(models, bos):
    def score(ckpt: Path) -> dict:
        return bpb.main(bpb.EvaluateConfig(checkpoint=str(ckpt), documents=str(models["docs"]), bos=bos, batch_size=4,
                                           seq_len=64, logits_chunk=16, param_dtype="float32",
                                           compute_dtype="float32", mesh=MESH))

    got, want = score(models["gguf"]), score(models["dir"])
    assert got["bits_per_byte"] == pytest.approx(want["bits_per_byte"], rel=1e-6) and got["tokens"] == want["tokens"]


def test_a_run_with_a_gguf_source_runs_to_the_end(assets, models, tmp_path):  # noqa: F811
    cfg = config(assets, tmp_path / "run", sources=(schema.TeacherConfig(name="gguf", checkpoint=str(models["gguf"])),))
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, export=False))
    report = experiment.main(cfg)
    assert report["steps"] == 2 and set(report["train"]["win_rate"]) == {"target", "gguf"}
    assert (tmp_path / "run" / "cache" / "gguf" / "train" / "manifest.json").is_file()


def test_a_run_with_a_gguf_target_trains_and_exports(assets, models, tmp_path):  # noqa: F811
    """The GGUF as the target (and teacher 0): trained from its dequantized weights, exported as a Hugging Face
    checkpoint with the tokenizer rebuilt from the metadata, which transformers loads."""
    cfg = config(assets, tmp_path / "run", target=str(models["gguf"]))
    report = experiment.main(cfg)
    assert report["steps"] == 2 and set(report["train"]["win_rate"]) == {"target", "src"}
    export = tmp_path / "run" / "export"
    tok = load_tokenizer(export)
    assert tok.fingerprint == load_tokenizer(models["gguf"]).fingerprint
    model = transformers.AutoModelForCausalLM.from_pretrained(export)
    assert model.config.vocab_size == tok.vocab_size
