"""The `fusellm` compatibility mode (``align.dtw``, ``align.fusellm``, the MinED ``vocab_map``) against the official
FuseLLM code.

What is checked against what:

* ``dtw`` / ``cost_matrix`` / ``edit_distances`` against a naive reference written here: the literal official
  ``others.py::dtw`` (pure-Python double loop over an (n+1)×(m+1) float64 matrix, back-trace with ``np.argmin``),
  with a pluggable tie order, and a pure-Python Levenshtein on code points. Hypothesis, random short strings over a
  tiny alphabet (ties everywhere), both tie orders; non-BMP characters pin code-point semantics.
* The official outputs in ``shared/golden/fusellm`` (skipped with the reason when ``../shared`` is absent):
  ``dtw_crafted.jsonl`` (paths, costs, matrices, FuseChat-v2 tie order), the 33 real documents (tokenization,
  DTW, ``transform_step_logits`` rows in ``hard`` and ``soft`` mode), and the full GPT-NeoX → Llama-2 MinED map.
* The vocab-map cache: a valid file is loaded, not rebuilt; a truncated, stale or malformed one is rebuilt with a
  warning; no ``*.partial`` file is left behind.
* ``onehot_target="next"`` (FuseChat-v2's fix) on a real document, and the error messages.
* Without shared assets: tiny tokenizers trained here (byte-level source → SentencePiece target) run ``FuseLLMPair``
  end to end against a naive reimplementation of the official ``transform_step_logits`` / ``find_best_mapping``,
  plus the row invariants.
"""

from __future__ import annotations

import json
import logging
import shutil

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from fusion_jax.align import vocab as vocab_module
from fusion_jax.align.dtw import TIE_ORDERS, cost_matrix, distinct, dtw, edit_distances
from fusion_jax.align.fusellm import FuseLLMPair, dtw_tokens
from fusion_jax.align.transfer import ROW_EMPTY, ROW_ONEHOT, ROW_TEACHER
from fusion_jax.align.vocab import cache_path, vocab_map
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

# ------------------------------------------------------------------------------------------ naive reference


def levenshtein(a: str, b: str) -> int:
    """Edit distance on code points (insert = delete = substitute = 1), as ``editdistance.eval`` on str."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def naive_dtw(series_1, series_2, norm_func=levenshtein, tie_order="official"):
    """The official ``others.py::dtw``, line for line, with the back-trace order made pluggable:
    official = argmin([diag, up, left]); fusechat_v2 = argmin([diag, left, up]).
    → (matches, cost, mappings_series_1, mappings_series_2, trimmed matrix)."""
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
    mappings_series_1 = [list() for _ in range(matrix.shape[0])]
    mappings_series_2 = [list() for _ in range(matrix.shape[1])]
    while i > 0 or j > 0:
        matches.append((i, j))
        mappings_series_1[i].append(j)
        mappings_series_2[j].append(i)
        option_diag = matrix[i - 1, j - 1] if i > 0 and j > 0 else np.inf
        option_up = matrix[i - 1, j] if i > 0 else np.inf
        option_left = matrix[i, j - 1] if j > 0 else np.inf
        if tie_order == "official":
            move = ["diag", "up", "left"][np.argmin([option_diag, option_up, option_left])]
        else:
            move = ["diag", "left", "up"][np.argmin([option_diag, option_left, option_up])]
        if move == "diag":
            i -= 1
            j -= 1
        elif move == "up":
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


def run_lists(spans) -> list[list[int]]:
    """(first, count) → the official list-of-lists mapping."""
    first, count = spans
    return [list(range(f, f + c)) for f, c in zip(first.tolist(), count.tolist())]


def path_pairs(alignment) -> list[tuple[int, int]]:
    return list(zip(alignment.src_index.tolist(), alignment.tgt_index.tolist()))


def assert_matches_naive(src, tgt):
    n, m = len(src), len(tgt)
    table = np.array([[levenshtein(a, b) for b in tgt] for a in src], np.int32)
    src_strings, src_idx = distinct(src)
    tgt_strings, tgt_idx = distinct(tgt)
    assert src_strings == list(dict.fromkeys(src)) and [src_strings[k] for k in src_idx] == list(src)
    dist = edit_distances(src_strings, tgt_strings)
    np.testing.assert_array_equal(dist[src_idx][:, tgt_idx], table)
    acc = cost_matrix(dist, src_idx, tgt_idx)
    assert acc.dtype == np.int32 and acc.shape == (n, m)
    for tie_order in TIE_ORDERS:
        matches, cost, map_1, map_2, matrix = naive_dtw(src, tgt, tie_order=tie_order)
        got = dtw(src, tgt, tie_order=tie_order)
        assert got.src_index.dtype == np.int32 and got.tgt_index.dtype == np.int32
        assert path_pairs(got) == matches, tie_order
        assert got.cost == cost and isinstance(got.cost, int)
        assert run_lists(got.src_spans(n)) == map_1
        assert run_lists(got.tgt_spans(m)) == map_2
        np.testing.assert_array_equal(acc, matrix)


# Short strings over a tiny alphabet (the empty string included: a stripped "▁" or "Ġ" token), so many cells tie.
short_token = st.one_of(
    st.text(alphabet="ab", max_size=3),
    st.sampled_from(["a", "b", "ab", "ba", "c", "abc", "bc", "aa", ""]),
)
token_list = st.lists(short_token, min_size=1, max_size=25)
emoji_token = st.text(alphabet="a😀😁👍\U0001F3FD", max_size=3)


@settings(max_examples=250, deadline=None)
@given(token_list, token_list)
@example(["Chat"], ["Ch", "at"])
@example(["a"], ["a"])
@example(["", ""], [""])
@example(["", "ab", ""], ["b", "", "a"])  # the two tie orders give different paths
def test_dtw_matches_naive_official(src, tgt):
    assert_matches_naive(src, tgt)


def test_dtw_seeded_sweep_matches_naive_official():
    """Hypothesis rarely draws inputs on which the two tie orders disagree (an up/left tie without the diagonal
    among the minima); a seeded uniform sweep does, and the sweep must contain such cases."""
    rng = np.random.default_rng(2024)
    alphabet = ["a", "b", "ab", "ba", "c", "abc", "bc", "aa", ""]
    order_sensitive = 0
    for _ in range(300):
        src = [alphabet[t] for t in rng.integers(0, len(alphabet), rng.integers(1, 26))]
        tgt = [alphabet[t] for t in rng.integers(0, len(alphabet), rng.integers(1, 26))]
        assert_matches_naive(src, tgt)
        order_sensitive += naive_dtw(src, tgt)[0] != naive_dtw(src, tgt, tie_order="fusechat_v2")[0]
    assert order_sensitive >= 3


@settings(max_examples=60, deadline=None)
@given(st.lists(emoji_token, min_size=1, max_size=12), st.lists(emoji_token, min_size=1, max_size=12))
@example(["😀", "a😀b", "👍\U0001F3FD"], ["😀a", "😁", "b", "👍"])
def test_dtw_non_bmp_matches_naive_official(src, tgt):
    assert_matches_naive(src, tgt)


def test_edit_distance_counts_code_points():
    # One code point each; UTF-16 (surrogate pairs) would count 2, UTF-8 bytes 1 of 4 differ.
    assert dtw(["😀"], ["😁"]).cost == 1
    assert dtw(["😀a"], ["a"]).cost == 1
    assert dtw(["👍\U0001F3FD"], ["👍"]).cost == 1  # emoji + skin-tone modifier: two code points
    nfc, nfd = "\u00e9", "e\u0301"  # é composed and decomposed: compared as given, never normalised
    np.testing.assert_array_equal(edit_distances([nfc, nfd], [nfc]), [[0], [2]])


# ----------------------------------------------------------------------------------------- shared assets


@pytest.fixture(scope="module")
def golden(shared_dir):
    return shared_dir / "golden" / "fusellm"


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_crafted_dtw_goldens(golden):
    cases = read_jsonl(golden / "dtw_crafted.jsonl")
    assert len(cases) == 30
    for case in cases:
        src, tgt, cid = case["series_1_blending"], case["series_2_base"], case["case_id"]
        n, m = len(src), len(tgt)
        got = dtw(src, tgt)
        assert path_pairs(got) == [tuple(p) for p in case["matches"]], cid
        assert got.cost == case["cost"], cid
        assert run_lists(got.tgt_spans(m)) == case["base_to_blending"], cid
        assert run_lists(got.src_spans(n)) == case["blending_to_base"], cid
        src_strings, src_idx = distinct(src)
        tgt_strings, tgt_idx = distinct(tgt)
        acc = cost_matrix(edit_distances(src_strings, tgt_strings), src_idx, tgt_idx)
        np.testing.assert_array_equal(acc, np.array(case["matrix"]), err_msg=cid)
        alt = dtw(src, tgt, tie_order="fusechat_v2")
        assert run_lists(alt.tgt_spans(m)) == case["fusechat_v2_order_base_to_blending"], cid
    # The crafted set does separate the two orders (otherwise the checks above could not tell them apart).
    assert any(c["fusechat_v2_order_base_to_blending"] != c["base_to_blending"] for c in cases)


DOC_IDS = [f"p{i:02d}" for i in range(12)] + [f"c{i:02d}" for i in range(12)] + [f"x{i:02d}" for i in range(9)]
MODES = ("hard", "soft")


@pytest.fixture(scope="module")
def llama(shared_dir):
    return load_tokenizer(shared_dir / "assets" / "tokenizers" / "llama2-tokenizer.model")


@pytest.fixture(scope="module")
def neox(shared_dir):
    return load_tokenizer(shared_dir / "assets" / "tokenizers" / "gpt-neox-20b-tokenizer.json")


@pytest.fixture(scope="module")
def docs(golden):
    return {d["doc_id"]: d for d in read_jsonl(golden / "docs.jsonl")}


@pytest.fixture(scope="module")
def aligned(golden):
    return {a["doc_id"]: a for a in read_jsonl(golden / "align_llama2_gptneox.jsonl")}


@pytest.fixture(scope="module")
def topk(golden):
    with np.load(golden / "topk.npz") as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def mined_build(neox, llama, tmp_path_factory):
    """The full MinED map, built once into a fresh cache dir → (map, cache_dir)."""
    cache_dir = tmp_path_factory.mktemp("vocab_cache")
    return vocab_map(neox, llama, "mined", cache_dir=cache_dir), cache_dir


@pytest.fixture(scope="module")
def pair(neox, llama, mined_build):
    return FuseLLMPair(neox, llama, mined_build[0])


@pytest.fixture(scope="module")
def official_alignments(pair, docs):
    """doc_id → our official-order DtwAlignment, computed once per module."""
    cache = {}

    def get(doc_id):
        if doc_id not in cache:
            d = docs[doc_id]
            cache[doc_id] = pair.align(np.array(d["gptneox"]["input_ids"]), np.array(d["llama2"]["input_ids"]))
        return cache[doc_id]

    return get


def test_golden_doc_ids(docs, aligned, topk):
    assert list(docs) == DOC_IDS and list(aligned) == DOC_IDS
    assert {k.split(".")[0] for k in topk} >= set(DOC_IDS)


@pytest.mark.parametrize("doc_id", DOC_IDS)
def test_real_doc_tokenization(doc_id, docs, llama, neox):
    d = docs[doc_id]
    for tok, key, eos in ((llama, "llama2", "</s>"), (neox, "gptneox", "<|endoftext|>")):
        golden_ids = d[key]["input_ids"]
        ids = tok.encode(d["text"]).ids
        assert ids.tolist() + [tok.pieces.index(eos)] == golden_ids, key
        assert [tok.pieces[i] for i in golden_ids] == d[key]["tokens"], key


@pytest.mark.parametrize("doc_id", DOC_IDS)
def test_real_doc_dtw(doc_id, docs, aligned, pair, llama, neox, official_alignments):
    d, a = docs[doc_id], aligned[doc_id]
    src_ids, tgt_ids = np.array(d["gptneox"]["input_ids"]), np.array(d["llama2"]["input_ids"])
    # The strings the official dist_fn compares: the tokens with Ġ (blending) / ▁ (base) deleted.
    assert dtw_tokens(neox, src_ids) == [t.replace("Ġ", "") for t in d["gptneox"]["tokens"]]
    assert dtw_tokens(llama, tgt_ids) == [t.replace("\u2581", "") for t in d["llama2"]["tokens"]]
    got = official_alignments(doc_id)
    assert run_lists(got.tgt_spans(len(tgt_ids))) == a["base_to_blending"]
    assert run_lists(got.src_spans(len(src_ids))) == a["blending_to_base"]
    assert got.cost == a["dtw_cost"]
    diag = a["dtw_diagnostics"]
    alt = pair.align(src_ids, tgt_ids, tie_order="fusechat_v2")
    expected = diag["fusechat_v2_order_base_to_blending"] or a["base_to_blending"]
    assert run_lists(alt.tgt_spans(len(tgt_ids))) == expected
    assert (expected != a["base_to_blending"]) == diag["fusechat_v2_order_path_differs"]
    assert alt.cost == got.cost


def fp16_exact(values) -> np.ndarray:
    """Golden logits (JSON floats of fp16 values) → float32, checking they are fp16 values."""
    v = np.array(values, np.float64)
    assert np.array_equal(v.astype(np.float16).astype(np.float64), v)
    return v.astype(np.float16).astype(np.float32)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("doc_id", DOC_IDS)
def test_real_doc_transfer(doc_id, mode, docs, aligned, topk, pair, official_alignments):
    d, g = docs[doc_id], aligned[doc_id][mode]
    src_ids, tgt_ids = np.array(d["gptneox"]["input_ids"]), np.array(d["llama2"]["input_ids"])
    tk_ids, tk_logits = topk[f"{doc_id}.gptneox.ids"], topk[f"{doc_id}.gptneox.logits"]
    rows = pair.transfer(src_ids, tgt_ids, tk_ids, tk_logits, mode, alignment=official_alignments(doc_id))
    m, k = len(tgt_ids), tk_ids.shape[1]
    assert rows.ids.shape == rows.logprobs.shape == (m, k) and rows.kind.shape == (m,)
    assert rows.ids.dtype == np.int32 and rows.logprobs.dtype == np.float32 and rows.kind.dtype == np.int8
    counts = rows.counts()
    for i in range(m):
        c = int(counts[i])
        ids, vals = rows.ids[i, :c].tolist(), rows.logprobs[i, :c]
        where = f"{doc_id} {mode} row {i}"
        assert np.all(rows.ids[i, c:] == 0) and np.all(rows.logprobs[i, c:] == -np.inf), where
        assert ids == g["indices"][i], where
        golden_onehot = g["logits"][i] == [1.0] and g["indices"][i] == [int(tgt_ids[i])]
        assert (rows.kind[i] == ROW_ONEHOT) == golden_onehot, where
        if rows.kind[i] == ROW_ONEHOT:
            assert vals.tolist() == [0.0], where
        else:
            np.testing.assert_array_equal(vals, fp16_exact(g["logits"][i]), err_msg=where)
            assert (rows.kind[i] == ROW_EMPTY) == (c == 0), where
    kinds = np.bincount(rows.kind, minlength=3)
    stats = g["stats"]
    assert (kinds[ROW_ONEHOT], kinds[ROW_TEACHER], kinds[ROW_EMPTY]) == (
        stats["onehot_fallback"], stats["teacher_rows"], stats["empty_rows"])


@pytest.mark.parametrize("mode", MODES)
def test_onehot_next_target(mode, docs, topk, pair, official_alignments):
    doc_id = "p04"  # has one-hot, teacher and (hard) empty rows
    d = docs[doc_id]
    src_ids, tgt_ids = np.array(d["gptneox"]["input_ids"]), np.array(d["llama2"]["input_ids"])
    args = (src_ids, tgt_ids, topk[f"{doc_id}.gptneox.ids"], topk[f"{doc_id}.gptneox.logits"], mode)
    cur = pair.transfer(*args, onehot_target="current", alignment=official_alignments(doc_id))
    nxt = pair.transfer(*args, onehot_target="next")  # aligns itself
    np.testing.assert_array_equal(nxt.kind, cur.kind)
    hot = np.flatnonzero(nxt.kind == ROW_ONEHOT)
    assert hot.size and hot[-1] == len(tgt_ids) - 1  # the EOS position is a one-hot: the last-row rule is hit
    expected_next = np.append(tgt_ids[1:], tgt_ids[-1])
    np.testing.assert_array_equal(nxt.ids[hot, 0], expected_next[hot])
    np.testing.assert_array_equal(nxt.logprobs[hot, 0], 0.0)
    assert np.all(nxt.counts()[hot] == 1)
    assert np.any(expected_next[hot] != tgt_ids[hot])  # "next" really differs from "current" here
    rest = np.flatnonzero(nxt.kind != ROW_ONEHOT)
    np.testing.assert_array_equal(nxt.ids[rest], cur.ids[rest])
    np.testing.assert_array_equal(nxt.logprobs[rest], cur.logprobs[rest])


# -------------------------------------------------------------------------------------- MinED map + cache


def test_mined_map_equals_official(mined_build, golden, neox, llama):
    table, _ = mined_build
    with open(golden / "vocab_map_gptneox_to_llama2_ids.json") as f:
        official = np.array(json.load(f))
    assert table.dtype == np.int32 and table.shape == (neox.vocab_size,) == official.shape
    np.testing.assert_array_equal(table, official)


def _refuse_build(src, tgt):
    raise AssertionError("the map was rebuilt although the cache file is valid")


def _no_partials(cache_dir):
    return not list(cache_dir.rglob("*.partial")) and not list(cache_dir.rglob(".*.tmp"))


def test_mined_map_cache_is_loaded(mined_build, neox, llama, monkeypatch):
    table, cache_dir = mined_build
    assert cache_path(neox, llama, "mined", cache_dir).is_file()
    monkeypatch.setitem(vocab_module._BUILDERS, "mined", _refuse_build)
    np.testing.assert_array_equal(vocab_map(neox, llama, "mined", cache_dir=cache_dir), table)
    assert _no_partials(cache_dir)


@pytest.fixture
def cache_copy(mined_build, neox, llama, tmp_path):
    """A private cache dir holding a copy of the valid cache file → (table, cache_dir, path)."""
    table, cache_dir = mined_build
    path = cache_path(neox, llama, "mined", tmp_path)
    path.parent.mkdir(parents=True)
    shutil.copyfile(cache_path(neox, llama, "mined", cache_dir), path)
    return table, tmp_path, path


def test_truncated_cache_is_rebuilt_for_real(cache_copy, neox, llama, monkeypatch, caplog):
    table, cache_dir, path = cache_copy
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    calls = []
    real = vocab_module._BUILDERS["mined"]
    monkeypatch.setitem(vocab_module._BUILDERS, "mined", lambda s, t: calls.append(1) or real(s, t))
    with caplog.at_level(logging.WARNING, logger="fusion_jax.align.vocab"):
        rebuilt = vocab_map(neox, llama, "mined", cache_dir=cache_dir)
    assert calls == [1]
    np.testing.assert_array_equal(rebuilt, table)
    assert any(r.levelno == logging.WARNING and path.name in r.getMessage() and "rebuilding" in r.getMessage()
               for r in caplog.records), caplog.text
    assert _no_partials(cache_dir)
    monkeypatch.setitem(vocab_module._BUILDERS, "mined", _refuse_build)  # the rewritten file is valid
    np.testing.assert_array_equal(vocab_map(neox, llama, "mined", cache_dir=cache_dir), table)


def _write_stale(path, table, neox, llama, **override):
    fields = dict(map=table, method="mined", src_fingerprint=neox.fingerprint, tgt_fingerprint=llama.fingerprint,
                  version=str(vocab_module._FORMAT_VERSION))
    fields.update(override)
    with open(path, "wb") as f:
        np.savez(f, **fields)


STALE = {
    "garbage": ("unreadable", None),
    "src_fingerprint": ("src_fingerprint", lambda t, s, l: dict(src_fingerprint="0" * 64, map=np.zeros_like(t))),
    "tgt_fingerprint": ("tgt_fingerprint", lambda t, s, l: dict(tgt_fingerprint=l.fingerprint[::-1])),
    "method": ("method", lambda t, s, l: dict(method="prefix")),
    "version": ("version", lambda t, s, l: dict(version="0")),
    "dtype": ("int64", lambda t, s, l: dict(map=t.astype(np.int64))),
    "shape": ("expected int32", lambda t, s, l: dict(map=t[:-1])),
    "range": ("ids leave", lambda t, s, l: dict(map=np.full_like(t, l.vocab_size))),
}


@pytest.mark.parametrize("what", list(STALE))
def test_bad_cache_is_rebuilt_with_warning(what, cache_copy, neox, llama, monkeypatch, caplog):
    """Every kind of bad file triggers exactly one rebuild (the builder is stubbed to return the known map, fast;
    the real rebuild is tested above), a warning naming the problem, and a valid file afterwards."""
    table, cache_dir, path = cache_copy
    reason, override = STALE[what]
    if override is None:
        path.write_bytes(b"not a zip file at all")
    else:
        _write_stale(path, table, neox, llama, **override(table, neox, llama))
    calls = []
    monkeypatch.setitem(vocab_module._BUILDERS, "mined", lambda s, t: calls.append(1) or table.copy())
    with caplog.at_level(logging.WARNING, logger="fusion_jax.align.vocab"):
        got = vocab_map(neox, llama, "mined", cache_dir=cache_dir)
    assert calls == [1]
    np.testing.assert_array_equal(got, table)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(path.name in w and reason in w for w in warnings), caplog.text
    assert _no_partials(cache_dir)
    monkeypatch.setitem(vocab_module._BUILDERS, "mined", _refuse_build)
    np.testing.assert_array_equal(vocab_map(neox, llama, "mined", cache_dir=cache_dir), table)


# ---------------------------------------------------------------------------- tiny tokenizers, no assets


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory):
    return load_tokenizer(train_byte_level(tmp_path_factory.mktemp("tiny_bl") / "tokenizer.json"))


@pytest.fixture(scope="module")
def tiny_tgt(tmp_path_factory):
    return load_tokenizer(train_sentencepiece(tmp_path_factory.mktemp("tiny_sp")))


@pytest.fixture(scope="module")
def tiny_mined(tiny_src, tiny_tgt):
    return vocab_map(tiny_src, tiny_tgt, "mined", use_cache=False)


def naive_find_best_mapping(x, base_tokens, blending_special="Ġ", base_special="\u2581"):
    """The official ``vocab_mapping.py::find_best_mapping`` (best_one=True) → (tmp_x, base token)."""
    tmp_x = x.replace(blending_special, base_special)
    if tmp_x in base_tokens:
        return tmp_x, tmp_x
    return tmp_x, min([(y, levenshtein(tmp_x, y)) for y in base_tokens], key=lambda d: d[1])[0]


def naive_transform_step_logits(base_tokens, blending_tokens, base_vocab, logits, indices, blending_pieces,
                                vocab_align_type, mapping):
    """The official ``others.py::transform_step_logits`` on token strings (byte-level blending, ▁ base)
    → (indices, logits, one-hot fallback flag) lists per base position."""
    bs, ss = "\u2581", "Ġ"
    _, _, _, base_to_blending, _ = naive_dtw(
        blending_tokens, base_tokens, norm_func=lambda a, b: levenshtein(a.replace(ss, ""), b.replace(bs, "")))
    out_idx, out_logit, out_fallback = [], [], []
    for i, blending_idx in enumerate(base_to_blending):
        row_logit, row_idx, fallback = [], [], False
        base_token = base_tokens[i]
        if len(blending_idx) == 1:
            j = blending_idx[0]
            blending_token = blending_tokens[j].replace(ss, bs)
            if i == 0 and base_token.startswith(bs) and not blending_token.startswith(bs):
                blending_token = bs + blending_token  # special case for mpt
            if (base_token == blending_token) or (
                vocab_align_type == "soft" and blending_token in mapping and base_token == mapping[blending_token]
            ):
                for logit, index in zip(logits[j], indices[j]):
                    blending_t = blending_pieces[index].replace(ss, bs)
                    if blending_t in base_vocab:
                        aligned = base_vocab[blending_t]
                    elif vocab_align_type == "soft":
                        aligned = base_vocab[mapping[blending_t]]
                    else:
                        continue
                    if aligned not in row_idx:
                        row_idx.append(aligned)
                        row_logit.append(logit)
            else:
                fallback = True
        else:
            fallback = True
        if fallback:
            row_logit.append(1.0)
            row_idx.append(base_vocab[base_token])
        out_idx.append(row_idx)
        out_logit.append(row_logit)
        out_fallback.append(fallback)
    return out_idx, out_logit, out_fallback


class OfficialMapping:
    """The official MinED mapping file as a dict: keyed by the rewritten blending pieces (``Ġ`` → ``▁``), values
    computed on demand with the literal ``find_best_mapping``."""

    def __init__(self, blending_pieces, base_pieces):
        self.keys = {p.replace("Ġ", "\u2581") for p in blending_pieces}
        self.base_pieces, self.memo = base_pieces, {}

    def __contains__(self, key):
        return key in self.keys

    def __getitem__(self, key):
        if key not in self.keys:
            raise KeyError(key)
        if key not in self.memo:
            self.memo[key] = naive_find_best_mapping(key, self.base_pieces, "\u2581", "\u2581")[1]
        return self.memo[key]


def is_subsequence(part, whole) -> bool:
    it = iter(whole)
    return all(any(p == w for w in it) for p in part)


TINY_TEXTS = [
    "the quick brown fox jumps over the lazy dog",
    "hello world, the fusion of language models",
    "numbers 0123 and café naïve",
]


@pytest.mark.parametrize("text", TINY_TEXTS)
def test_tiny_pair_end_to_end(text, tiny_src, tiny_tgt, tiny_mined):
    src, tgt = tiny_src, tiny_tgt
    assert src.kind == "byte_level" and tgt.kind == "sentencepiece"
    src_ids = np.append(src.encode(text).ids, src.pieces.index("<|endoftext|>"))
    tgt_ids = np.append(tgt.encode(text).ids, tgt.pieces.index("</s>"))
    n, m, k = len(src_ids), len(tgt_ids), 6
    rng = np.random.default_rng(len(text))
    tk_ids = np.stack([rng.choice(src.vocab_size, k, replace=False) for _ in range(n)]).astype(np.int32)
    tk_ids[:, 0] = np.append(src_ids[1:], src_ids[-1])  # the true next token leads, as a real teacher's would
    tk_ids[:, 1:] = np.where(tk_ids[:, 1:] == tk_ids[:, :1], (tk_ids[:, 1:] + 1) % src.vocab_size, tk_ids[:, 1:])
    tk_vals = (-np.sort(-rng.standard_normal((n, k)) * 3.0, axis=1)).astype(np.float16)

    # The reference sees only strings: pieces, the base `get_vocab()` and the official MinED mapping.
    base_vocab = {p: i for i, p in enumerate(tgt.pieces)}
    mapping = OfficialMapping(src.pieces, tgt.pieces)
    pair = FuseLLMPair(src, tgt, tiny_mined)
    alignment = pair.align(src_ids, tgt_ids)
    first, count = alignment.tgt_spans(m)
    kinds_seen = set()
    for mode in MODES:
        ref_idx, ref_logit, ref_fallback = naive_transform_step_logits(
            [tgt.pieces[i] for i in tgt_ids], [src.pieces[i] for i in src_ids], base_vocab,
            tk_vals.astype(np.float64).tolist(), tk_ids.tolist(), src.pieces, mode, mapping)
        for target in ("current", "next"):
            rows = pair.transfer(src_ids, tgt_ids, tk_ids, tk_vals, mode, onehot_target=target)
            assert rows.ids.shape == rows.logprobs.shape == (m, k) and rows.kind.shape == (m,)
            counts = rows.counts()
            for i in range(m):
                c = int(counts[i])
                ids, vals = rows.ids[i, :c].tolist(), rows.logprobs[i, :c].tolist()
                where = f"{text!r} {mode} {target} row {i}"
                assert np.all(rows.ids[i, c:] == 0) and np.all(rows.logprobs[i, c:] == -np.inf), where
                assert (rows.kind[i] == ROW_ONEHOT) == ref_fallback[i], where
                if rows.kind[i] == ROW_ONEHOT:
                    expected = tgt_ids[i] if target == "current" or i == m - 1 else tgt_ids[i + 1]
                    assert ids == [int(expected)] and vals == [0.0], where
                    assert ref_idx[i] == [int(tgt_ids[i])] and ref_logit[i] == [1.0], where
                else:
                    assert rows.kind[i] in (ROW_TEACHER, ROW_EMPTY), where
                    assert (rows.kind[i] == ROW_TEACHER) == (c >= 1), where
                    assert all(0 <= t < tgt.vocab_size for t in ids) and len(set(ids)) == c, where
                    assert count[i] == 1, where  # only a one-to-one match transfers a row
                    given_vals = tk_vals[first[i]].astype(np.float32).tolist()
                    assert is_subsequence(vals, given_vals), where
                    assert ids == ref_idx[i], where
                    assert vals == np.float32(ref_logit[i]).tolist(), where
            if mode == "soft":
                assert not np.any(rows.kind == ROW_EMPTY)  # a soft row always keeps its first candidate
            kinds_seen.update(rows.kind.tolist())
    assert {ROW_TEACHER, ROW_ONEHOT} <= kinds_seen  # both row kinds are exercised


def test_tiny_mined_map_matches_naive(tiny_src, tiny_tgt, tiny_mined):
    """Every 5th source id against the literal official find_best_mapping (lowest-id tie break)."""
    for i in range(0, tiny_src.vocab_size, 5):
        _, best = naive_find_best_mapping(tiny_src.pieces[i], tiny_tgt.pieces)
        assert tiny_tgt.pieces[tiny_mined[i]] == best, (i, tiny_src.pieces[i])
        assert tiny_mined[i] == tiny_tgt.pieces.index(best)


# ------------------------------------------------------------------------------------------------- errors


def test_dtw_errors():
    with pytest.raises(ValueError, match="non-empty token sequences, got lengths 0 and 2"):
        dtw([], ["a", "b"])
    with pytest.raises(ValueError, match="non-empty token sequences, got lengths 1 and 0"):
        dtw(["a"], [])
    with pytest.raises(ValueError, match="tie_order must be one of .*'reverse'"):
        dtw(["a"], ["a"], tie_order="reverse")


def test_transfer_errors(tiny_src, tiny_tgt, tiny_mined):
    src, tgt = tiny_src, tiny_tgt
    src_ids, tgt_ids = src.encode("hello world").ids, tgt.encode("hello world").ids
    n = len(src_ids)
    tk_ids, tk_vals = np.zeros((n, 3), np.int32), np.zeros((n, 3), np.float32)
    hard_only = FuseLLMPair(src, tgt)
    with pytest.raises(ValueError, match="vocab_align='soft' needs the MinED map"):
        hard_only.transfer(src_ids, tgt_ids, tk_ids, tk_vals, "soft")
    with pytest.raises(ValueError, match="vocab_align must be one of"):
        hard_only.transfer(src_ids, tgt_ids, tk_ids, tk_vals, "fuzzy")
    with pytest.raises(ValueError, match="onehot_target must be one of"):
        hard_only.transfer(src_ids, tgt_ids, tk_ids, tk_vals, onehot_target="previous")
    with pytest.raises(ValueError, match="tie_order must be one of"):
        hard_only.transfer(src_ids, tgt_ids, tk_ids, tk_vals, tie_order="random")
    bad = tk_ids.copy()
    bad[1, 2] = src.vocab_size
    with pytest.raises(ValueError, match=rf"top-k ids must lie in \[0, {src.vocab_size}\)"):
        hard_only.transfer(src_ids, tgt_ids, bad, tk_vals)
    bad[1, 2] = -1
    with pytest.raises(ValueError, match="top-k ids must lie in"):
        hard_only.transfer(src_ids, tgt_ids, bad, tk_vals)
    with pytest.raises(ValueError, match=rf"top-k rows \({n - 1}\) must match the source tokens \({n}\)"):
        hard_only.transfer(src_ids, tgt_ids, tk_ids[:-1], tk_vals[:-1])
    with pytest.raises(ValueError, match="must both be"):
        hard_only.transfer(src_ids, tgt_ids, tk_ids, tk_vals[:, :2])
    with pytest.raises(ValueError, match=rf"MinED map must be int32\[{src.vocab_size}\]"):
        FuseLLMPair(src, tgt, tiny_mined[:-1])
    with pytest.raises(ValueError, match="MinED map must be"):
        FuseLLMPair(src, tgt, np.stack([tiny_mined, tiny_mined]))
    with pytest.raises(ValueError, match="MinED map must be"):
        FuseLLMPair(src, tgt, np.full_like(tiny_mined, tgt.vocab_size))
    with pytest.raises(ValueError, match="vocab map method must be one of"):
        vocab_map(src, tgt, "closest", use_cache=False)


@pytest.mark.parametrize("vocab_align", ["hard", "soft"])
def test_neg_inf_values_are_pads(tiny_src, tiny_tgt, tiny_mined, vocab_align):
    """Stored rows pad with −inf (DESIGN §3); pads are not candidates, and a row of pads only is empty."""
    pair = FuseLLMPair(tiny_src, tiny_tgt, tiny_mined)
    src_ids, tgt_ids = tiny_src.encode("the").ids, tiny_tgt.encode("the").ids
    assert len(src_ids) == len(tgt_ids) == 1
    cand = int(np.flatnonzero(pair.hard_map >= 0)[0])  # a candidate that survives both hard and soft
    accepted = pair.transfer(src_ids, tgt_ids, [[cand, cand]], [[-1.0, -2.0]], vocab_align)
    assert accepted.kind[0] == ROW_TEACHER  # the pair is accepted, so the pads decide the row
    rows = pair.transfer(src_ids, tgt_ids, [[cand, cand]], [[-np.inf, -np.inf]], vocab_align)
    assert rows.kind[0] == ROW_EMPTY and rows.counts()[0] == 0
    rows = pair.transfer(src_ids, tgt_ids, [[cand, cand]], [[-1.0, -np.inf]], vocab_align)
    assert rows.kind[0] == ROW_TEACHER and rows.counts()[0] == 1 and rows.logprobs[0, 0] == -1.0
