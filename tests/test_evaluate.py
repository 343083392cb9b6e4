"""Bits per byte: evaluate_bpb equals a naive per-document reference and transformers' PyTorch model on the HF export,
on 8 devices and on 1, with long documents windowed, from a store or a corpus, in two processes through the CLI,
and with clear errors."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from fusion_jax.evaluate import bpb as evaluate
from fusion_jax.convert import checkpoint
from fusion_jax.convert.hf import CheckpointError
from fusion_jax.data.corpus import CorpusConfig, Document
from fusion_jax.data.documents import DocumentStore, write_documents
from fusion_jax.evaluate.bpb import EvaluateConfig, evaluate_bpb, windows
from fusion_jax.mesh import MeshConfig, make_mesh
from fusion_jax.config.schema import DEFAULT_RULES
from fusion_jax.models import apply, decoder
from fusion_jax.config.model import ModelConfig
from fusion_jax.tokenizers import VocabSizeError, load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

ROOT = Path(__file__).resolve().parents[1]
LONG = "the quick brown fox jumps over the lazy dog; " * 3 + "fusion of large language models by distillation"
DOCS = [
    Document("a0", "the quick brown fox jumps over the lazy dog", "prose"),
    Document("a1", "hello world, hello there", "prose"),
    Document("b0", "café naïve résumé — déjà vu", "unicode"),
    Document("a2", "numbers 0123456789 and tabs\tand newlines\n\nend", "prose"),
    Document("b1", "ünïcödé text with emoji 😀 in it", "unicode"),
    Document("c0", "x", "tiny"),
    Document("a3", "fusion of large language models", "prose"),
    Document("a4", LONG, "prose"),
]
SEQ = 128  # every document (+EOS) fits


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    tok_dir = root / "tok"
    tok_dir.mkdir()
    train_byte_level(tok_dir / "tokenizer.json")
    tok = load_tokenizer(tok_dir)
    write_documents(root / "docs", DOCS[:2], DOCS, {"test": True})
    cfg = ModelConfig(vocab_size=tok.vocab_size + 4, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                      num_kv_heads=2, compute_dtype="float32")
    params = decoder.init_params(cfg, jax.random.key(0), std=0.3)
    checkpoint.save(root / "model", cfg, params, model_type="llama", tokenizer_dir=tok_dir)
    mesh = make_mesh(MeshConfig(data=2, fsdp=4))
    _, sharded = checkpoint.load(root / "model", mesh, DEFAULT_RULES)
    result = evaluate_bpb(cfg, sharded, tok, DocumentStore(root / "docs", "validation"), mesh=mesh,
                          rules=DEFAULT_RULES, batch_size=4, seq_len=SEQ, chunk=16)
    return {"root": root, "tok_dir": tok_dir, "tok": tok, "cfg": cfg, "params": params, "mesh": mesh,
            "sharded": sharded, "result": result}


def doc_ids(tok, text: str, eos: bool = True, bos: int | None = None) -> np.ndarray:
    ids = list(tok.encode(text).ids)
    return np.asarray(([bos] if bos is not None else []) + ids + ([tok.eos_id] if eos else []), np.int32)


_log_softmax = jax.jit(lambda cfg, params, tokens: jax.nn.log_softmax(apply(cfg, params, tokens), axis=-1),
                       static_argnums=0)


def naive_logp(cfg, params, ids: np.ndarray) -> np.ndarray:
    """log_softmax of the model over one sequence fed alone (right-padded to one of two lengths: causal attention
    keeps the padding out, and only two shapes compile)."""
    padded = np.zeros(8 if len(ids) <= 8 else SEQ, np.int32)
    padded[:len(ids)] = ids
    return np.asarray(_log_softmax(cfg, params, padded[None]), np.float64)[0, :len(ids)]


def naive_ce(cfg, params, ids: np.ndarray) -> float:
    """Sum of −log p(next token) over one sequence fed alone."""
    logp = naive_logp(cfg, params, ids)
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())


def naive_report(setup, docs=DOCS, **kw) -> dict:
    out: dict[str, dict] = {}
    for d in docs:
        ids = doc_ids(setup["tok"], d.text, **kw)
        r = out.setdefault(d.domain, {"ce": 0.0, "tokens": 0, "bytes": 0, "documents": 0})
        r["ce"] += naive_ce(setup["cfg"], setup["params"], ids)
        r["tokens"] += len(ids) - 1
        r["bytes"] += len(d.text.encode())
        r["documents"] += 1
    return out


def assert_matches(result: dict, ref: dict, rtol: float = 2e-5):
    assert sorted(result["domains"]) == sorted(ref)
    for domain, r in ref.items():
        got = result["domains"][domain]
        assert (got["tokens"], got["bytes"], got["documents"]) == (r["tokens"], r["bytes"], r["documents"]), domain
        np.testing.assert_allclose(got["bits_per_byte"], r["ce"] / math.log(2) / r["bytes"], rtol=rtol)
        np.testing.assert_allclose(got["ce_per_token"], r["ce"] / r["tokens"], rtol=rtol)
    ce = sum(r["ce"] for r in ref.values())
    n_bytes = sum(r["bytes"] for r in ref.values())
    np.testing.assert_allclose(result["bits_per_byte"], ce / math.log(2) / n_bytes, rtol=rtol)
    assert result["bytes"] == n_bytes and result["documents"] == len(DOCS)
    assert result["tokens"] == sum(r["tokens"] for r in ref.values())


def test_matches_naive_reference(setup):
    result = setup["result"]
    assert_matches(result, naive_report(setup))
    tok = setup["tok"]
    assert result["unscored_bytes"] == sum(int(tok.encode(d.text).byte_end[0]) for d in DOCS)
    assert 0 < result["bits_per_byte"] < 20


def test_one_device_equals_eight(setup):
    mesh = make_mesh(MeshConfig(), devices=jax.devices()[:1])
    cfg, params = checkpoint.load(setup["root"] / "model", mesh, DEFAULT_RULES)
    one = evaluate_bpb(cfg, params, setup["tok"], DocumentStore(setup["root"] / "docs", "validation"), mesh=mesh,
                       rules=DEFAULT_RULES, batch_size=4, seq_len=SEQ, chunk=16)
    eight = setup["result"]
    for a, b in [(one, eight), *((one["domains"][d], eight["domains"][d]) for d in eight["domains"])]:
        assert (a["tokens"], a["bytes"], a["documents"]) == (b["tokens"], b["bytes"], b["documents"])
        np.testing.assert_allclose(a["bits_per_byte"], b["bits_per_byte"], rtol=1e-6)


def test_hf_export_scored_by_transformers(setup):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_dir = checkpoint.save_hf(setup["root"] / "hf", setup["cfg"], setup["params"], model_type="llama",
                                tokenizer_dir=setup["tok_dir"], overwrite=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    ref: dict[str, dict] = {}
    for d in DOCS:
        ids = doc_ids(setup["tok"], d.text)
        with torch.inference_mode():
            logits = model(torch.as_tensor(ids[None]).long()).logits.double()[0]
        logp = torch.log_softmax(logits, dim=-1).numpy()
        r = ref.setdefault(d.domain, {"ce": 0.0, "tokens": 0, "bytes": 0, "documents": 0})
        r["ce"] += float(-logp[np.arange(len(ids) - 1), ids[1:]].sum())
        r["tokens"] += len(ids) - 1
        r["bytes"] += len(d.text.encode())
        r["documents"] += 1
    assert_matches(setup["result"], ref, rtol=1e-4)
    # The HF directory itself, through main (HF loading, its own tokenizer files).
    report = evaluate.main(EvaluateConfig(
        checkpoint=str(hf_dir), documents=str(setup["root"] / "docs"), batch_size=4, seq_len=SEQ, logits_chunk=16,
        param_dtype="float32", compute_dtype="float32", mesh=MeshConfig(data=2, fsdp=4)))
    assert_matches(report, ref, rtol=1e-4)


def test_windows_cover_every_token_once():
    for n in range(0, 40):
        for seq_len, context in [(8, 1), (8, 4), (8, 7), (2, 1)]:
            scored = []
            for start, end, first in windows(n, seq_len, context):
                assert end - start <= seq_len and (start == 0 or first == context - 1)
                scored += [start + p + 1 for p in range(first, end - start - 1)]
            assert scored == list(range(1, n)), (n, seq_len, context)


def test_long_documents_are_windowed(setup):
    tok, cfg, params = setup["tok"], setup["cfg"], setup["params"]
    docs = [DOCS[-1], DOCS[0], DOCS[5]]
    all_ids = [doc_ids(tok, d.text) for d in docs]
    assert len(all_ids[0]) > 3 * 8 and len(all_ids[2]) < 8
    L = 8
    n_bytes = sum(len(d.text.encode()) for d in docs)

    def run(context):
        return evaluate_bpb(cfg, setup["sharded"], tok, docs, mesh=setup["mesh"], rules=DEFAULT_RULES, batch_size=8,
                            seq_len=L, chunk=3, context=context)

    # context 1: windows of L tokens overlapping by one, each scored whole.
    ce = sum(naive_ce(cfg, params, ids[s:s + L]) for ids in all_ids for s in range(0, len(ids) - 1, L - 1))
    np.testing.assert_allclose(run(1)["bits_per_byte"], ce / math.log(2) / n_bytes, rtol=2e-5)
    # context L-1: a full sliding window, each token predicted from the L-1 tokens before it.
    ce = 0.0
    for ids in all_ids:
        for t in range(1, len(ids)):
            w = ids[max(0, t - L + 1):t + 1]
            ce -= naive_logp(cfg, params, w)[len(w) - 2, w[-1]]
    result = run(L - 1)
    np.testing.assert_allclose(result["bits_per_byte"], ce / math.log(2) / n_bytes, rtol=2e-5)
    assert result["tokens"] == sum(len(ids) - 1 for ids in all_ids)


def test_bos_and_no_eos(setup):
    tok = setup["tok"]
    bos = tok.vocab_size + 1  # any id of the model's vocabulary stands in for a BOS here
    result = evaluate_bpb(setup["cfg"], setup["sharded"], tok, DOCS, mesh=setup["mesh"], rules=DEFAULT_RULES,
                          batch_size=4, seq_len=SEQ, chunk=16, bos_id=bos, append_eos=False)
    assert_matches(result, naive_report(setup, eos=False, bos=bos))
    assert result["unscored_bytes"] == 0
    store = DocumentStore(setup["root"] / "docs", "validation")
    first3 = evaluate_bpb(setup["cfg"], setup["sharded"], tok, store, mesh=setup["mesh"], rules=DEFAULT_RULES,
                          batch_size=4, seq_len=SEQ, chunk=16, max_documents=3)
    assert first3["documents"] == 3 and first3["bytes"] == sum(len(d.text.encode()) for d in DOCS[:3])


def test_bos_token_id(setup, tmp_path):
    sp_path = train_sentencepiece(tmp_path / "sp")
    sp = load_tokenizer(sp_path)
    assert evaluate.bos_token_id(sp_path, sp) == 1 and sp.pieces[1] == "<s>"
    assert evaluate.bos_token_id(setup["tok_dir"], setup["tok"]) is None
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_bytes((setup["tok_dir"] / "tokenizer.json").read_bytes())
    (tmp_path / "tok" / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    assert evaluate.bos_token_id(tmp_path / "tok", setup["tok"]) == setup["tok"].eos_id


def test_corpus_instead_of_a_store(setup, tmp_path, capsys):
    path = tmp_path / "val.jsonl"
    path.write_text("".join(json.dumps({"text": d.text, "meta": {"set": d.domain}}) + "\n" for d in DOCS)
                    + json.dumps({"text": "", "meta": {"set": "prose"}}) + "\n")
    out = tmp_path / "report.json"
    report = evaluate.main(EvaluateConfig(
        checkpoint=str(setup["root"] / "model"), corpus=CorpusConfig(paths=(str(path),), domain_field="meta.set"),
        batch_size=4, seq_len=SEQ, logits_chunk=16, param_dtype="float32", compute_dtype="float32",
        output=str(out), mesh=MeshConfig(data=2, fsdp=4)))
    assert_matches(report, naive_report(setup))
    assert json.loads(out.read_text())["bits_per_byte"] == report["bits_per_byte"]
    printed = capsys.readouterr().out
    assert "bits/byte" in printed and "unicode" in printed and "tokens/byte" in printed
    short = evaluate.main(EvaluateConfig(
        checkpoint=str(setup["root"] / "model"),
        corpus=CorpusConfig(paths=(str(path),), domain_field="meta.set", max_documents=2), batch_size=4,
        seq_len=SEQ, logits_chunk=16, param_dtype="float32", compute_dtype="float32", mesh=MeshConfig(data=2, fsdp=4)))
    assert short["documents"] == 2


def test_errors(setup, tmp_path):
    base = dict(documents=str(setup["root"] / "docs"), batch_size=4, seq_len=SEQ, logits_chunk=16,
                mesh=MeshConfig(data=2, fsdp=4))
    with pytest.raises(CheckpointError, match="does not exist"):
        evaluate.main(EvaluateConfig(checkpoint=str(tmp_path / "missing"), **base))
    small = dataclasses.replace(setup["cfg"], vocab_size=setup["tok"].vocab_size - 10)
    with pytest.raises(VocabSizeError, match="out of range"):
        evaluate_bpb(small, setup["sharded"], setup["tok"], DOCS, mesh=setup["mesh"], rules=DEFAULT_RULES,
                     batch_size=4, seq_len=SEQ)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_bpb(setup["cfg"], setup["sharded"], setup["tok"], [], mesh=setup["mesh"], rules=DEFAULT_RULES,
                     batch_size=4, seq_len=SEQ)
    write_documents(tmp_path / "empty", DOCS[:1], [], {"test": True})
    with pytest.raises(ValueError, match="no documents to evaluate"):
        evaluate.main(EvaluateConfig(**{**base, "documents": str(tmp_path / "empty")},
                                     checkpoint=str(setup["root"] / "model")))
    with pytest.raises(ValueError, match="no BOS"):
        evaluate.main(EvaluateConfig(checkpoint=str(setup["root"] / "model"), bos=True, **base))
    with pytest.raises(ValueError, match="nothing to evaluate: give documents"):
        EvaluateConfig(checkpoint="x").validate()
    with pytest.raises(ValueError, match="one of documents .* not both"):
        EvaluateConfig(checkpoint="x", documents="y", corpus=CorpusConfig(paths=("z",))).validate()
    with pytest.raises(ValueError, match="context"):
        EvaluateConfig(checkpoint="x", documents="y", seq_len=8, context=8).validate()


def test_cli_two_processes_equal_one(setup, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "report.json"
    sets = [f"checkpoint={setup['root'] / 'model'}", f"documents={setup['root'] / 'docs'}", "split=validation",
            "batch_size=4", f"seq_len={SEQ}", "logits_chunk=16", "param_dtype=float32", "compute_dtype=float32",
            f"output={out}", "mesh.data=2", "mesh.fsdp=-1", f"mesh.coordinator_address=127.0.0.1:{port}",
            "mesh.num_processes=2"]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    procs = [subprocess.Popen([sys.executable, "-m", "fusion_jax.evaluate",
                               *sum((["--set", s] for s in [*sets, f"mesh.process_id={i}"]), [])],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outputs = [p.communicate(timeout=240)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert "bits/byte" in outputs[0] and "unicode" in outputs[0]
    report = json.loads(out.read_text())
    one = setup["result"]
    assert report["domains"].keys() == one["domains"].keys()
    for a, b in [(report, one), *((report["domains"][d], one["domains"][d]) for d in one["domains"])]:
        assert (a["tokens"], a["bytes"], a["documents"]) == (b["tokens"], b["bytes"], b["documents"])
        np.testing.assert_allclose(a["bits_per_byte"], b["bits_per_byte"], rtol=1e-6)


# ------------------------------------------------------------------------------------------ issue 12, item 10


def _base(setup) -> dict:
    return dict(documents=str(setup["root"] / "docs"), batch_size=4, seq_len=SEQ, logits_chunk=16,
                param_dtype="float32", compute_dtype="float32", mesh=MeshConfig(data=2, fsdp=4))


def test_a_nan_score_is_an_error_not_a_figure(setup, tmp_path, capsys):
    """Finite weights whose logits overflow (±3e38 in the unembedding) gave `bits/byte nan` and exit 0."""
    params = dict(setup["params"])
    signs = np.sign(np.random.default_rng(0).standard_normal(params["lm_head"].shape))
    params["lm_head"] = jax.numpy.asarray(signs * 3e38, jax.numpy.float32)
    checkpoint.save(tmp_path / "overflow", setup["cfg"], params, model_type="llama", tokenizer_dir=setup["tok_dir"])
    report = tmp_path / "report.json"
    with pytest.raises(CheckpointError, match=r"overflow: its cross-entropy is (nan|inf) .* on domain\(s\) prose, "
                                              r"tiny, unicode: its logits are NaN or infinite, so there is no score"):
        evaluate.main(EvaluateConfig(checkpoint=str(tmp_path / "overflow"), output=str(report), **_base(setup)))
    assert not report.exists() and "bits/byte" not in capsys.readouterr().out


def test_a_tokenizer_other_than_the_checkpoints_is_refused(setup, tmp_path, caplog):
    """Another tokenizer whose ids fit the model was used without a word (bits per byte 4.06 instead of 3.31)."""
    from tiny_tokenizers import CODE_CORPUS

    model = setup["root"] / "model"
    assert json.loads((model / "fusion_jax.json").read_text())["tokenizer"]["fingerprint"] == setup["tok"].fingerprint
    other = tmp_path / "other"
    other.mkdir()
    train_byte_level(other / "tokenizer.json", corpus=CODE_CORPUS, vocab_size=setup["tok"].vocab_size)
    with pytest.raises(CheckpointError, match=rf"tokenizer={other} \(.*\) is not the tokenizer {model} was saved "
                                              r"with .*set allow_tokenizer_mismatch=true if the swap is intended"):
        evaluate.main(EvaluateConfig(checkpoint=str(model), tokenizer=str(other), **_base(setup)))
    allowed = evaluate.main(EvaluateConfig(checkpoint=str(model), tokenizer=str(other), allow_tokenizer_mismatch=True,
                                           **_base(setup)))
    assert "allowed by allow_tokenizer_mismatch" in caplog.text and math.isfinite(allowed["bits_per_byte"])
    own = evaluate.main(EvaluateConfig(checkpoint=str(model), tokenizer=str(setup["tok_dir"] / "tokenizer.json"),
                                       **_base(setup)))
    np.testing.assert_allclose(own["bits_per_byte"], setup["result"]["bits_per_byte"], rtol=1e-5)

    # The checkpoint's own tokenizer files replaced after it was saved: the stored fingerprint notices.
    swapped = tmp_path / "swapped"
    shutil.copytree(model, swapped)
    shutil.copy(other / "tokenizer.json", swapped / "tokenizer.json")
    with pytest.raises(CheckpointError, match=rf"the tokenizer now in {swapped} \(its tokenizer files were replaced\) "
                                              rf".* is not the tokenizer {swapped} was saved with"):
        evaluate.main(EvaluateConfig(checkpoint=str(swapped), **_base(setup)))
