"""Sequence alignment speed: our DTW and byte alignment vs the official FuseLLM DTW in pure Python, in one process.

Cuts text into documents of whole lines (at most --max-tokens target tokens each), tokenizes each with the source
(blending) and the target (base) tokenizer, and times on the same documents:

* baseline: a straightforward re-write of the official ``others.py::dtw`` with its ``dist_fn`` (a float64
  (n+1)×(m+1) matrix filled by a pure-Python double loop, one edit distance per cell, back-trace with
  ``np.argmin([diag, up, left])``, ``base_to_blending`` lists). The per-cell edit distance is rapidfuzz's C++
  ``Levenshtein.distance`` (the metric of the official ``editdistance.eval``, which is not a dependency); the
  summary prints its cost per cell, to compare with the official code's ~1.2 µs measured on a 2-core machine;
* ours ``dtw``: ``FuseLLMPair(src, tgt).align(src_ids, tgt_ids)`` + ``tgt_spans`` (the same ``base_to_blending``);
  its path, cost and ``base_to_blending`` must be identical to the baseline's (else the run FAILs, exit 1);
* ours ``bytes``: ``align_bytes`` + ``matching_positions`` on the two encodings' byte offsets (the default mode);
* once, the full MinED vocab map ``vocab.mined_map(src, tgt)`` (no cache), with the official ``find_best_mapping``
  timed on a sample of tokens (and checked against ours) to estimate the official single-process cost.

Reports the median seconds per document of each and the ratios baseline / ours (> 1 means we are faster).

    .venv/bin/python bench/align.py      # tokenizers trained here on stdlib text; documents from the stdlib
    .venv/bin/python bench/align.py --source gpt-neox-20b-tokenizer.json --target llama2-tokenizer.model
    .venv/bin/python bench/align.py --source SRC --target TGT --text a.txt b.txt --docs 5 --no-mined

With the real GPT-NeoX (source) and Llama-2 (target) tokenizers, e.g. in this project's shared assets
(``../shared/assets/tokenizers/gpt-neox-20b-tokenizer.json`` and ``llama2-tokenizer.model``), the documents are
~2k-token real text, which is what the acceptance figures refer to (dtw ≥ 100×, bytes ≥ 1000× the baseline,
MinED map ≤ 60 s on 2 cores).

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from rapidfuzz.distance import Levenshtein

from fusion_jax.align.bytes import align_bytes
from fusion_jax.align.fusellm import FuseLLMPair
from fusion_jax.align.transfer import matching_positions
from fusion_jax.align.vocab import mined_map, prefix_char
from fusion_jax.tokenizers import Encoding, Tokenizer, TokenizationError, load_tokenizer

DOC_MODULES = ("zipfile", "argparse")  # source files used as documents without --text (plus pydoc topics prose)


# ----------------------------------------------------------------------------------------------------------------
# Baseline: the official FuseLLM code, re-written as it is (others.py::dtw + transform_step_logits' dist_fn).
# ----------------------------------------------------------------------------------------------------------------

def official_dtw(series_1, series_2, norm_func):
    """FuseLLM ``others.py::dtw`` (modified simpledtw), unchanged apart from formatting."""
    matrix = np.zeros((len(series_1) + 1, len(series_2) + 1))
    matrix[0, :] = np.inf
    matrix[:, 0] = np.inf
    matrix[0, 0] = 0
    for i, vec1 in enumerate(series_1):
        for j, vec2 in enumerate(series_2):
            cost = norm_func(vec1, vec2)
            matrix[i + 1, j + 1] = cost + min(matrix[i, j + 1], matrix[i + 1, j], matrix[i, j])
    matrix = matrix[1:, 1:]
    i = matrix.shape[0] - 1
    j = matrix.shape[1] - 1
    matches = []
    mappings_series_1 = [list() for v in range(matrix.shape[0])]
    mappings_series_2 = [list() for v in range(matrix.shape[1])]
    while i > 0 or j > 0:
        matches.append((i, j))
        mappings_series_1[i].append(j)
        mappings_series_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        move = np.argmin([option_diag, option_up, option_left])
        if move == 0:
            i -= 1
            j -= 1
        elif move == 1:
            i -= 1
        else:
            j -= 1
    matches.append((0, 0))
    mappings_series_1[0].append(0)
    mappings_series_2[0].append(0)
    matches.reverse()
    for mp in mappings_series_1:
        mp.reverse()
    for mp in mappings_series_2:
        mp.reverse()
    return matches, matrix[-1, -1], mappings_series_1, mappings_series_2, matrix


def official_align(src: Tokenizer, tgt: Tokenizer, src_ids: np.ndarray, tgt_ids: np.ndarray):
    """What ``transform_step_logits`` does up to its ``dtw`` call: convert_ids_to_tokens, then dtw with dist_fn."""
    blending_special, base_special = prefix_char(src), prefix_char(tgt)
    blending_tokens = [src.pieces[i] for i in src_ids.tolist()]
    base_tokens = [tgt.pieces[i] for i in tgt_ids.tolist()]

    def dist_fn(a, b):
        """editdistance between two tokens, a from the blending model, b from the base model."""
        aa = a.replace(blending_special, "")
        bb = b.replace(base_special, "")
        return Levenshtein.distance(aa, bb)

    return official_dtw(blending_tokens, base_tokens, norm_func=dist_fn)


def official_find_best_mapping(x: str, base_tokens: list[str], blending_special: str, base_special: str):
    """FuseLLM ``vocab_mapping.py::find_best_mapping`` (default type, best_one=True)."""
    tmp_x = x.replace(blending_special, base_special)
    if tmp_x in base_tokens:
        return tmp_x, tmp_x
    return tmp_x, min([(y, Levenshtein.distance(tmp_x, y)) for y in base_tokens], key=lambda d: d[1])[0]


# ----------------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------------

class Doc(NamedTuple):
    name: str
    text: str
    src: Encoding
    tgt: Encoding


def stdlib_sources() -> list[tuple[str, str]]:
    """(name, text) of a few standard-library texts: two source files and the pydoc topics (English prose)."""
    out = []
    for mod in DOC_MODULES:
        spec = importlib.util.find_spec(mod)
        if spec and spec.origin and spec.origin.endswith(".py"):
            out.append((Path(spec.origin).name, Path(spec.origin).read_text(encoding="utf-8")))
    try:
        from pydoc_data.topics import topics
        out.append(("pydoc_data/topics", "\n".join(topics[k] for k in sorted(topics))))
    except ImportError:  # some distributions strip pydoc_data
        pass
    if not out:
        raise SystemExit("no standard-library text found for documents; pass --text FILE")
    return out


def training_text(exclude: set[str], max_bytes: int) -> list[str]:
    """Lines of standard-library sources (not the document sources), sorted by file name, up to max_bytes."""
    lib = Path(os.__file__).parent
    lines, size = [], 0
    for path in sorted(lib.glob("*.py")):
        if path.stem in exclude:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        for line in text.splitlines():
            if line.strip():
                lines.append(line)
                size += len(line) + 1
        if size >= max_bytes:
            break
    return lines


def train_tokenizers(tmp: Path, src_vocab: int, tgt_vocab: int) -> tuple[Path, Path]:
    """A GPT-NeoX-like byte-level BPE (source) and a Llama-like SentencePiece BPE with byte fallback (target)."""
    import sentencepiece as spm
    from tokenizers import Tokenizer as HfTokenizer, decoders, models, pre_tokenizers, trainers

    lines = training_text(set(DOC_MODULES), max_bytes=3_000_000)
    bl = HfTokenizer(models.BPE())
    bl.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bl.decoder = decoders.ByteLevel()
    bl.train_from_iterator(
        (line + "\n" for line in lines),
        trainer=trainers.BpeTrainer(vocab_size=src_vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()),
    )
    src_path = tmp / "bytelevel-bpe.json"
    bl.save(str(src_path))

    tgt_path = tmp / "sentencepiece-bpe.model"
    with open(tgt_path, "wb") as f:
        spm.SentencePieceTrainer.train(  # Llama-2's trainer settings, smaller vocab
            sentence_iterator=iter(lines), model_writer=f, model_type="bpe", vocab_size=tgt_vocab,
            byte_fallback=True, character_coverage=0.9995, normalization_rule_name="identity",
            remove_extra_whitespaces=False, split_digits=True, allow_whitespace_only_pieces=True,
            max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2,
        )
    return src_path, tgt_path


def cut_documents(name: str, text: str, src: Tokenizer, tgt: Tokenizer, max_tokens: int) -> Iterator[Doc]:
    """Consecutive documents of whole lines, each with at most max_tokens target tokens (as long as allowed).

    The cut is estimated from one encoding of the whole text (or, if the target cannot tokenize all of it, from
    each line's own encoding, a line it cannot tokenize ending the document before it), then checked on the
    document's own encoding and moved by whole lines. A single line over the limit is skipped.
    """
    lines = text.splitlines(keepends=True)
    bad = np.zeros(len(lines), bool)
    try:
        whole = tgt.encode(text)
        line_end = np.cumsum([len(s.encode("utf-8")) for s in lines])  # byte end of each line in the text
        tokens_to = np.searchsorted(whole.byte_end, line_end, side="right")  # target tokens up to line k's end
    except TokenizationError:  # e.g. SentencePiece cannot represent a literal "▁" in the text
        counts = np.zeros(len(lines), np.int64)
        for k, line in enumerate(lines):
            try:
                counts[k] = len(tgt.encode(line).ids)
            except TokenizationError:
                bad[k] = True
        tokens_to = np.cumsum(counts)
        print(f"  {name}: the target tokenizer cannot tokenize {int(bad.sum())} of {len(lines)} lines; "
              "documents stop before them", file=sys.stderr)
    stops = np.flatnonzero(bad)

    def count(s: int, e: int) -> int:
        try:
            return len(tgt.encode("".join(lines[s:e])).ids)
        except TokenizationError:
            return max_tokens + 1

    s = 0
    while s < len(lines):
        if bad[s]:
            s += 1
            continue
        limit = int(stops[np.searchsorted(stops, s)]) if stops.size and stops[-1] > s else len(lines)
        start_tokens = tokens_to[s - 1] if s else 0
        e = int(np.searchsorted(tokens_to, start_tokens + max_tokens, side="right"))  # estimate
        e = min(max(e, s + 1), limit)
        while e > s and count(s, e) > max_tokens:
            e -= 1
        while e < limit and count(s, e + 1) <= max_tokens:
            e += 1
        if e == s:  # one line alone is too long
            s += 1
            continue
        doc_text = "".join(lines[s:e])
        if doc_text.strip():
            try:
                yield Doc(f"{name}:{s + 1}", doc_text, src.encode(doc_text), tgt.encode(doc_text))
            except TokenizationError as err:
                print(f"  skip {name}:{s + 1}: {err}", file=sys.stderr)
        s = e


def pick_documents(sources, src: Tokenizer, tgt: Tokenizer, max_tokens: int, min_tokens: int, n: int) -> list[Doc]:
    """n documents, round-robin over the sources, with ≥ min_tokens target tokens where the text allows
    (otherwise the longest ones seen)."""
    gens = [cut_documents(name, text, src, tgt, max_tokens) for name, text in sources]
    picked, short = [], []
    while gens and len(picked) < n:
        for g in list(gens):
            doc = next(g, None)
            while doc is not None and len(doc.tgt.ids) < min_tokens:
                short.append(doc)
                doc = next(g, None)
            if doc is None:
                gens.remove(g)
            else:
                picked.append(doc)
                if len(picked) == n:
                    break
    short.sort(key=lambda d: -len(d.tgt.ids))
    return picked + short[: n - len(picked)]


# ----------------------------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------------------------

def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def first_difference(official, ours_b2b: list[list[int]], alignment) -> str | None:
    matches, cost, _, base_to_blending, _ = official
    ours_matches = list(zip(alignment.src_index.tolist(), alignment.tgt_index.tolist()))
    if float(cost) != float(alignment.cost):
        return f"cost {alignment.cost} vs official {cost}"
    if ours_matches != matches:
        k = next((k for k, (a, b) in enumerate(zip(ours_matches, matches)) if a != b),
                 min(len(matches), len(ours_matches)))
        return f"path step {k}: ours {ours_matches[k:k + 3]} vs official {matches[k:k + 3]}"
    if ours_b2b != base_to_blending:
        j = next(j for j, (a, b) in enumerate(zip(ours_b2b, base_to_blending)) if a != b)
        return f"base_to_blending[{j}]: ours {ours_b2b[j]} vs official {base_to_blending[j]}"
    return None


def bench_mined(src: Tokenizer, tgt: Tokenizer, sample: int) -> dict:
    """Our full MinED map (seconds), plus the official find_best_mapping on `sample` non-identical tokens:
    agreement with ours and the extrapolated single-process time of the official map."""
    t0 = time.perf_counter()
    table = mined_map(src, tgt)
    ours_s = time.perf_counter() - t0

    src_char, tgt_char = prefix_char(src), prefix_char(tgt)
    base_tokens = list(tgt.pieces)  # get_vocab() keys in id order
    base_set = set(base_tokens)
    # Official keys: every vocab string (a string under several ids is one dict key; the last id wins, by value).
    keys = [x for x in dict.fromkeys(src.pieces) if x]
    todo = [x for x in keys if x.replace(src_char, tgt_char) not in base_set]
    rng = random.Random(0)
    chosen = rng.sample(todo, min(sample, len(todo)))
    by_piece = {p: i for i, p in enumerate(src.pieces)}
    t0 = time.perf_counter()
    official = [official_find_best_mapping(x, base_tokens, src_char, tgt_char)[1] for x in chosen]
    per_token = (time.perf_counter() - t0) / max(len(chosen), 1)
    agree = sum(tgt.pieces[table[by_piece[x]]] == y for x, y in zip(chosen, official))
    # The official `in base_tokens` list scan for the identical ones is negligible next to the edit distances.
    return dict(ours_s=ours_s, official_est_s=per_token * len(todo), official_per_token_s=per_token,
                non_identical=len(todo), vocab=len(keys), sample=len(chosen), sample_agree=agree)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--source", help="source (blending) tokenizer: tokenizer.json or SentencePiece .model "
                                    "(default: a byte-level BPE trained here on stdlib text)")
    p.add_argument("--target", help="target (base) tokenizer (default: a SentencePiece BPE trained here)")
    p.add_argument("--text", nargs="+", metavar="FILE", help="UTF-8 text files to cut into documents "
                                                             "(default: stdlib zipfile.py, argparse.py, pydoc topics)")
    p.add_argument("--docs", type=int, default=3, help="documents (the baseline takes ~1.2 µs per token pair)")
    p.add_argument("--max-tokens", type=int, default=2048, help="target tokens per document, at most")
    p.add_argument("--min-tokens", type=int, help="prefer documents with at least this many target tokens "
                                                  "(default 3/4 of --max-tokens)")
    p.add_argument("--repeats", type=int, default=7, help="timed runs of ours per document (bytes: 10x this)")
    p.add_argument("--baseline-repeats", type=int, default=1, help="timed runs of the baseline per document")
    p.add_argument("--no-mined", action="store_true", help="skip the full MinED vocab map")
    p.add_argument("--mined-sample", type=int, default=20, help="tokens the official MinED code is timed on")
    p.add_argument("--train-vocab", type=int, nargs=2, default=(16000, 8000), metavar=("SRC", "TGT"),
                   help="vocab sizes of the tokenizers trained without --source/--target")
    a = p.parse_args()
    if (a.source is None) != (a.target is None):
        p.error("give both --source and --target, or neither")
    min_tokens = a.min_tokens if a.min_tokens is not None else a.max_tokens * 3 // 4

    with tempfile.TemporaryDirectory() as tmp:
        if a.source:
            src_path, tgt_path = a.source, a.target
            origin = "given"
        else:
            t0 = time.perf_counter()
            src_path, tgt_path = train_tokenizers(Path(tmp), *a.train_vocab)
            origin = f"trained here on stdlib text in {time.perf_counter() - t0:.1f}s"
        src, tgt = load_tokenizer(src_path), load_tokenizer(tgt_path)
    if a.text:
        sources = [(Path(f).name, Path(f).read_text(encoding="utf-8")) for f in a.text]
    else:
        sources = stdlib_sources()
    docs = pick_documents(sources, src, tgt, a.max_tokens, min_tokens, a.docs)
    if not docs:
        raise SystemExit("FAIL: no documents: the text is empty or every line is over --max-tokens")

    print(f"source (blending): {src.name} [{src.kind}, V={src.vocab_size}]   target (base): {tgt.name} "
          f"[{tgt.kind}, V={tgt.vocab_size}]   ({origin})")
    print(f"documents: {len(docs)} of whole lines, <= {a.max_tokens} target tokens, from "
          f"{', '.join(name for name, _ in sources)}; {cores()} cores, python {sys.version.split()[0]}")

    pair = FuseLLMPair(src, tgt)
    t0 = time.perf_counter()
    warm = docs[0]
    pair.align(warm.src.ids[:8], warm.tgt.ids[:8])  # numba compiles (or loads its cache) on the first call
    compile_s = time.perf_counter() - t0
    align_bytes(warm.src.byte_end, warm.tgt.byte_end)
    matching_positions(warm.src.byte_end, warm.tgt.byte_end)
    print(f"warm-up (numba compile or cache load of the DTW kernels): {compile_s:.2f}s, excluded from the timings")

    rows, failures = [], []
    print(f"{'document':28}{'n_src':>7}{'n_tgt':>7}{'baseline s':>12}{'dtw s':>10}{'bytes s':>10}"
          f"{'dtw x':>9}{'bytes x':>10}{'identical':>11}")
    for doc in docs:
        n, m = len(doc.src.ids), len(doc.tgt.ids)

        def ours_dtw():
            al = pair.align(doc.src.ids, doc.tgt.ids)
            return al, al.tgt_spans(m)

        def ours_bytes():
            align_bytes(doc.src.byte_end, doc.tgt.byte_end)
            matching_positions(doc.src.byte_end, doc.tgt.byte_end)

        base_times = []
        for _ in range(a.baseline_repeats):
            t0 = time.perf_counter()
            official = official_align(src, tgt, doc.src.ids, doc.tgt.ids)
            base_times.append(time.perf_counter() - t0)
        base_s = statistics.median(base_times)
        dtw_s = median_seconds(ours_dtw, a.repeats)
        bytes_s = median_seconds(ours_bytes, 10 * a.repeats)

        alignment, (first, count) = ours_dtw()
        b2b = [list(range(f, f + c)) for f, c in zip(first.tolist(), count.tolist())]
        diff = first_difference(official, b2b, alignment)
        if diff:
            failures.append(f"{doc.name}: {diff}")
        rows.append(dict(doc=doc.name, n_src=n, n_tgt=m, baseline_s=base_s, dtw_s=dtw_s, bytes_s=bytes_s,
                         identical=diff is None))
        print(f"{doc.name[:27]:28}{n:7d}{m:7d}{base_s:12.3f}{dtw_s:10.5f}{bytes_s:10.6f}"
              f"{base_s / dtw_s:9.0f}{base_s / bytes_s:10.0f}{'yes' if diff is None else 'NO':>11}")

    base_med = statistics.median(r["baseline_s"] for r in rows)
    dtw_med = statistics.median(r["dtw_s"] for r in rows)
    bytes_med = statistics.median(r["bytes_s"] for r in rows)
    dtw_ratio, bytes_ratio = base_med / dtw_med, base_med / bytes_med
    per_doc = statistics.median(r["baseline_s"] / r["dtw_s"] for r in rows)
    cells = sum(r["n_src"] * r["n_tgt"] for r in rows)
    identical = not failures
    print(f"{'median per document':28}{'':14}{base_med:12.3f}{dtw_med:10.5f}{bytes_med:10.6f}"
          f"{dtw_ratio:9.0f}{bytes_ratio:10.0f}{'all' if identical else 'NOT all':>11}")
    print(f"baseline {1e6 * sum(r['baseline_s'] for r in rows) / cells:.2f} µs per DTW cell; "
          f"dtw speedup {dtw_ratio:.0f}x (median of per-document ratios {per_doc:.0f}x; target >= 100x), "
          f"bytes speedup {bytes_ratio:.0f}x (target >= 1000x)")

    result = {"metric": "dtw_speedup_vs_pure_python_official", "unit": "x", "ours": round(dtw_med, 6),
              "baseline": round(base_med, 4), "ratio": round(dtw_ratio, 1),
              "ratio_per_doc_median": round(per_doc, 1), "bytes_s": round(bytes_med, 7),
              "bytes_ratio": round(bytes_ratio, 1), "identical_paths": identical, "docs": len(rows),
              "tokens": sum(r["n_tgt"] for r in rows), "doc_tokens": [[r["n_src"], r["n_tgt"]] for r in rows],
              "compile_s": round(compile_s, 3), "source": src.name, "target": tgt.name, "cores": cores()}
    if not a.no_mined:
        mined = bench_mined(src, tgt, a.mined_sample)
        print(f"MinED map, full vocab {src.vocab_size} -> {tgt.vocab_size} ({mined['non_identical']} of "
              f"{mined['vocab']} strings not in the target vocab): {mined['ours_s']:.1f}s on {cores()} cores "
              f"(target <= 60s on 2)")
        print(f"  official find_best_mapping: {1e3 * mined['official_per_token_s']:.1f} ms per token on "
              f"{mined['sample']} sampled tokens -> ~{mined['official_est_s']:.0f}s single-process for the map "
              f"({mined['official_est_s'] / mined['ours_s']:.0f}x ours); same result on "
              f"{mined['sample_agree']}/{mined['sample']}")
        result.update(mined_map_s=round(mined["ours_s"], 2), mined_official_est_s=round(mined["official_est_s"], 1),
                      mined_sample_agree=f"{mined['sample_agree']}/{mined['sample']}")
        if mined["sample_agree"] != mined["sample"]:
            failures.append(f"MinED map differs from the official find_best_mapping on "
                            f"{mined['sample'] - mined['sample_agree']} of {mined['sample']} sampled tokens")
    print(json.dumps(result))
    if failures:
        raise SystemExit("FAIL: ours differs from the official code:\n  " + "\n  ".join(failures))


if __name__ == "__main__":
    main()
