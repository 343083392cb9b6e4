"""The alignment audit (`fusion_jax.align.audit`, `python -m fusion_jax.align audit`): invariants, a naive reference
for the default mode, direct counts of the coverage categories, document cutting, errors, the CLI, and one real pair
(GPT-NeoX → Llama-2) where MinED's known bad mappings must show up."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from fusion_jax.cli import align as audit_cli
from fusion_jax.align.audit import APPROX_NAME, CATEGORIES, MODES, PairReport, audit, audit_pair, load_documents
from fusion_jax.align.bytes import GROUP_KINDS
from fusion_jax.align.vocab import vocab_map
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]

TEXT = (
    "the quick brown fox jumps over the lazy dog\n"
    "numbers 0123456789 and 42, 2024 and tabs\tand newlines\n\n"
    "    indented   with   runs of spaces\n"
    "café naïve résumé — déjà vu; 日本語 text\n"
    "hello world, hello there; the world is big\n"
    "fusion of large language models by knowledge distillation\n"
) * 6


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    bl = train_byte_level(d / "bl.json")
    sp = train_sentencepiece(d / "sp")
    text = d / "text.txt"
    text.write_text(TEXT, encoding="utf-8")
    return {"bl": bl, "sp": sp, "bl_tok": load_tokenizer(bl), "sp_tok": load_tokenizer(sp), "text": text,
            "cache": d / "cache"}


def _check_invariants(r: PairReport) -> None:
    assert sum(r.group_counts.values()) == r.target_tokens
    assert sum(r.groups.values()) == pytest.approx(1.0)
    for mode, s in r.modes.items():
        assert s.positions == r.positions
        assert sum(s.mass.values()) == pytest.approx(1.0), mode
        assert sum(s.counts.values()) == s.positions
        approx = APPROX_NAME[mode]
        assert s.teacher == s.counts["exact"] + s.counts[approx]
        assert s.matched == s.teacher + s.counts["unmapped"]
        assert s.teacher + s.fallback == s.positions
        assert 0.0 <= s.agrees <= s.mass["exact"] + s.mass[approx] + 1e-12
        assert s.coverage["all"].count == s.positions
        for c in CATEGORIES:
            cov = s.coverage[c]
            assert 0.0 <= cov.agrees <= cov.teacher <= 1.0
        counts = [w.count for w in s.worst]
        assert counts == sorted(counts, reverse=True), "worst mappings must be sorted by frequency"
    if "in_context" in r.modes:  # exact = lands on the next target token; rows inside source tokens too
        s = r.modes["in_context"]
        assert s.agrees == pytest.approx(s.mass["exact"])
        if "default" in r.modes:
            assert s.teacher >= r.modes["default"].teacher and s.agrees >= r.modes["default"].agrees


def _direct_coverage(tgt, docs, eos: bool) -> Counter:
    """Count the categories of every next target token by hand, from fresh encodings."""
    eos_id = tgt.eos_id if eos else None
    out = Counter()
    for d in docs:
        e = tgt.encode(d.data)
        ids, ends = list(e.ids), list(e.byte_end)
        if eos_id is not None:
            ids.append(eos_id)
            ends.append(len(d.data))
        for t in range(1, len(ids)):
            b = tgt.token_bytes[ids[t]]
            out["all"] += 1
            out["special"] += bool(tgt.special[ids[t]] or not b or ends[t] == ends[t - 1])
            out["digits"] += any(ch in b"0123456789" for ch in b)
            out["whitespace"] += len(b) >= 2 and all(ch in b" \t\n\r\x0b\x0c" for ch in b)
            out["non_ascii"] += any(ch >= 0x80 for ch in b)
    return out


def _naive_default(src, tgt, docs, pmap, eos: bool) -> tuple[Counter, int]:
    """Default mode by hand: target row t uses the source row that ends at the same byte with the same rank among
    the tokens ending there; the oracle is that row's next source token, sent through the prefix map."""
    s_eos, t_eos = (src.eos_id, tgt.eos_id) if eos else (None, None)
    out, agree = Counter(), 0

    def keyed(ends):
        keys, seen = [], Counter()
        for e in ends:
            keys.append((e, seen[e]))
            seen[e] += 1
        return keys

    for d in docs:
        s, t = src.encode(d.data), tgt.encode(d.data)
        s_ids, s_end = list(s.ids), list(s.byte_end)
        t_ids, t_end = list(t.ids), list(t.byte_end)
        if s_eos is not None:
            s_ids, s_end = s_ids + [s_eos], s_end + [len(d.data)]
            t_ids, t_end = t_ids + [t_eos], t_end + [len(d.data)]
        row_of = {k: i for i, k in enumerate(keyed(s_end))}
        for pos, key in enumerate(keyed(t_end)[:-1]):
            i = row_of.get(key)
            if i is None or i == len(s_ids) - 1:
                out["fallback"] += 1
                continue
            x = s_ids[i + 1]
            j = int(pmap[x])
            if j < 0:
                out["unmapped"] += 1
                continue
            out["exact" if tgt.token_bytes[j] == src.token_bytes[x] else "prefix"] += 1
            agree += j == t_ids[pos + 1]
    return out, agree


@pytest.mark.parametrize("eos", [False, True], ids=["no_eos", "eos"])
@pytest.mark.parametrize("src_name, tgt_name", [("bl", "sp"), ("sp", "bl")])
def test_invariants_naive_default_and_direct_coverage(tiny, src_name, tgt_name, eos):
    src, tgt = tiny[f"{src_name}_tok"], tiny[f"{tgt_name}_tok"]
    docs = load_documents([tiny["text"]], tgt, max_tokens=64)
    assert len(docs) > 3
    r = audit_pair(src, tgt, docs, top=50, eos=eos, cache_dir=tiny["cache"])
    _check_invariants(r)
    assert (r.eos is not None) == eos
    # The pair really differs: not everything is 1:1 and something is lost in each mode.
    assert r.groups["1:1"] < 1.0
    for mode in ("default", "fusellm"):
        assert r.modes[mode].mass["dropped"] > 0 and r.modes[mode].worst
    # in context the oracle always lands on the next target token: only positions without any row drop
    ctx = r.modes["in_context"]
    assert ctx.counts["other"] == ctx.counts["unmapped"] == 0 and ctx.fallback < r.modes["default"].fallback

    # Positions: every target token but the first of each document is some row's next token.
    assert r.positions == sum(len(d.target.ids) - 1 + eos for d in docs)
    assert r.target_tokens == sum(len(d.target.ids) for d in docs)
    assert r.source_tokens == sum(len(src.encode(d.data).ids) for d in docs)
    assert r.bytes == len(TEXT.encode())

    direct = _direct_coverage(tgt, docs, eos)
    for c in CATEGORIES:
        for s in r.modes.values():
            assert s.coverage[c].count == direct[c], c
    assert direct["digits"] and direct["non_ascii"]  # (the tiny vocabularies have no whitespace-run tokens)
    assert (direct["special"] >= len(docs)) == eos

    naive, agree = _naive_default(src, tgt, docs, vocab_map(src, tgt, "prefix", cache_dir=tiny["cache"]), eos)
    d = r.modes["default"]
    assert d.counts == {k: naive[k] for k in ("exact", "prefix", "unmapped", "fallback")}
    assert d.agrees == pytest.approx(agree / r.positions)
    # Worst prefix mappings: lossy only, counts equal to a direct count of those next tokens.
    for w in d.worst:
        assert w.target_id < 0 or (len(tgt.token_bytes[w.target_id]) < len(src.token_bytes[w.source_id]))
        kept = len(tgt.token_bytes[w.target_id]) if w.target_id >= 0 else 0
        assert w.bytes_lost == len(src.token_bytes[w.source_id]) - kept
    assert sum(w.count for w in d.worst) <= d.counts["prefix"] + d.counts["unmapped"]
    f = r.modes["fusellm"]
    for w in f.worst:
        assert w.target_id >= 0 and src.token_bytes[w.source_id] != tgt.token_bytes[w.target_id]


@pytest.mark.parametrize("name", ["bl", "sp"])
def test_same_tokenizer_is_perfect(tiny, name):
    tok = tiny[f"{name}_tok"]
    docs = load_documents([tiny["text"]], tok, max_tokens=64)
    r = audit_pair(tok, tok, docs, eos=False, cache_dir=tiny["cache"])
    _check_invariants(r)
    assert r.groups["1:1"] == 1.0 and r.group_counts["1:1"] == r.target_tokens
    for mode, s in r.modes.items():
        assert s.mass["exact"] == 1.0 and s.agrees == 1.0, mode
        assert s.worst == []
    prefix = next(v for v in r.vocab if v.method == "prefix")
    assert prefix.same + prefix.unmapped == tok.vocab_size
    assert prefix.specials_mapped == 1 and prefix.unmapped == prefix.specials - 1  # EOS → EOS, other specials dropped

    # With EOS appended: both modes map EOS to itself, so the positions predicting EOS (one per document) transfer.
    r = audit_pair(tok, tok, docs, eos=True, cache_dir=tiny["cache"])
    _check_invariants(r)
    assert r.modes["fusellm"].agrees == 1.0
    d = r.modes["default"]
    assert d.counts["unmapped"] == 0 and d.counts["exact"] == r.positions and d.agrees == 1.0
    assert d.coverage["special"].count == len(docs) and d.coverage["special"].teacher == 1.0


def test_group_kinds_count_byte_owning_tokens(tiny, tmp_path):
    """Documents that start with whitespace begin with a SentencePiece `▁` that owns no bytes (the dummy prefix): the
    same tokenizer on both sides is still all 1:1 groups, not a leading n:m (nor 1:n against a byte-level source)."""
    sp, bl = tiny["sp_tok"], tiny["bl_tok"]
    text = tmp_path / "indented.txt"
    text.write_text(" leading space\n  two spaces\n\tand a tab\n", encoding="utf-8")
    docs = load_documents([text], sp, max_tokens=16)
    assert len(docs) == 3 and all(d.data[:1].isspace() for d in docs)
    assert all(d.target.byte_end[0] == 0 for d in docs), "each document must start with a target token of no bytes"
    r = audit_pair(sp, sp, docs, eos=False, cache_dir=tiny["cache"])
    _check_invariants(r)
    assert r.groups["1:1"] == 1.0 and r.group_counts["1:1"] == r.target_tokens
    # " leading space\n": one byte per token on both sides (byte-level `Ġ`,`l`,…; SentencePiece `▁`(no bytes),`▁`,`l`,…)
    first = docs[0]
    src = bl.encode(first.data)
    assert (np.diff(src.byte_end, prepend=0) == 1).all() and len(first.target.ids) == len(src.ids) + 1
    r = audit_pair(bl, sp, [first], eos=False, cache_dir=tiny["cache"])
    _check_invariants(r)
    assert r.group_counts["1:1"] == r.target_tokens


def test_modes_and_audit_entry_point(tiny):
    rep = audit([tiny["bl"]], tiny["sp"], [tiny["text"]], modes=("default",), max_tokens=64, cache_dir=tiny["cache"])
    assert list(rep.pairs[0].modes) == ["default"] and [v.method for v in rep.pairs[0].vocab] == ["prefix"]
    assert rep.documents == len(load_documents([tiny["text"]], tiny["sp_tok"], 64))
    json.dumps(rep.to_json())
    with pytest.raises(ValueError, match="modes"):
        audit_pair(tiny["bl_tok"], tiny["sp_tok"], [], modes=("dtw",))


@pytest.mark.parametrize("name", ["bl", "sp"])
def test_documents_are_whole_lines_within_budget(tiny, tmp_path, name):
    tok = tiny[f"{name}_tok"]
    long_line = "déjà vu 日本語 " * 40  # one line far over the budget: cut inside, on a character boundary
    text = TEXT + long_line + "\nlast line without newline"
    path = tmp_path / "t.txt"
    path.write_bytes(text.encode())
    for max_tokens in (16, 64, 2048):
        docs = load_documents([path], tok, max_tokens=max_tokens)
        assert b"".join(d.data for d in docs) == text.encode()
        assert [d.offset for d in docs] == list(np.cumsum([0] + [len(d.data) for d in docs[:-1]]))
        for d in docs:
            d.data.decode("utf-8")  # every cut is UTF-8 safe
            assert len(d.target.ids) <= max_tokens
            np.testing.assert_array_equal(d.target.ids, tok.encode(d.data).ids)
        data = text.encode()
        for d in docs[:-1]:
            end = d.offset + len(d.data)
            if not d.data.endswith(b"\n"):  # cut inside a line: only when the rest of that line is over the budget
                line_end = data.find(b"\n", end) + 1 or len(data)
                assert len(tok.encode(data[d.offset:line_end]).ids) > max_tokens
        if len(tok.encode(data).ids) <= max_tokens:
            assert len(docs) == 1


def test_input_errors(tiny, tmp_path):
    tok = tiny["sp_tok"]
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nthen \xff\xfe broken\n")
    with pytest.raises(ValueError, match=r"bad\.txt: .*not valid UTF-8: byte offset 15"):
        load_documents([bad], tok)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        load_documents([tmp_path / "missing.txt"], tok)
    empty = tmp_path / "empty.txt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match="no text: .*empty.txt is empty"):
        load_documents([empty], tok)
    assert len(load_documents([empty, tiny["text"]], tok, 64)) == len(load_documents([tiny["text"]], tok, 64))
    with pytest.raises(ValueError, match="max_tokens"):
        load_documents([tiny["text"]], tok, max_tokens=0)
    with pytest.raises(ValueError, match=r"bad\.txt: cannot load the source tokenizer"):
        audit([bad], tiny["sp"], [tiny["text"]])


def test_help_names_the_oracle(capsys):
    with pytest.raises(SystemExit):
        audit_cli.parse(["audit", "--help"])
    out = capsys.readouterr().out
    assert "ORACLE" in out and "not a real model's mass" in out
    cfg = audit_cli.parse(["audit", "--source", "a", "--source", "b", "--target", "t", "--text", "x", "y",
                           "--mode", "fusellm", "--no-eos"])
    assert cfg.sources == ("a", "b") and cfg.texts == ("x", "y") and cfg.modes == ("fusellm",) and not cfg.eos


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fusion_jax.align", "audit", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_cli(tiny, tmp_path):
    out_json = tmp_path / "audit.json"
    p = _run_cli("--source", str(tiny["bl"]), "--source", str(tiny["sp"]), "--target", str(tiny["sp"]),
                 "--text", str(tiny["text"]), "--max-tokens", "64", "--top", "5", "--json", str(out_json),
                 "--cache-dir", str(tiny["cache"]))
    assert p.returncode == 0, p.stderr
    for header in ("NOTE: oracle teacher", "== bl → tok ==", "== tok → tok ==", "target positions by group type",
                   "target rows", "oracle teacher top-1 mass", "vocab maps", "worst prefix mappings",
                   "worst MinED mappings", "coverage by the target's next token"):
        assert header in p.stdout, header
    data = json.loads(out_json.read_text(encoding="utf-8"))
    assert [q["source"] for q in data["pairs"]] == ["bl", "tok"]
    for q in data["pairs"]:
        assert set(q["modes"]) == set(MODES)
        assert set(q["groups"]) == set(GROUP_KINDS)
        for s in q["modes"].values():
            assert sum(s["mass"].values()) == pytest.approx(1.0)
            assert len(s["worst"]) <= 5

    bad = tmp_path / "bad.txt"
    bad.write_bytes("ok é\n".encode() + b"\xc3(\n")
    p = _run_cli("--source", str(tiny["bl"]), "--target", str(tiny["sp"]), "--text", str(bad),
                 "--cache-dir", str(tiny["cache"]))
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in p.stderr, p.stderr
    assert lines[0].startswith("error: ") and "bad.txt" in lines[0] and "byte offset 6" in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Real tokenizers

PARAGRAPH = (
    "The patient had a left ventricular ejection fraction of 35% in 2019.\n"
    "Follow-up on 12 March showed 48 beats per minute.\n"
    "Le café était fermé; naïve déjà-vu, 東京 and Zürich.\n"
    "\n"
    "    def f(x):\n"
    "        return x + 1\n"
)


@pytest.fixture(scope="module")
def real_pair(shared_dir, tmp_path_factory):
    """GPT-NeoX → Llama-2 with both vocab maps built once (MinED takes seconds) in a temporary cache."""
    tok = shared_dir / "assets" / "tokenizers"
    src = load_tokenizer(tok / "gpt-neox-20b-tokenizer.json")
    tgt = load_tokenizer(tok / "llama2-tokenizer.model")
    cache = tmp_path_factory.mktemp("vocab_cache")
    return src, tgt, vocab_map(src, tgt, "prefix", cache_dir=cache), vocab_map(src, tgt, "mined", cache_dir=cache)


def test_real_gpt_neox_to_llama2(real_pair, tmp_path):
    src, tgt, pmap, mined = real_pair
    path = tmp_path / "paragraph.txt"
    path.write_text(PARAGRAPH * 3, encoding="utf-8")
    docs = load_documents([path], tgt, max_tokens=2048)
    r = audit_pair(src, tgt, docs, top=100, prefix_table=pmap, mined_table=mined)
    _check_invariants(r)
    assert r.eos == ("<|endoftext|>", "</s>")

    d, f = r.modes["default"], r.modes["fusellm"]
    assert d.agrees > f.agrees
    assert d.teacher > f.teacher
    # MinED sends a newline prediction to Llama's `▁` (official: `Ċ` → `▁`) whenever one is transferred.
    newline = next(i for i, p in enumerate(src.pieces) if p == "Ċ")
    assert mined[newline] == tgt.pieces.index("▁")
    entry = next((w for w in f.worst if w.source_id == newline), None)
    assert entry is not None and (entry.source_piece, entry.target_piece) == ("Ċ", "▁")
    assert (entry.source, entry.target) == ("'\\n'", "' '")
    # The default (prefix) mode transfers the same predictions exactly: `Ċ` → `<0x0A>`.
    assert all(w.source_id != newline for w in d.worst)
    # Vocab level: MinED maps every special (`<|endoftext|>` → `Context`), the prefix map only EOS → EOS.
    vp, vm = r.vocab
    assert (vp.method, vm.method) == ("prefix", "mined")
    assert vp.specials_mapped == 1 and vm.specials_mapped == vm.specials == int(src.special.sum())
    assert tgt.pieces[mined[src.pieces.index("<|endoftext|>")]] == "Context"
    # Digits: Llama splits them one by one, so GPT-NeoX's multi-digit predictions are transferred by prefix.
    assert any(src.token_bytes[w.source_id].strip().isdigit() and w.bytes_lost > 0 for w in d.worst)
    assert d.coverage["digits"].count > 0 and d.coverage["non_ascii"].count > 0
