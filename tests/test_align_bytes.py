"""The `bytes` alignment against a naive reference, on random segmentations of the same text."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from fusion_jax.align.bytes import GROUP_KINDS, align_bytes


def naive_groups(src_end, tgt_end):
    """Walk both token lists; close a group whenever both sides sit on the same boundary. A group's kind counts the
    tokens that own bytes (end after the previous token's end)."""
    common = sorted(set(src_end) & set(tgt_end))
    src_group = [next(i for i, b in enumerate(common) if e <= b) for e in src_end]
    tgt_group = [next(i for i, b in enumerate(common) if e <= b) for e in tgt_end]

    def owning(groups, ends, g):
        return sum(1 for i, (h, e) in enumerate(zip(groups, ends)) if h == g and e > (ends[i - 1] if i else 0))

    kinds = []
    for g in range(len(common)):
        ns, nt = owning(src_group, src_end, g), owning(tgt_group, tgt_end, g)
        kinds.append({(True, True): "1:1", (False, True): "n:1", (True, False): "1:n", (False, False): "n:m"}[ns <= 1, nt <= 1])
    return src_group, tgt_group, common, kinds


segmentation = st.integers(1, 60).flatmap(
    lambda total: st.tuples(
        st.just(total),
        st.lists(st.integers(0, total), max_size=40),  # source cuts (repeats = empty-span tokens)
        st.lists(st.integers(0, total), max_size=40),
    )
)


@settings(max_examples=300, deadline=None)
@given(segmentation)
def test_matches_naive_reference(case):
    total, src_cuts, tgt_cuts = case
    src_end = np.array(sorted(src_cuts) + [total])
    tgt_end = np.array(sorted(tgt_cuts) + [total])
    a = align_bytes(src_end, tgt_end)
    src_group, tgt_group, common, kinds = naive_groups(list(src_end), list(tgt_end))
    np.testing.assert_array_equal(a.src_group, src_group)
    np.testing.assert_array_equal(a.tgt_group, tgt_group)
    np.testing.assert_array_equal(a.boundaries, common)
    np.testing.assert_array_equal([GROUP_KINDS[k] for k in a.kind], kinds)
    # Groups are monotone and each covers the same bytes on both sides.
    assert np.all(np.diff(a.src_group) >= 0) and np.all(np.diff(a.tgt_group) >= 0)
    for g in range(a.num_groups):
        assert src_end[a.src_group == g].max() == tgt_end[a.tgt_group == g].max() == a.boundaries[g]


def test_worked_example():
    # "Hello world": source "Hello| world"; target "Hel|lo| wor|ld"
    a = align_bytes([5, 11], [3, 5, 9, 11])
    np.testing.assert_array_equal(a.src_group, [0, 1])
    np.testing.assert_array_equal(a.tgt_group, [0, 0, 1, 1])
    assert [GROUP_KINDS[k] for k in a.kind] == ["1:n", "1:n"]


def test_empty_span_tokens_do_not_change_a_group_kind():
    """EOS after the last word, a SentencePiece leading `▁` with no bytes, BOS: they join a group without making it
    n:m or 1:n (the audit's group statistics count byte-owning tokens)."""
    # "Hello world" + EOS on both sides: source "Hello| world|EOS", target "Hello| world|EOS"
    a = align_bytes([5, 11, 11], [5, 11, 11])
    assert [GROUP_KINDS[k] for k in a.kind] == ["1:1", "1:1"]
    np.testing.assert_array_equal(a.tgt_group, [0, 1, 1])
    # " hi" (starts with whitespace): source "Ġhi"; target SentencePiece "▁" (dummy prefix, empty span) + "▁hi"
    a = align_bytes([3], [0, 3])
    assert [GROUP_KINDS[k] for k in a.kind] == ["1:1"]
    # empty-span tokens on one side only, and at a boundary both have (BOS at 0 on both sides)
    a = align_bytes([0, 2, 5, 5], [0, 5])
    assert [GROUP_KINDS[k] for k in a.kind] == ["1:1", "n:1"]
    a = align_bytes([0, 0, 2, 5], [0, 2, 2, 3, 5, 5])
    assert [GROUP_KINDS[k] for k in a.kind] == ["1:1", "1:1", "1:n"]


def test_rejects_different_texts_and_unsorted_offsets():
    with pytest.raises(ValueError, match="source ends at byte 5, target at byte 6"):
        align_bytes([5], [6])
    with pytest.raises(ValueError, match="non-decreasing"):
        align_bytes([3, 2, 5], [5])


# Real tokenizer pairs (skip with the reason when ../shared is absent).
REAL = ["llama2-tokenizer.model", "mistral-v1-tokenizer.model", "gpt-neox-20b-tokenizer.json", "qwen2-tokenizer.json"]
PAIRS = [(a, b) for a in REAL for b in REAL if a != b]
_loaded: dict = {}


def real_tokenizer(shared_dir, name):
    from fusion_jax.tokenizers import load_tokenizer

    if name not in _loaded:
        _loaded[name] = load_tokenizer(shared_dir / "assets" / "tokenizers" / name)
    return _loaded[name]


# Texts every real tokenizer reproduces: no literal "▁" (SentencePiece reads it as a space) and NFC-normalised
# (GPT-NeoX's normaliser composes), see test_tokenizers.py.
reproducible_text = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=80).map(
    lambda t: __import__("unicodedata").normalize("NFC", t)
)


@pytest.mark.parametrize("src_name, tgt_name", PAIRS, ids=[f"{a.split('-')[0]}->{b.split('-')[0]}" for a, b in PAIRS])
@settings(max_examples=25, deadline=None)
@given(text=reproducible_text)
def test_real_pairs_groups_cover_every_byte_once(shared_dir, src_name, tgt_name, text):
    src, tgt = real_tokenizer(shared_dir, src_name), real_tokenizer(shared_dir, tgt_name)
    s, t = src.encode(text), tgt.encode(text)
    a = align_bytes(s.byte_end, t.byte_end)
    data = text.encode()
    assert np.all(np.diff(a.src_group) >= 0) and np.all(np.diff(a.tgt_group) >= 0)
    starts = np.concatenate([[0], a.boundaries[:-1]])
    # Group spans tile the text, and each side's tokens in a group concatenate to that span's bytes.
    assert b"".join(data[b0:b1] for b0, b1 in zip(starts, a.boundaries)) == data
    # A SentencePiece dummy prefix is one byte the text does not have; it belongs to the first group.
    extra = [len(tok.decode_bytes(e.ids)) - len(data) for tok, e in ((src, s), (tgt, t))]
    for g, (b0, b1) in enumerate(zip(starts, a.boundaries)):
        src_bytes = src.decode_bytes(s.ids[a.src_group == g])[extra[0] if g == 0 else 0 :]
        tgt_bytes = tgt.decode_bytes(t.ids[a.tgt_group == g])[extra[1] if g == 0 else 0 :]
        assert src_bytes == tgt_bytes == data[b0:b1]
