"""Rows inside a source token (fusion_jax.align.continuation): against a naive reference written from the text, and
the oracle agreement they add on a large-vocabulary source → small-vocabulary target pair."""

from __future__ import annotations

import numpy as np
import pytest

from fusion_jax.align.continuation import continuation_tables, inner_rows
from fusion_jax.align.transfer import ROW_TEACHER, transfer_topk, with_next_token
from fusion_jax.align.vocab import canonical_ids_by_bytes, prefix_map
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import CORPUS, train_byte_level, train_sentencepiece

TEXTS = ["the quick brown fox jumps over the lazy dog", "fusion of large language models, hello world",
         "café naïve résumé — déjà vu 0123", "knowledge distillation\tand newlines\n\nend"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A byte-level BPE with a large vocabulary (long tokens) → a small SentencePiece one: many 1:n groups."""
    root = tmp_path_factory.mktemp("continuation")
    src = load_tokenizer(train_byte_level(root / "src.json", vocab_size=600))
    tgt = load_tokenizer(train_sentencepiece(root / "sp", vocab_size=320))
    return src, tgt


def naive_inner(text: str, src, tgt, src_ids, src_end, tgt_end, topk_ids, topk_lp, tgt_ids=None):
    """{target position: {target id: probability}} from the text: for each target end strictly inside a source token
    (after the first), the previous source row's candidates whose bytes extend the bytes emitted inside that token,
    each mapped to the longest target token that is a prefix of its remaining bytes (searched over the whole target
    vocabulary), renormalised. With ``tgt_ids`` (in context) the candidate that is the holding token itself maps to
    the target's next token."""
    data = text.encode("utf-8")
    by_bytes = canonical_ids_by_bytes(tgt)
    out = {}
    for t, e in enumerate(tgt_end):
        starts = [0] + list(src_end[:-1])
        holding = [s for s in range(len(src_ids)) if starts[s] < e < src_end[s]]
        if not holding or holding[0] == 0:
            continue
        s = holding[0]
        emitted = data[starts[s]:e]
        mass = {}
        for c, lp in zip(topk_ids[s - 1], topk_lp[s - 1]):
            b = src.token_bytes[c]
            if src.special[c] or not b.startswith(emitted) or len(b) <= len(emitted):
                continue
            rest = b[len(emitted):]
            hits = [(len(piece), i) for piece, i in by_bytes.items() if rest.startswith(piece)]
            if tgt_ids is not None and c == src_ids[s] and t + 1 < len(tgt_ids):
                hits = [(0, int(tgt_ids[t + 1]))]
            if hits:
                _add(mass, max(hits)[1], lp)
        if mass:
            out[t] = _normalised(mass)
    return out


def _add(mass: dict, target: int, logprob) -> None:
    mass[target] = mass.get(target, 0.0) + float(np.exp(np.float64(logprob)))


def _normalised(mass: dict) -> dict:
    total = sum(mass.values())
    return {i: p / total for i, p in mass.items()}


def naive_matched(text: str, src, tgt, src_ids, src_end, tgt_ids, tgt_end, topk_ids, topk_lp):
    """{target position: {target id: probability}} in context, from the text, for target rows whose next token owns
    bytes: the source row predicting from the same text (the source token ending where target token t ends), its
    candidates mapped to the longest target token that is a prefix of their bytes, except the source's actual next
    token, which maps to the target's actual next token; renormalised."""
    by_bytes = canonical_ids_by_bytes(tgt)
    out = {}
    for t in range(len(tgt_ids) - 1):
        if tgt_end[t + 1] == tgt_end[t]:
            continue
        rows = [s for s in range(len(src_ids) - 1) if src_end[s] == tgt_end[t] and src_end[s + 1] > src_end[s]]
        if not rows:
            continue
        s = rows[0]
        mass = {}
        for c, lp in zip(topk_ids[s], topk_lp[s]):
            b = src.token_bytes[c]
            if c == src_ids[s + 1]:
                target = int(tgt_ids[t + 1])
            else:
                hits = [(len(piece), i) for piece, i in by_bytes.items() if b.startswith(piece)]
                if src.special[c] or not hits:
                    continue
                target = max(hits)[1]
            _add(mass, target, lp)
        if mass:
            out[t] = _normalised(mass)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_in_context_matches_the_naive_reference(pair, seed):
    """Both kinds of rows in context (continuation + in_context) against the text-level references."""
    src, tgt, text, s, t, k, topk, lp = _case(pair, seed, seed + 10)
    rows = transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, prefix_map(src, tgt), k_out=k,
                         continuation=continuation_tables(src, tgt), src_ids=s.ids, in_context=True)
    want = naive_inner(text, src, tgt, list(s.ids), list(s.byte_end), list(t.byte_end), topk, lp, tgt_ids=t.ids)
    matched = naive_matched(text, src, tgt, list(s.ids), list(s.byte_end), t.ids, list(t.byte_end), topk, lp)
    assert matched and not set(matched) & set(want)
    want.update(matched)
    for i, w in want.items():
        assert rows.kind[i] == ROW_TEACHER
        got = {int(a): float(np.exp(b)) for a, b in zip(rows.ids[i], rows.logprobs[i]) if np.isfinite(b)}
        assert got.keys() == w.keys(), i
        np.testing.assert_allclose([got[j] for j in sorted(got)], [w[j] for j in sorted(got)], rtol=1e-5)


def test_in_context_an_always_right_teacher_lands_on_the_next_target_token(pair):
    """The oracle in context: every teacher row puts its mass on the target's actual next token; without it the
    prefix map misses some (where the target cuts the text differently)."""
    src, tgt = pair
    tables, vmap = continuation_tables(src, tgt), prefix_map(src, tgt)
    missed_before = rows_in_context = positions = 0
    for text in CORPUS[:5] + TEXTS:
        s, t = src.encode(text, eos=True), tgt.encode(text, eos=True)
        oid = np.zeros((len(s.ids), 1), np.int32)
        olp = np.full((len(s.ids), 1), -np.inf, np.float32)
        oid[:-1, 0], olp[:-1, 0] = s.ids[1:], 0.0
        for ctx in (True, False):
            rows = transfer_topk(s.byte_end, t.byte_end, t.ids, oid, olp, vmap, continuation=tables, src_ids=s.ids,
                                 in_context=ctx)
            teach = rows.kind[:-1] == ROW_TEACHER
            miss = int((teach & (rows.ids[:-1, 0] != t.ids[1:])).sum())
            if ctx:
                assert miss == 0
                rows_in_context += int(teach.sum())
                positions += len(teach)
            else:
                missed_before += miss
    assert missed_before > 0 and rows_in_context > 0.9 * positions


def _case(pair, text_index: int, seed: int, k: int = 6):
    """(src, tgt, text, source encoding, target encoding, k, top-k ids, top-k log-probs) of TEXTS[text_index]."""
    src, tgt = pair
    text = TEXTS[text_index]
    s, t = src.encode(text, eos=True), tgt.encode(text, eos=True)
    topk, lp = _random_topk(src, s.ids, k, seed)
    return src, tgt, text, s, t, k, topk, lp


def _random_topk(src, s_ids, k, seed):
    rng = np.random.default_rng(seed)
    topk = rng.integers(0, src.vocab_size, size=(len(s_ids), k))
    topk[:-1, 0] = s_ids[1:]  # the actual next token among the candidates
    # candidates that share the actual token's first bytes, so that several survive the prefix check
    logits = np.sort(rng.normal(size=(len(s_ids), k)) * 2, axis=1)[:, ::-1]
    lp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True)) - 0.05
    return topk.astype(np.int32), lp.astype(np.float32)


@pytest.mark.parametrize("seed", range(4))
def test_transfer_with_continuation_matches_the_naive_reference(pair, seed):
    # top-k of the real next token and of other tokens sharing its first bytes (prefix siblings), then random ones
    src, tgt, text, s, t, k, topk, lp = _case(pair, seed, seed)
    siblings = {}
    for i, b in enumerate(src.token_bytes):
        if b and not src.special[i]:
            siblings.setdefault(b[:2], []).append(i)
    for r in range(len(s.ids) - 1):
        sib = [i for i in siblings.get(src.token_bytes[s.ids[r + 1]][:2], []) if i != s.ids[r + 1]]
        topk[r, 1:1 + min(len(sib), 3)] = sib[:3]
    tables = continuation_tables(src, tgt)
    vmap = prefix_map(src, tgt)
    rows = transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, vmap, k_out=k, continuation=tables, src_ids=s.ids)
    plain = transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, vmap, k_out=k)
    want = naive_inner(text, src, tgt, list(s.ids), list(s.byte_end), list(t.byte_end), topk, lp)
    assert want, "the text should have target positions inside source tokens"
    inner, _, _ = inner_rows(s.ids, s.byte_end, t.byte_end, topk, lp, tables)
    for i in range(len(t.ids)):
        if i in want:
            assert rows.kind[i] == ROW_TEACHER and plain.kind[i] != ROW_TEACHER
            got = {int(a): float(np.exp(b)) for a, b in zip(rows.ids[i], rows.logprobs[i]) if np.isfinite(b)}
            assert got.keys() == want[i].keys()
            np.testing.assert_allclose([got[j] for j in sorted(got)], [want[i][j] for j in sorted(got)], rtol=1e-5)
        elif i not in inner:  # not inside a source token: exactly the plain transfer
            assert rows.kind[i] == plain.kind[i]
            np.testing.assert_array_equal(rows.ids[i], plain.ids[i])
            np.testing.assert_array_equal(rows.logprobs[i], plain.logprobs[i])
        else:  # inside, but no candidate continues the emitted bytes: the fallback, as without continuation
            assert rows.kind[i] == plain.kind[i] != ROW_TEACHER


def test_an_always_right_teacher_reaches_more_target_tokens(pair):
    """With the oracle (top-1 = the source's actual next token), positions inside source tokens get rows, and the
    share of positions whose row puts its mass on the target's actual next token goes up."""
    src, tgt = pair
    tables, vmap = continuation_tables(src, tgt), prefix_map(src, tgt)
    rows_with, rows_without, agree_with, agree_without, positions = 0, 0, 0, 0, 0
    for text in CORPUS[:5] + TEXTS:
        s, t = src.encode(text, eos=True), tgt.encode(text, eos=True)
        oid = np.zeros((len(s.ids), 1), np.int32)
        olp = np.full((len(s.ids), 1), -np.inf, np.float32)
        oid[:-1, 0], olp[:-1, 0] = s.ids[1:], 0.0
        with_, without = (transfer_topk(s.byte_end, t.byte_end, t.ids, oid, olp, vmap, continuation=c, src_ids=s.ids)
                          for c in (tables, None))
        teach = with_.kind[:-1] == ROW_TEACHER
        rows_with += int(teach.sum())
        rows_without += int((without.kind[:-1] == ROW_TEACHER).sum())
        agree_with += int((teach & (with_.ids[:-1, 0] == t.ids[1:])).sum())
        agree_without += int(((without.kind[:-1] == ROW_TEACHER) & (without.ids[:-1, 0] == t.ids[1:])).sum())
        positions += len(t.ids) - 1
    # only positions inside a document's first source token (no row before it) stay without a row
    assert rows_with > rows_without + 0.2 * positions and rows_with > 0.9 * positions
    assert agree_with > agree_without + 0.1 * positions


def test_tables(pair):
    src, tgt = pair
    tables = continuation_tables(src, tgt)
    vmap = prefix_map(src, tgt)
    normal = np.flatnonzero(tables.lengths > 0)
    np.testing.assert_array_equal(tables.suffix[normal, 0], vmap[normal])  # j = 0 is the prefix map
    assert (tables.suffix[tables.lengths == 0] == -1).all()
    v = int(np.argmax(tables.lengths))
    b = src.token_bytes[v]
    assert bytes(tables.token_bytes[v, :len(b)]) == b[:tables.token_bytes.shape[1]]
    assert (tables.suffix[v, len(b):] == -1).all()


def test_continuation_needs_the_source_ids(pair):
    src, tgt = pair
    s, t = src.encode("hello world", eos=True), tgt.encode("hello world", eos=True)
    topk, lp = _random_topk(src, s.ids, 3, 0)
    with pytest.raises(ValueError, match="continuation and in_context need src_ids"):
        transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, prefix_map(src, tgt),
                      continuation=continuation_tables(src, tgt))


def test_the_next_token_takes_the_last_place_where_the_top_k_lacks_it(pair):
    """with_next_token by hand; and in a transfer, every teacher row then holds the target's next token, with the
    teacher's own probability of the text's next source token (renormalised with the rest of the row)."""
    src, tgt = pair
    text = TEXTS[1]
    s, t = src.encode(text, eos=True), tgt.encode(text, eos=True)
    n, k = len(s.ids), 4
    rng = np.random.default_rng(0)
    topk = rng.integers(0, src.vocab_size, size=(n, k)).astype(np.int32)
    topk[::2, 0] = np.append(s.ids[1:], 0)[::2]  # every other row has the next token among its top-k already
    lp = np.log(np.sort(rng.dirichlet(np.ones(k + 1), n)[:, :k], axis=1)[:, ::-1]).astype(np.float32)
    nxt_lp = np.append(np.log(rng.uniform(1e-4, 1e-2, n - 1)), np.nan)
    ids, lps = with_next_token(s.ids, topk, lp, nxt_lp)
    for r in range(n):
        has = r < n - 1 and s.ids[r + 1] in topk[r]
        if r == n - 1 or has:
            np.testing.assert_array_equal(ids[r], topk[r])
            np.testing.assert_array_equal(lps[r], lp[r])
        else:
            assert list(ids[r]) == [*topk[r, :-1], s.ids[r + 1]] and lps[r, -1] == np.float32(nxt_lp[r])
    rows = transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, prefix_map(src, tgt), k_out=k,
                         continuation=continuation_tables(src, tgt), src_ids=s.ids, in_context=True,
                         src_next_logprob=nxt_lp)
    teach = np.flatnonzero(rows.kind[:-1] == ROW_TEACHER)
    assert len(teach) > 0.8 * (len(t.ids) - 1)
    for i in teach:
        assert t.ids[i + 1] in rows.ids[i][np.isfinite(rows.logprobs[i])], i


def test_the_tail_goes_to_the_next_token(pair):
    """tail=next_token: at a matched row every candidate keeps the teacher's own probability and the target's next
    token gets the rest (naive reference from the source row); rows inside a source token stay renormalised."""
    src, tgt = pair
    text = TEXTS[0]
    s, t = src.encode(text, eos=True), tgt.encode(text, eos=True)
    n, k = len(s.ids), 4
    rng = np.random.default_rng(3)
    topk = rng.integers(0, src.vocab_size, size=(n, k)).astype(np.int32)
    lp = np.log(np.sort(rng.dirichlet(np.ones(k + 2), n)[:, :k], axis=1)[:, ::-1]).astype(np.float32)
    nxt_lp = np.append(np.log(rng.uniform(1e-3, 1e-2, n - 1)), np.nan)
    vmap, tables = prefix_map(src, tgt), continuation_tables(src, tgt)
    kw = dict(k_out=k + 1, continuation=tables, src_ids=s.ids, in_context=True, src_next_logprob=nxt_lp)
    rows = transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, vmap, tail="next_token", **kw)
    plain = transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, vmap, **kw)
    ids, lps = with_next_token(s.ids, topk, lp, nxt_lp)
    checked = 0
    for i in range(len(t.ids) - 1):
        src_rows = [r for r in range(n - 1) if s.byte_end[r] == t.byte_end[i] and s.byte_end[r + 1] > s.byte_end[r]]
        if t.byte_end[i] not in s.byte_end:  # a row inside a source token: as renormalised
            np.testing.assert_array_equal(rows.logprobs[i], plain.logprobs[i])
            continue
        if not src_rows or t.byte_end[i + 1] == t.byte_end[i]:
            continue
        r = src_rows[0]
        want: dict[int, float] = {}
        p = np.exp(lps[r].astype(np.float64))
        for c, pc in zip(ids[r], p):
            j = int(t.ids[i + 1]) if c == s.ids[r + 1] else int(vmap[c])
            if j >= 0:
                want[j] = want.get(j, 0.0) + pc
        want[int(t.ids[i + 1])] += 1.0 - p.sum()
        total = sum(want.values())
        got = {int(a): float(np.exp(b)) for a, b in zip(rows.ids[i], rows.logprobs[i]) if np.isfinite(b)}
        assert got.keys() == want.keys()
        np.testing.assert_allclose([got[j] for j in sorted(got)], [want[j] / total for j in sorted(got)], rtol=1e-5)
        checked += 1
    assert checked > 5
    with pytest.raises(ValueError, match="tail must be one of"):
        transfer_topk(s.byte_end, t.byte_end, t.ids, topk, lp, vmap, tail="spread", **kw)
