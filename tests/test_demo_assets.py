"""The demo's assets: the stdlib corpus (fusion_jax.experiments.demo.corpus) and the tokenizers trained on it
(fusion_jax.experiments.demo.tokenizers), checked through the project's adapter (fusion_jax.tokenizers)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_jax.experiments.demo.corpus import cut_at_line, stdlib_dir, write_stdlib_corpus
from fusion_jax.experiments.demo.tokenizers import SP_BYTE_PIECES, SP_SPECIALS, min_vocab_size, train_byte_level_bpe, train_sentencepiece_bpe
from fusion_jax.tokenizers import load_tokenizer

BUDGET = 150_000
MAX_DOC = 16_384
VOCAB = {"byte_level": 1024, "byte_level_digits": 768, "sentencepiece": 1024}
# Not in the stdlib corpus: tabs, CRLF, runs of spaces, leading/trailing spaces, NBSP, CJK, emoji,
# and the special tokens' spellings (tokenized as plain text by the adapter).
EXTRA_TEXTS = [
    "def f(x):\n\tif x:\r\n\t\treturn  x  \n",
    " leading space", "  two leading spaces", "trailing   ", " ", "\n", "\t",
    "a\u00a0b 漢字 and an emoji 🙂👍🏽 in a line\n",
    "numbers 3.14159 and 1,000,000\n",
    "<|endoftext|> </s> <s> <unk> <0x41>",
]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corpus")
    summary = write_stdlib_corpus(out, code_bytes=BUDGET, prose_bytes=BUDGET, max_document_bytes=MAX_DOC)
    return out, summary


@pytest.fixture(scope="module")
def texts(corpus) -> list[str]:
    out, _ = corpus
    return [r["text"] for name in ("code", "prose") for r in _read(out / f"{name}.jsonl")]


def _train(style: str, texts: list[str], out: Path) -> Path:
    if style == "sentencepiece":
        return train_sentencepiece_bpe(texts, out, VOCAB[style])
    return train_byte_level_bpe(texts, out, VOCAB[style], split_digits=style == "byte_level_digits")


@pytest.fixture(scope="module")
def tokenizer_dirs(texts, tmp_path_factory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("tokenizers")
    return {style: _train(style, texts, base / style) for style in VOCAB}


# --- corpus -------------------------------------------------------------------------------------------


def test_corpus_is_deterministic(corpus, tmp_path):
    out, summary = corpus
    again = write_stdlib_corpus(tmp_path, code_bytes=BUDGET, prose_bytes=BUDGET, max_document_bytes=MAX_DOC)
    for name in ("code", "prose"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (out / f"{name}.jsonl").read_bytes()
        assert again["domains"][name]["bytes"] == summary["domains"][name]["bytes"]
    assert not list(tmp_path.glob(".*.tmp"))  # temp files renamed away
    other = write_stdlib_corpus(
        tmp_path / "s1", code_bytes=BUDGET, prose_bytes=BUDGET, max_document_bytes=MAX_DOC, seed=1
    )
    assert (tmp_path / "s1" / "code.jsonl").read_bytes() != (out / "code.jsonl").read_bytes()
    assert other["seed"] == 1


def test_corpus_format_and_summary(corpus):
    out, summary = corpus
    root = stdlib_dir()
    assert summary["stdlib"] == str(root) and summary["python_version"] == "%d.%d.%d" % sys.version_info[:3]
    for domain in ("code", "prose"):
        records = _read(out / f"{domain}.jsonl")
        assert records and len({r["id"] for r in records}) == len(records)
        for r in records:
            assert list(r) == ["id", "text", "domain"] and r["domain"] == domain
            assert r["text"].strip() and len(r["text"].encode()) <= MAX_DOC
        stats = summary["domains"][domain]
        assert stats["documents"] == len(records) and not stats["exhausted"]
        assert stats["bytes"] == sum(len(r["text"].encode()) for r in records)
        # Budget reached, overshot by less than one document; hash order, not alphabetical.
        assert BUDGET <= stats["bytes"] < BUDGET + MAX_DOC
        assert [r["id"] for r in records] != sorted(r["id"] for r in records)
    for r in _read(out / "code.jsonl"):
        rel = r["id"].removeprefix("code:")
        assert r["id"].startswith("code:") and not {"test", "tests", "idlelib", "site-packages"} & set(rel.split("/"))
        full = (root / rel).read_bytes().decode("utf-8")  # no newline translation
        # The file itself, or its longest line-aligned prefix within MAX_DOC bytes.
        if r["text"] != full:
            rest = full[len(r["text"]):]
            next_line = rest[: rest.index("\n") + 1] if "\n" in rest else rest
            assert full.startswith(r["text"]) and r["text"].endswith("\n")
            assert len(r["text"].encode()) + len(next_line.encode()) > MAX_DOC
    prose_ids = [r["id"] for r in _read(out / "prose.jsonl")]
    assert all(i.startswith(("prose:topic:", "prose:doc:")) for i in prose_ids)
    assert any(i.startswith("prose:topic:") for i in prose_ids) and any(i.startswith("prose:doc:") for i in prose_ids)


def test_no_file_gives_text_to_both_domains(tmp_path):
    # The whole library (budgets never reached), so that the split itself is checked.
    summary = write_stdlib_corpus(tmp_path, code_bytes=10**10, prose_bytes=10**10, max_document_bytes=2048)
    assert summary["domains"]["code"]["exhausted"] and summary["domains"]["prose"]["exhausted"]
    code = {r["id"].removeprefix("code:") for r in _read(tmp_path / "code.jsonl")}
    prose = _read(tmp_path / "prose.jsonl")
    docs = {r["id"].removeprefix("prose:doc:") for r in prose if r["id"].startswith("prose:doc:")}
    assert len(code) > 100 and len(docs) > 50
    assert not code & docs
    for r in prose:
        assert len(r["text"]) >= 200 or r["id"].startswith("prose:topic:")


def test_cut_at_line():
    assert cut_at_line("ab\ncd\nef", 100) == "ab\ncd\nef"
    assert cut_at_line("ab\ncd\nef", 7) == "ab\ncd\n"
    assert cut_at_line("ab\ncd\nef", 6) == "ab\ncd\n"
    assert cut_at_line("ab\ncd\nef", 5) == "ab\n"
    assert cut_at_line("éééé", 5) == "éé"  # no newline: whole characters only


@pytest.mark.parametrize("arg", ["code_bytes", "prose_bytes", "max_document_bytes"])
def test_corpus_rejects_empty_budgets(tmp_path, arg):
    kwargs = {"code_bytes": 1000, "prose_bytes": 1000, "max_document_bytes": 1000, arg: 0}
    with pytest.raises(ValueError, match=arg):
        write_stdlib_corpus(tmp_path, **kwargs)
    assert not (tmp_path / "code.jsonl").exists()


def test_corpus_names_a_missing_stdlib(tmp_path):
    missing = tmp_path / "no-stdlib-here"
    with pytest.raises(ValueError, match="no-stdlib-here"):
        write_stdlib_corpus(tmp_path, code_bytes=1000, prose_bytes=1000, max_document_bytes=1000, stdlib=missing)


# --- tokenizers ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("style", list(VOCAB))
def test_every_document_round_trips(style, tokenizer_dirs, texts):
    tok = load_tokenizer(tokenizer_dirs[style])
    for text in texts + EXTRA_TEXTS:
        enc = tok.encode(text)  # raises TokenizationError unless the tokens' bytes give the text back
        assert enc.byte_end[-1] == len(text.encode())


@pytest.mark.parametrize("style", list(VOCAB))
def test_vocab_size_kind_and_eos(style, tokenizer_dirs):
    tok = load_tokenizer(tokenizer_dirs[style])
    # Exact: the trainer returns fewer only when the texts run out of pairs to merge (not at 300 KB).
    assert tok.vocab_size == VOCAB[style]
    if style == "sentencepiece":
        assert (tok.kind, tok.dummy_prefix, tok.eos_id) == ("metaspace", True, 2)
    else:
        assert (tok.kind, tok.dummy_prefix, tok.eos_id) == ("byte_level", False, 0)
        assert tok.pieces[0] == "<|endoftext|>" and tok.special[0] and tok.special.sum() == 1
    config = json.loads((tokenizer_dirs[style] / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["eos_token"] == tok.pieces[tok.eos_id]


def test_split_digits(tokenizer_dirs):
    plain, digits = (load_tokenizer(tokenizer_dirs[s]) for s in ("byte_level", "byte_level_digits"))
    pieces = [digits.token_bytes[i] for i in digits.encode("x = 2024 + 1000000").ids]
    assert [p for p in pieces if p.isdigit()] == [c.encode() for c in "20241000000"]
    assert not any(p.isdigit() and len(p) > 1 for p in digits.token_bytes)
    assert any(p.isdigit() and len(p) > 1 for p in plain.token_bytes)


def test_sentencepiece_layout_and_byte_fallback(tokenizer_dirs):
    path = tokenizer_dirs["sentencepiece"]
    tok = load_tokenizer(path)
    assert tok.pieces[:3] == list(SP_SPECIALS) and tok.special[:3].all()
    assert tok.pieces[3:259] == list(SP_BYTE_PIECES) == [f"<0x{b:02X}>" for b in range(256)]
    assert tok.token_bytes[3:259] == [bytes([b]) for b in range(256)] and not tok.special[3:].any()
    cfg = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    # Byte pieces are vocabulary entries of the BPE model, not added tokens.
    assert [(a["id"], a["content"]) for a in cfg["added_tokens"]] == list(enumerate(SP_SPECIALS))
    assert cfg["model"]["byte_fallback"] and cfg["model"]["vocab"]["<0x41>"] == 3 + 0x41
    for char in ("漢", "🙂"):
        assert char not in cfg["model"]["vocab"]
        ids = tok.encode(char).ids.tolist()
        assert ids[0] == cfg["model"]["vocab"]["\u2581"]  # the dummy prefix
        assert ids[1:] == [3 + b for b in char.encode()]
        assert tok.encode(char).byte_end.tolist() == [0, *range(1, len(char.encode()) + 1)]


@pytest.mark.parametrize("style", list(VOCAB))
def test_training_is_deterministic(style, texts, tokenizer_dirs, tmp_path):
    again = _train(style, iter(texts), tmp_path / style)  # any iterable, a generator too
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (again / name).read_bytes() == (tokenizer_dirs[style] / name).read_bytes()


def test_training_is_deterministic_across_processes(corpus, tokenizer_dirs, tmp_path):
    # The library's hash maps are seeded per process (its limit_alphabet tie-breaking differed between runs).
    script = (
        "import json, sys; from pathlib import Path; from fusion_jax.experiments.demo.tokenizers import *\n"
        "d = Path(sys.argv[1]); texts = [json.loads(l)['text'] for n in ('code', 'prose') "
        "for l in (d / f'{n}.jsonl').read_text(encoding='utf-8').splitlines()]\n"
        f"train_sentencepiece_bpe(texts, sys.argv[2], {VOCAB['sentencepiece']})\n"
        f"train_byte_level_bpe(texts, sys.argv[3], {VOCAB['byte_level']})\n"
    )
    sp, bl = tmp_path / "sp", tmp_path / "bl"
    subprocess.run([sys.executable, "-c", script, str(corpus[0]), str(sp), str(bl)], check=True)
    assert (sp / "tokenizer.json").read_bytes() == (tokenizer_dirs["sentencepiece"] / "tokenizer.json").read_bytes()
    assert (bl / "tokenizer.json").read_bytes() == (tokenizer_dirs["byte_level"] / "tokenizer.json").read_bytes()


def test_writes_atomically(tmp_path):
    out = tmp_path / "tok"
    (tmp_path / "tok.partial").mkdir()
    (tmp_path / "tok.partial" / "junk").write_text("left by a crash")
    out.mkdir()
    (out / "stale").write_text("old")
    train_byte_level_bpe(["hello world"] * 10, out, 260)
    assert sorted(p.name for p in out.iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    assert not (tmp_path / "tok.partial").exists()


@pytest.mark.parametrize(
    "style, train", [("byte_level", train_byte_level_bpe), ("sentencepiece", train_sentencepiece_bpe)]
)
def test_too_small_vocab_is_refused(style, train, tmp_path):
    minimum = min_vocab_size(style)
    assert minimum == {"byte_level": 257, "sentencepiece": 260}[style]
    with pytest.raises(ValueError, match=f"minimum is {minimum}"):
        train(["hello world"], tmp_path / "small", minimum - 1)
    assert not (tmp_path / "small").exists() and not (tmp_path / "small.partial").exists()
    tok = load_tokenizer(train(["hello world"] * 10, tmp_path / "ok", minimum))
    assert tok.vocab_size == minimum
    tok.encode(EXTRA_TEXTS[0] + EXTRA_TEXTS[7])


def test_transformers_loads_the_same_tokenizers(tokenizer_dirs, texts):
    from transformers import AutoTokenizer

    sample = texts[0][:2000] + EXTRA_TEXTS[0] + EXTRA_TEXTS[7]
    for style, path in tokenizer_dirs.items():
        ours, hf = load_tokenizer(path), AutoTokenizer.from_pretrained(str(path))
        assert hf.encode(sample, add_special_tokens=False) == ours.encode(sample).ids.tolist()
        assert hf.eos_token_id == ours.eos_id and len(hf) == ours.vocab_size
        assert hf.decode(hf.encode(sample, add_special_tokens=False)) == sample
    sp = AutoTokenizer.from_pretrained(str(tokenizer_dirs["sentencepiece"]))
    assert sp.encode("hello")[0] == sp.bos_token_id == 1  # Llama-2 style: BOS in front with special tokens
