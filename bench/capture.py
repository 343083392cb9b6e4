"""Teacher capture: cache size vs the official FuseLLM feature format, and capture speed vs the official
``forward_for_logits.py`` recipe (transformers PyTorch), on the same documents, in one process.

Two measurements on the same documents and the same tiny model:

(a) bytes per token. Ours: the manifest of a real capture run here (``fusion_jax.data.capture.main``): file bytes (the
    ArrayRecord shards) and record bytes, over the captured tokens (EOS included). Official: computed per document
    from the official Arrow layout (``reference/fusellm.md`` §7.1), with n = the document's tokens (EOS included,
    the same tokens as ours), k = the same k, L = ``--official-max-length`` (2048):

      step 2 (forward_for_logits.py, per model; per_step_* are padded to L rows, whatever n is):
        per_step_logits    list<list<float16>> [L][k]   4 + 4·L + 2·k·L   (outer offset, inner offsets, values)
        per_step_indices   list<list<int64>>   [L][k]   4 + 4·L + 8·k·L
        per_step_metric_ce list<float16>       [L−1]    4 + 2·(L−1)
        input_ids, attention_mask, labels  list<int64> [n]   3·(4 + 8·n)
        metric_ce          float16                      2
        (the ``text`` column, also kept at step 2, is left out: our document store holds the text too)

      step 3b/4 (token_alignment.py / packing.py; rows cut to n), per teacher:
        as the base model:   per_step_logits fp16 + per_step_indices int64 (4 + 4·n + 2·k·n) + (4 + 4·n + 8·k·n),
                             input_ids/attention_mask/labels 3·(4 + 8·n), metric_ce 2   → 132 B/token at k = 10
        as an aligned model: per_step_aligned_logits float64 + indices int64, rows of k (a full row)
                             (4 + 4·n + 8·k·n) + (4 + 4·n + 8·k·n), metric_ce_aligned float64 8 → 168 B/token at k = 10

    Main ratio: official step 2 / ours (file bytes), summed over the documents. Step 2 pads to L rows, so the ratio
    depends on document length (MiniPile documents average ~1,800 Llama-2 tokens after the official split; the
    bench prints the figure for a full-length document too). Extra keys: the step-3b ratios.

(b) capture tokens/s on a tiny model (``--hidden``, ``--layers``, ...; weights initialised here, exported with
    ``fusion_jax.convert.checkpoint.save_hf``, and that Hugging Face directory is the source for both):
      ours: ``fusion_jax.data.capture.main`` over a document store (tokenization, packing into rows of at most ``--seq-len`` tokens sized to the documents, jitted
      forward + log_softmax + top-k + per-token CE, writing the cache shards) on ``--devices`` CPU devices (default
      1: ``XLA_FLAGS`` is set here before JAX starts). The persistent compilation cache is on and a first run warms
      it; the repeats are fresh output directories, timed by the capture loop's own clock (what ``main`` reports as
      ``seconds``: it excludes loading the model, includes tracing the step again and loading the compiled step);
      baseline: what ``forward_for_logits.py`` does per batch, in PyTorch fp32 on CPU: tokenize ``text`` (+EOS, the
      tokenizer's own backend), pad the batch to its longest document (the official pads to ``model_max_length``
      = 2048, slower still; ``--baseline-pad max_length`` does that), forward, cast the logits to fp16,
      ``torch.topk(k)``, per-step CE of the next token and the masked sequence CE, results moved to numpy (writing
      the Arrow dataset is not timed).
    Medians of ``--repeats`` (ours and baseline alternate). Tokens = the documents' tokens, EOS included.

    .venv/bin/python bench/capture.py                      # stdlib prose, tokenizer trained here, tiny model
    .venv/bin/python bench/capture.py --tokenizer ../shared/assets/tokenizers/llama2-tokenizer.model --docs 40
    .venv/bin/python bench/capture.py --text a.txt b.txt --hidden 256 --layers 4 --repeats 5

(b') ``--model PATH``: a real model instead of the tiny random one, on both sides — a Hugging Face directory, a
    fusion_jax directory or a GGUF file. Ours reads it directly (``fusion_jax.convert.load``; its own tokenizer, a
    GGUF's rebuilt from the metadata); the baseline loads it with transformers (a GGUF through transformers' own GGUF
    loader, ``from_pretrained(dir, gguf_file=name)``, with transformers' GGUF tokenizer; a fusion_jax directory is
    exported to a temporary Hugging Face directory first). Both float32 on CPU. The --hidden/--layers/... and
    --tokenizer/--vocab flags are ignored. Sized for 2 cores (SmolLM2-135M: ~3 minutes in all):

    make real-model
    .venv/bin/python bench/capture.py --model ~/.cache/fusion_jax/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --docs 24 --max-tokens 512 --seq-len 1024 --batch 4 --repeats 1

    Printed too: the positions each side computes (ours: every batch's rows × their length; the baseline: each
    batch padded to its longest document), so that padding is told apart from per-position speed.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import os
import re
import sys


def _set_devices(argv: list[str]) -> int:
    """--devices N → XLA_FLAGS before JAX is imported (the Makefile exports 8 fake devices)."""
    n = 1
    for i, a in enumerate(argv):
        if a == "--devices" and i + 1 < len(argv):
            n = int(argv[i + 1])
        elif a.startswith("--devices="):
            n = int(a.split("=", 1)[1])
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", "")).strip()
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return n


_set_devices(sys.argv[1:])

import json  # noqa: E402
import logging  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from fusion_jax.data import capture, scoring  # noqa: E402
from fusion_jax.convert import checkpoint  # noqa: E402
from fusion_jax.data import teacher_cache as tc  # noqa: E402
from fusion_jax.data.corpus import Document  # noqa: E402
from fusion_jax.data.documents import write_documents  # noqa: E402
from fusion_jax.mesh import MeshConfig  # noqa: E402
from fusion_jax.models import decoder  # noqa: E402
from fusion_jax.config.model import ModelConfig  # noqa: E402
from fusion_jax.tokenizers import Tokenizer, load_tokenizer  # noqa: E402


# ---------------------------------------------------------------------------------------------------- the format


def official_step2_bytes(n: int, k: int, L: int) -> int:
    """One example of forward_for_logits.py's output (module docstring), without the text column."""
    return ((4 + 4 * L + 2 * k * L) + (4 + 4 * L + 8 * k * L) + (4 + 2 * (L - 1)) + 3 * (4 + 8 * n) + 2)


def official_step3b_base_bytes(n: int, k: int) -> int:
    return (4 + 4 * n + 2 * k * n) + (4 + 4 * n + 8 * k * n) + 3 * (4 + 8 * n) + 2


def official_step3b_aligned_bytes(n: int, k: int) -> int:
    return (4 + 4 * n + 8 * k * n) + (4 + 4 * n + 8 * k * n) + 8


# ---------------------------------------------------------------------------------------------------- inputs


def stdlib_texts() -> list[str]:
    try:
        from pydoc_data.topics import topics
        return [topics[key] for key in sorted(topics)]
    except ImportError:  # a Python without pydoc_data: its own sources
        import argparse as a, zipfile as z
        return [Path(m.__file__).read_text(encoding="utf-8") for m in (a, z)]


def train_tokenizer(texts: list[str], vocab: int, out: Path) -> Path:
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers, trainers

    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    return out


def documents(texts: list[str], tok: Tokenizer, max_tokens: int, limit: int) -> list[Document]:
    """Runs of whole lines of each text with at most max_tokens tokens (EOS not counted)."""
    docs: list[Document] = []
    for t, text in enumerate(texts):
        lines, cur, cur_n = text.splitlines(keepends=True), [], 0
        for line in lines:
            n = len(tok.encode(line).ids)
            if cur and cur_n + n > max_tokens:
                docs.append(Document(f"t{t}-{len(docs)}", "".join(cur), "bench"))
                cur, cur_n = [], 0
            if n <= max_tokens:
                cur.append(line)
                cur_n += n
        if cur:
            docs.append(Document(f"t{t}-{len(docs)}", "".join(cur), "bench"))
    docs = [d for d in docs if d.text.strip() and len(tok.encode(d.text).ids) <= max_tokens]
    return docs[:limit] if limit else docs


# ---------------------------------------------------------------------------------------------------- baseline


class Baseline:
    """forward_for_logits.py's per-batch work, in PyTorch fp32 on CPU (module docstring)."""

    def __init__(self, hf_dir: Path, tok_path: Path, eos_id: int, k: int, batch: int, pad: str, max_len: int,
                 gguf_file: str | None = None):
        import torch
        import transformers

        transformers.utils.logging.disable_progress_bar()
        self.torch = torch
        extra = {"gguf_file": gguf_file} if gguf_file else {}
        self.model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, **extra).eval()
        self.eos, self.k, self.batch, self.pad, self.max_len = eos_id, k, batch, pad, max_len
        self.positions = 0  # positions computed by the last call (padding included)
        if gguf_file:  # transformers' own tokenizer for the GGUF (a fast tokenizer built from its metadata)
            hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir, gguf_file=gguf_file)
            self.encode = lambda texts: hf_tok(texts, add_special_tokens=False)["input_ids"]
            return
        if tok_path.is_dir():
            tok_path = tok_path / "tokenizer.json" if (tok_path / "tokenizer.json").is_file() else \
                next(tok_path.glob("*.model"))
        if tok_path.suffix == ".json":
            from tokenizers import Tokenizer as HFTokenizer

            hf = HFTokenizer.from_file(str(tok_path))
            self.encode = lambda texts: [e.ids for e in hf.encode_batch(texts, add_special_tokens=False)]
        else:
            import sentencepiece as spm

            sp = spm.SentencePieceProcessor(model_file=str(tok_path))
            self.encode = lambda texts: sp.encode(texts)

    def __call__(self, texts: list[str]) -> tuple[int, list]:
        torch = self.torch
        out, tokens, self.positions = [], 0, 0
        with torch.inference_mode():
            for s in range(0, len(texts), self.batch):
                ids = [x[: self.max_len - 1] + [self.eos] for x in self.encode(texts[s:s + self.batch])]
                T = self.max_len if self.pad == "max_length" else max(map(len, ids))
                input_ids = torch.zeros((len(ids), T), dtype=torch.long)  # the official pads with id 0 (unk)
                mask = torch.zeros((len(ids), T), dtype=torch.long)
                for r, x in enumerate(ids):
                    input_ids[r, :len(x)] = torch.tensor(x)
                    mask[r, :len(x)] = 1
                tokens += int(mask.sum())
                self.positions += len(ids) * T
                logits = self.model(input_ids=input_ids, attention_mask=mask).logits
                ce = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(), reduction="none").view(len(ids), T - 1)
                m = mask[:, 1:].float()
                metric_ce = ((ce * m).sum(1) / m.sum(1).clamp(min=1)).half()
                values, indices = torch.topk(logits.half(), self.k, dim=-1)
                out.append((values.numpy(), indices.numpy(), ce.half().numpy(), metric_ce.numpy(),
                            [np.asarray(x) for x in ids]))
        return tokens, out


# ---------------------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", help="tokenizer file/dir to use (default: byte-level BPE trained here on the text)")
    p.add_argument("--text", nargs="+", help="text files to cut into documents (default: stdlib pydoc topics)")
    p.add_argument("--vocab", type=int, default=4096, help="vocab of the tokenizer trained here")
    p.add_argument("--docs", type=int, default=0, help="use the first N documents (0: all)")
    p.add_argument("--max-tokens", type=int, default=1000, help="tokens per document at most (whole lines)")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=256)
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=1024, help="our longest row (≥ max-tokens + 1)")
    p.add_argument("--batch", type=int, default=8, help="rows per forward (ours: packed rows; baseline: documents)")
    p.add_argument("--logits-chunk", type=int, default=256)
    p.add_argument("--logprob-format", default="quantized", choices=list(tc.LOGPROB_FORMATS))
    p.add_argument("--official-max-length", type=int, default=2048, help="official model_max_length (step-2 padding)")
    p.add_argument("--baseline-pad", default="longest", choices=["longest", "max_length"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--devices", type=int, default=1, help="CPU devices for ours (set before JAX starts)")
    p.add_argument("--model", help="a real model for both sides (HF dir, fusion_jax dir or .gguf) instead of the "
                                   "tiny random one")
    a = p.parse_args()
    if a.seq_len < a.max_tokens + 1:
        p.error("--seq-len must be at least --max-tokens + 1")
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    texts = [Path(f).read_text(encoding="utf-8") for f in a.text] if a.text else stdlib_texts()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        jax.config.update("jax_compilation_cache_dir", str(tmp / "jax_cache"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
        gguf_file = None
        if a.model:  # a real model: read as it is by ours; transformers loads it (a fusion_jax dir: exported first)
            model = Path(a.model).expanduser().absolute()
            model_kind = checkpoint.kind(model)
            tok_path = model
            tok = load_tokenizer(tok_path)
            cfg = checkpoint.model_config(model)
            source = model
            if model_kind == "gguf":
                hf_dir, gguf_file = model.parent, model.name
            elif model_kind == "hf":
                hf_dir = model
            else:
                mcfg, mparams = checkpoint.load(model, param_dtype="float32")
                model_type, hf_cfg = checkpoint.source_info(model)
                hf_dir = checkpoint.save_hf(tmp / "hf", mcfg, mparams, model_type=model_type, hf_config=hf_cfg,
                                            tokenizer_dir=model)
                del mparams
        else:
            tok_path = Path(a.tokenizer) if a.tokenizer else train_tokenizer(texts, a.vocab, tmp / "tok")
            tok = load_tokenizer(tok_path)
            cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=a.hidden, intermediate_size=a.intermediate,
                              num_layers=a.layers, num_heads=a.heads, num_kv_heads=a.kv_heads,
                              compute_dtype="float32", param_dtype="float32")
            params = decoder.init_params(cfg, jax.random.key(0), std=0.5)
            tok_dir = tok_path if tok_path.is_dir() else None
            hf_dir = checkpoint.save_hf(tmp / "hf", cfg, params, model_type="llama", tokenizer_dir=tok_dir)
            source = hf_dir
        docs = documents(texts, tok, a.max_tokens, a.docs)
        write_documents(tmp / "docs", docs, [], {"bench": "capture"})

        def ccfg(out: Path) -> capture.CaptureConfig:
            return capture.CaptureConfig(
                documents=str(tmp / "docs"), source=str(source), tokenizer=str(tok_path), output=str(out), k=a.k,
                seq_len=a.seq_len, batch_size=a.batch, docs_per_shard=256, logits_chunk=a.logits_chunk,
                logprob_format=a.logprob_format, param_dtype="float32", compute_dtype="float32", mesh=MeshConfig())

        baseline = Baseline(hf_dir, tok_path, tok.eos_id, a.k, a.batch, a.baseline_pad, a.official_max_length,
                            gguf_file)
        doc_texts = [d.text for d in docs]
        t0 = time.perf_counter()
        warm = capture.main(ccfg(tmp / "warm"))  # compiles (and fills the persistent compilation cache)
        warm_s = time.perf_counter() - t0
        base_tokens, base_out = baseline(doc_texts)  # warm-up
        ours_s, base_s, run = [], [], 0
        for _ in range(a.repeats):
            run += 1
            rep = capture.main(ccfg(tmp / f"run{run}"))
            ours_s.append(rep["seconds"])
            t0 = time.perf_counter()
            baseline(doc_texts)
            base_s.append(time.perf_counter() - t0)

        # (a) bytes: ours from the manifest of the capture, the official format from its layout, per document
        cache = tc.TeacherCache(tmp / "warm")
        m = cache.manifest
        lengths = cache.doc_tokens()
        tokens = int(lengths.sum())
        assert tokens == base_tokens == warm["tokens"], (tokens, base_tokens, warm["tokens"])
        L = a.official_max_length
        step2 = sum(official_step2_bytes(int(n), a.k, L) for n in lengths)
        step3b_base = sum(official_step3b_base_bytes(int(n), a.k) for n in lengths)
        step3b_aligned = sum(official_step3b_aligned_bytes(int(n), a.k) for n in lengths)
        ours_bpt, ours_rec_bpt = m["bytes"] / tokens, m["record_bytes"] / tokens
        # positions each side computes: ours packs the documents into batches of rows sized to them (one shard here)
        batches = scoring.pack_batches([int(n) for n in lengths], a.batch, scoring.row_lengths(a.seq_len))
        ours_positions = sum(a.batch * b.length for b in batches)
        row_shapes = sorted({b.length for b in batches})
        base_positions = baseline.positions

        # parity: our cache vs the baseline's top-k on the first document (same weights, same tokens)
        indices = base_out[0][1][0]
        ids0 = base_out[0][4][0]
        rec = cache[0]
        np.testing.assert_array_equal(rec.ids, ids0)
        import torch

        with torch.inference_mode():
            full = baseline.model(input_ids=torch.as_tensor(ids0[None]).long()).logits[0].float()
            ref_lp = torch.log_softmax(full, -1)
        n0 = len(ids0)
        top1_agree = float(np.mean(rec.topk_ids[:, 0] == indices[:n0, 0]))
        ref_top1 = ref_lp.numpy()[np.arange(n0), rec.topk_ids[:, 0]]
        top1_lp_diff = float(np.max(np.abs(rec.topk_logprobs[:, 0] - ref_top1)))

    ours_tps, base_tps = tokens / statistics.median(ours_s), base_tokens / statistics.median(base_s)
    config = dict(model=str(a.model) if a.model else "tiny random llama", documents=len(docs), tokens=tokens,
                  mean_doc_tokens=round(tokens / len(docs), 1), tokenizer=tok.name, vocab=tok.vocab_size,
                  hidden=cfg.hidden_size, layers=cfg.num_layers, heads=cfg.num_heads, kv_heads=cfg.num_kv_heads,
                  intermediate=cfg.intermediate_size, k=a.k, seq_len=a.seq_len, batch=a.batch,
                  logprob_format=a.logprob_format, official_max_length=L, baseline_pad=a.baseline_pad,
                  devices=jax.device_count(), torch_threads=torch.get_num_threads(), repeats=a.repeats)
    full_doc = official_step2_bytes(L, a.k, L) / L
    print(f"config: {config}")
    print(f"parity on document 0 ({n0} tokens): top-1 agreement {top1_agree:.3f}, max |top-1 log-prob ours - torch| "
          f"{top1_lp_diff:.2e}; our first run (load + compile) {warm_s:.1f}s")
    print(f"(a) bytes/token over {len(docs)} documents ({tokens:,} tokens, EOS included)")
    print(f"  {'ours: cache files (ArrayRecord)':48}{ours_bpt:10.1f}")
    print(f"  {'ours: records':48}{ours_rec_bpt:10.1f}")
    print(f"  {'official step 2 (padded to %d rows)' % L:48}{step2 / tokens:10.1f}   ratio {step2 / m['bytes']:.1f}x")
    print(f"  {'official step 2, a full-length document':48}{full_doc:10.1f}   ratio {full_doc / ours_bpt:.1f}x")
    print(f"  {'official step 3b/4, as the base model':48}{step3b_base / tokens:10.1f}   ratio "
          f"{step3b_base / m['bytes']:.1f}x")
    print(f"  {'official step 3b/4, as an aligned model':48}{step3b_aligned / tokens:10.1f}   ratio "
          f"{step3b_aligned / m['bytes']:.1f}x")
    print(f"(b) capture tokens/s (median of {a.repeats})")
    print(f"  {'ours (fusion_jax.data.capture.main)':48}{ours_tps:10.0f}   ({statistics.median(ours_s):.2f}s)")
    print(f"  {'baseline (forward_for_logits recipe, torch fp32)':48}{base_tps:10.0f}   "
          f"({statistics.median(base_s):.2f}s)")
    print(f"  {'ratio ours/baseline':48}{ours_tps / base_tps:10.2f}")
    print(f"  positions computed (padding included): ours {ours_positions:,} ({len(batches)} batches of {a.batch} rows "
          f"of {row_shapes} tokens; {tokens / ours_positions:.0%} real), baseline {base_positions:,} "
          f"({tokens / base_positions:.0%} real); per computed position ours/baseline "
          f"{(ours_positions / statistics.median(ours_s)) / (base_positions / statistics.median(base_s)):.2f}")
    if top1_agree < 0.98:
        raise SystemExit(f"FAIL: our top-1 agrees with transformers on only {top1_agree:.1%} of positions")
    result = {
        "metric": "teacher_cache_bytes_per_token_official_step2_over_ours", "unit": "bytes/token",
        "ours": round(ours_bpt, 2), "baseline": round(step2 / tokens, 2), "ratio": round(step2 / m["bytes"], 2),
        "ours_record_bytes_per_token": round(ours_rec_bpt, 2),
        "official_step2_full_length_doc_bytes_per_token": round(full_doc, 2),
        "ratio_step2_full_length_doc": round(full_doc / ours_bpt, 2),
        "official_step3b_base_bytes_per_token": round(step3b_base / tokens, 2),
        "ratio_step3b_base": round(step3b_base / m["bytes"], 2),
        "official_step3b_aligned_bytes_per_token": round(step3b_aligned / tokens, 2),
        "ratio_step3b_aligned": round(step3b_aligned / m["bytes"], 2),
        "capture_tokens_per_s_ours": round(ours_tps, 1), "capture_tokens_per_s_baseline": round(base_tps, 1),
        "capture_tokens_per_s_ratio": round(ours_tps / base_tps, 3),
        "capture_positions_ours": ours_positions, "capture_positions_baseline": base_positions,
        "ours_first_run_s": round(warm_s, 1), "parity_top1_agreement": round(top1_agree, 4),
        "parity_top1_logprob_max_abs_diff": top1_lp_diff, "config": config,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
