"""Corpus readers, the stable split hash, the long-document split rule, the documents store and the prepare stage.

Everything runs on small files written in tmp dirs and on tokenizers trained in the test; the `shared_dir`
tests add the real Llama-2 (SentencePiece) and GPT-NeoX (byte-level BPE) tokenizers.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import pickle
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

from fusion_jax import cli
from fusion_jax.config import loader as config_loader
from fusion_jax.cli import prepare as prepare_cli
from fusion_jax.data import prepare
from fusion_jax.data.corpus import CorpusConfig, CorpusError, Document, read_documents, split_of
from fusion_jax.data.documents import DocumentStore, DocumentWriter, StoreError, write_documents
from fusion_jax.data.splitting import split_long
from fusion_jax.errors import ConfigError
from fusion_jax.tokenizers import TokenizationError, load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]


def read(**kw) -> list[Document]:
    kw["paths"] = tuple(map(str, kw["paths"]))
    return list(read_documents(CorpusConfig(**kw)))


# ------------------------------------------------------------------------------------------------ readers


def test_text_directory(tmp_path, caplog):
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / "b" / "z.txt").write_bytes(b"line one\r\nline two\n")  # exact bytes: no newline translation
    (root / "a.txt").write_text("café 😀", encoding="utf-8")
    (root / "b" / "empty.txt").write_bytes(b"")
    (root / "notes.md").write_text("not matched")
    with caplog.at_level(logging.INFO, logger="fusion_jax.data.corpus"):
        docs = read(format="text", paths=[root], domain="web")
    assert docs == [Document("a.txt", "café 😀", "web"), Document("b/z.txt", "line one\r\nline two\n", "web")]
    assert "2 documents, 1 empty skipped" in caplog.text
    # a custom glob, and a file given directly (id: its name, not where it lies)
    assert [d.id for d in read(format="text", paths=[root], glob="*.md")] == ["notes.md"]
    assert read(format="text", paths=[root / "b" / "z.txt"])[0].id == "z.txt"
    assert [d.id for d in read(format="text", paths=[root], max_documents=1)] == ["a.txt"]


def test_jsonl(tmp_path):
    lines = [
        {"text": "first", "meta": {"pile_set_name": "Wiki"}, "uid": 7},
        None,  # a blank line: skipped, line numbers keep counting
        {"text": "", "meta": {"pile_set_name": "Wiki"}, "uid": 8},
        {"text": "ünï\ncode", "meta": {"pile_set_name": "Code"}, "uid": "x9"},
    ]
    f = tmp_path / "part.jsonl"
    f.write_text("\n".join("" if r is None else json.dumps(r, ensure_ascii=False) for r in lines) + "\n", encoding="utf-8")
    assert read(format="jsonl", paths=[f]) == [Document("part.jsonl:1", "first", "default"),
                                               Document("part.jsonl:4", "ünï\ncode", "default")]
    docs = read(format="jsonl", paths=[f], id_field="uid", domain_field="meta.pile_set_name")
    assert docs == [Document("7", "first", "Wiki"), Document("x9", "ünï\ncode", "Code")]
    # gzip, found in a directory by the default glob (*.jsonl only: .gz needs a glob)
    with gzip.open(tmp_path / "more.jsonl.gz", "wt", encoding="utf-8") as g:
        g.write('{"text": "zipped"}\n')
    assert [d.id for d in read(format="jsonl", paths=[tmp_path])] == ["part.jsonl:1", "part.jsonl:4"]
    assert [(d.id, d.text) for d in read(format="jsonl", paths=[tmp_path], glob="*.gz")] == [("more.jsonl.gz:1", "zipped")]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"content": ["a", "", "b"], "src": ["x", "y", "z"]}), tmp_path / "pq" / "0.parquet")
    pq.write_table(pa.table({"content": pa.array(["ü".encode(), b"c"], pa.binary()), "src": ["y", "x"]}),
                   tmp_path / "pq" / "1.parquet")
    docs = read(format="parquet", paths=[tmp_path / "pq"], text_field="content", domain_field="src")
    assert docs == [Document("0.parquet:0", "a", "x"), Document("0.parquet:2", "b", "z"),
                    Document("1.parquet:0", "ü", "y"), Document("1.parquet:1", "c", "x")]


def test_hf_saved_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    train = datasets.Dataset.from_dict({"text": ["one", "two", ""], "domain": ["a", "b", "a"]})
    dd = datasets.DatasetDict({"train": train, "test": datasets.Dataset.from_dict({"text": ["t"], "domain": ["c"]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    train.save_to_disk(str(tmp_path / "single"))
    assert read(format="hf", paths=[tmp_path / "dd"], domain_field="domain") == [
        Document("train:0", "one", "a"), Document("train:1", "two", "b")]
    assert read(format="hf", paths=[tmp_path / "dd"], split="test") == [Document("test:0", "t", "default")]
    assert [d.text for d in read(format="hf", paths=[tmp_path / "single"])] == ["one", "two"]
    with pytest.raises(CorpusError, match=r"no split 'validation'.*splits: train, test"):
        read(format="hf", paths=[tmp_path / "dd"], split="validation")
    with pytest.raises(CorpusError, match=r"field 'txt' is not in the records; available fields: text, domain"):
        read(format="hf", paths=[tmp_path / "dd"], text_field="txt")


def test_hf_data_files_configs_and_streaming(tmp_path):
    """format hf over local files: the json builder with data_files, a local dataset directory's named
    configurations (README.md `configs:`), and streaming: the same documents as reading the files directly."""
    pytest.importorskip("datasets")
    (tmp_path / "ds").mkdir()
    rows = {"code": [{"text": "def f(): pass", "d": "code"}, {"text": "x = 1", "d": "code"}],
            "prose": [{"text": "Once upon a time.", "d": "prose"}]}
    for name, records in rows.items():
        (tmp_path / "ds" / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "ds" / "README.md").write_text(
        "---\nconfigs:\n- config_name: code\n  data_files: code.jsonl\n- config_name: prose\n"
        "  data_files: prose.jsonl\n---\n")
    files = [str(tmp_path / "ds" / "code.jsonl"), str(tmp_path / "ds" / "prose.jsonl")]
    direct = [d.text for d in read(format="jsonl", paths=files)]
    for streaming in (False, True):
        docs = read(format="hf", paths=["json"], data_files=files, streaming=streaming, domain_field="d")
        assert [d.text for d in docs] == direct and [d.domain for d in docs] == ["code", "code", "prose"]
        prose = read(format="hf", paths=[tmp_path / "ds"], hf_config="prose", streaming=streaming)
        assert [d.text for d in prose] == ["Once upon a time."]
    with pytest.raises(CorpusError, match=r"list them in corpus.data_files"):
        read(format="hf", paths=["json"])
    with pytest.raises(CorpusError, match=r"data_files .*nope.jsonl.* do not exist"):
        read(format="hf", paths=["json"], data_files=[str(tmp_path / "nope.jsonl")])
    with pytest.raises(CorpusError, match=r"nope"):
        read(format="hf", paths=[tmp_path / "ds"], hf_config="nope")
    with pytest.raises(ConfigError, match=r"are for format 'hf'"):
        read(format="jsonl", paths=files, streaming=True)


def test_hf_hub_id_offline(monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CorpusError, match=r"JeanKaddour/minipile: not a local directory, and hub downloads are off"):
        read(format="hf", paths=["JeanKaddour/minipile"])


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    tfds = pytest.importorskip("tensorflow_datasets", reason="tensorflow-datasets is the optional extra [tfds]")
    tfds.disable_progress_bar()
    data_dir = tmp_path_factory.mktemp("tfds")

    with tfds.core.registered.skip_registration():  # read back by name from data_dir, as a user would

        class TinyCorpus(tfds.core.GeneratorBasedBuilder):
            VERSION = tfds.core.Version("1.0.0")

            def _info(self):
                features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "domain": tfds.features.Text()})
                return tfds.core.DatasetInfo(builder=self, features=features)

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(["héllo", "", "wörld"]), "test": self._generate_examples(["t"])}

            def _generate_examples(self, texts):
                for i, t in enumerate(texts):
                    yield i, {"text": t, "domain": f"d{i}"}

        TinyCorpus(data_dir=str(data_dir), file_format="array_record").download_and_prepare()
    return data_dir


def test_tfds(tfds_dir):
    docs = read(format="tfds", paths=["tiny_corpus"], data_dir=str(tfds_dir), domain_field="domain")
    # TFDS stores records in its own (hashed) order: the reader keeps it, ids are positions in it.
    assert sorted((d.text, d.domain) for d in docs) == [("héllo", "d0"), ("wörld", "d2")]
    positions = [int(d.id.removeprefix("train:")) for d in docs]
    assert positions == sorted(positions) and set(positions) < {0, 1, 2}
    assert docs == read(format="tfds", paths=["tiny_corpus"], data_dir=str(tfds_dir), domain_field="domain")
    with pytest.raises(CorpusError, match=r"TFDS dataset 'no_such_corpus' not found in data_dir .*tfds build no_such_corpus"):
        read(format="tfds", paths=["no_such_corpus"], data_dir=str(tfds_dir))
    with pytest.raises(CorpusError, match=r"Unknown split 'validation'"):
        read(format="tfds", paths=["tiny_corpus"], data_dir=str(tfds_dir), split="validation")
    with pytest.raises(CorpusError, match=r"tiny_corpus \(split train\): field 'body' is not in the records; "
                                          r"available fields: domain, text"):
        read(format="tfds", paths=["tiny_corpus"], data_dir=str(tfds_dir), text_field="body")


# ------------------------------------------------------------------------------------------------ reader errors


def test_reader_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope: no such file or directory \(corpus.paths\)"):
        read(format="text", paths=[tmp_path / "nope"])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(CorpusError, match=r"no files match corpus.glob '\*\*/\*.jsonl'"):
        read(format="jsonl", paths=[tmp_path / "empty_dir"])

    bad = tmp_path / "latin1.txt"
    bad.write_bytes("abc naïve".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin1.txt: not valid UTF-8 at byte offset 6 of the file .*iconv"):
        read(format="text", paths=[bad])

    j = tmp_path / "bad.jsonl"
    j.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad.jsonl line 2: not valid UTF-8 at byte offset 28 of the file"):
        read(format="jsonl", paths=[j])
    j.write_text('{"text": "ok", "meta": {"a": 1}}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad.jsonl line 1: field 'body' is not in the records; available fields: "
                                          r"text, meta. Set corpus.text_field"):
        read(format="jsonl", paths=[j], text_field="body")
    with pytest.raises(CorpusError, match=r"field 'meta.b' .* Set corpus.domain_field"):
        read(format="jsonl", paths=[j], domain_field="meta.b")
    j.write_text('{"text": 3}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"line 1: field 'text' holds int 3, not a string"):
        read(format="jsonl", paths=[j])
    j.write_text('{"text": "a\\ud800b"}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"not valid UTF-8: byte offset 1 of the text holds an unpaired surrogate"):
        read(format="jsonl", paths=[j])
    j.write_text('{"text": "a"\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"line 1: not valid JSON"):
        read(format="jsonl", paths=[j])
    j.write_text('{"text": "a", "id": 1}\n{"text": "b", "id": 1}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"line 2: duplicate document id '1'"):
        read(format="jsonl", paths=[j], id_field="id")

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": pa.array([b"ok", b"x\xff"], pa.binary())}), tmp_path / "b.parquet")
    with pytest.raises(CorpusError, match=r"b.parquet row 1: not valid UTF-8 at byte offset 1 of the text"):
        read(format="parquet", paths=[tmp_path / "b.parquet"])
    with pytest.raises(CorpusError, match=r"b.parquet: field 'body' is not in the records; available fields: text"):
        read(format="parquet", paths=[tmp_path / "b.parquet"], text_field="body")

    with pytest.raises(ValueError, match="paths is required"):
        read(format="jsonl", paths=[])
    with pytest.raises(ValueError, match="reads one dataset"):
        read(format="hf", paths=["a", "b"])


def test_corpus_config_from_yaml():
    cfg = config_loader.from_dict(CorpusConfig, {"format": "parquet", "paths": ["x"], "domain_field": "src"})
    assert cfg == CorpusConfig(format="parquet", paths=("x",), domain_field="src")
    with pytest.raises(config_loader.ConfigError, match="invalid choice 'csv'"):
        config_loader.from_dict(CorpusConfig, {"format": "csv", "paths": ["x"]})


# ------------------------------------------------------------------------------------------------ split_of


def test_split_of_pinned_and_stable():
    def reference(doc_id: str, fraction: float) -> str:
        u = int(hashlib.sha256(doc_id.encode()).hexdigest()[:16], 16) / 2**64
        return "validation" if u < fraction else "train"

    # u = sha256(id)[:8] / 2**64 for these ids, computed once with hashlib and pinned
    pinned = {"doc1.txt": 0.0028525, "doc101.txt": 0.0265367, "a.txt": 0.0965545, "é#3": 0.2340199,
              "part.jsonl:1": 0.2640585, "train:0": 0.4100433}
    for doc_id, u in pinned.items():
        assert int(hashlib.sha256(doc_id.encode()).hexdigest()[:16], 16) / 2**64 == pytest.approx(u, abs=1e-7)
        for fraction in (0.0, 0.001, 0.01, 0.02, 0.05, 0.25, 0.3, 0.5, 0.99, 1.0):
            assert split_of(doc_id, fraction) == reference(doc_id, fraction)
    assert [split_of(i, 0.1) for i in pinned] == ["validation", "validation", "validation", "train", "train", "train"]
    assert [split_of(i, 0.01) for i in pinned] == ["validation", "train", "train", "train", "train", "train"]
    ids = [f"doc{i}.txt" for i in range(20000)]
    share = sum(split_of(i, 0.1) == "validation" for i in ids) / len(ids)
    assert abs(share - 0.1) < 0.01
    # independent of the process (Python's own hash is salted per process)
    code = "from fusion_jax.data.corpus import split_of; print([split_of(f'doc{i}.txt', 0.1) for i in range(50)])"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.strip() == str([split_of(f"doc{i}.txt", 0.1) for i in range(50)])
    with pytest.raises(ValueError, match="validation_fraction"):
        split_of("a", 1.5)


# ------------------------------------------------------------------------------------------------ split_long


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tokenizers import normalizers

    d = tmp_path_factory.mktemp("tok")
    return {
        "bl": train_byte_level(d / "bl.json"),
        "sp": train_sentencepiece(d / "sp"),
        "nfc": train_byte_level(d / "nfc.json", normalizer=normalizers.NFC()),
    }


@pytest.fixture(scope="module")
def toks(tiny):
    return {k: load_tokenizer(v) for k, v in tiny.items()}


def naive_split(text: str, tokenizers, max_tokens: int) -> list[str]:
    """The rule spelled out with other primitives: prefix decodes for the cuts, trial decoding for characters."""
    data = text.encode()
    encs = [t.encode(text).ids for t in tokenizers]
    counts = [len(e) for e in encs]
    if max(counts) <= max_tokens:
        return [text]
    j = counts.index(max(counts))
    tok, ids = tokenizers[j], encs[j]
    shift = len(tok.decode_bytes(ids)) - len(data)  # the dummy-prefix space

    def is_char_start(c):
        try:
            data[:c].decode()
            return True
        except UnicodeDecodeError:
            return False

    cuts, prev = [], 0
    for k in range(max_tokens, len(ids), max_tokens):
        c = max(len(tok.decode_bytes(ids[:k])) - shift, 0)
        while not is_char_start(c):
            c -= 1
        if c <= prev:
            c = prev + 1
            while not is_char_start(c):
                c += 1
        if c >= len(data):
            break
        cuts.append(c)
        prev = c
    bounds = [0, *cuts, len(data)]
    return [p for a, b in zip(bounds, bounds[1:]) for p in naive_split(data[a:b].decode(), tokenizers, max_tokens)]


TEXT = ("Knowledge fusion of LLMs: café naïve résumé — 中文字符 and 😀🎉 emoji; "
        "the quick brown fox jumps over the lazy dog.\n\n  Indented\tline 0123456789 ") * 6


def check_pieces(doc, pieces, tokenizers, max_tokens):
    assert "".join(p.text for p in pieces) == doc.text
    assert all(p.text and p.domain == doc.domain for p in pieces)
    if len(pieces) > 1:
        assert [p.id for p in pieces] == [f"{doc.id}#{i}" for i in range(len(pieces))]
    for p in pieces:
        assert max(len(t.encode(p.text).ids) for t in tokenizers) <= max_tokens


@pytest.mark.parametrize("names", [("bl",), ("sp",), ("bl", "sp"), ("sp", "bl")])
@pytest.mark.parametrize("max_tokens", [5, 7, 16, 33, 100, 10_000])
def test_split_long_matches_naive(toks, names, max_tokens):
    tokenizers = [toks[n] for n in names]
    doc = Document("d", TEXT, "web")
    pieces = split_long(doc, tokenizers, max_tokens)
    check_pieces(doc, pieces, tokenizers, max_tokens)
    assert [p.text for p in pieces] == naive_split(TEXT, tokenizers, max_tokens)
    if max_tokens == 10_000:
        assert pieces == [doc] and pieces[0] is doc


def test_split_long_cuts_inside_characters(toks):
    """Byte-level BPE ends tokens inside multi-byte characters; the cuts must move back to the character start."""
    data = TEXT.encode()
    byte_end = toks["bl"].encode(TEXT).byte_end
    inside = [m for m in (5, 7, 16, 33) if any(data[e] & 0xC0 == 0x80 for e in byte_end[m - 1:-1:m])]
    assert inside, "the test text should make some token-count cut land inside a character"
    for m in inside:
        pieces = split_long(Document("d", TEXT, "x"), [toks["bl"]], m)
        assert all(p.text.encode().decode() == p.text for p in pieces)
        assert "".join(p.text for p in pieces) == TEXT


def test_split_long_edge_cases(toks):
    short = Document("s", "tiny", "x")
    assert split_long(short, [toks["bl"], toks["sp"]], 5)[0] is short
    with pytest.raises(ValueError, match=r"the character at byte \d+ alone takes 4 tokens"):
        split_long(Document("e", "ab😀", "x"), [toks["bl"]], 3)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        split_long(short, [toks["bl"]], 0)


def test_split_long_real_tokenizers(shared_dir):
    tokenizers = [load_tokenizer(shared_dir / "assets/tokenizers/llama2-tokenizer.model"),
                  load_tokenizer(shared_dir / "assets/tokenizers/gpt-neox-20b-tokenizer.json")]
    doc = Document("real", TEXT + " Ünïcödé ﬁ ligature, Ελληνικά, русский, العربية, 日本語のテキスト。" * 4, "web")
    for max_tokens in (9, 64, 200):
        pieces = split_long(doc, tokenizers, max_tokens)
        check_pieces(doc, pieces, tokenizers, max_tokens)
        assert [p.text for p in pieces] == naive_split(doc.text, tokenizers, max_tokens)


# ------------------------------------------------------------------------------------------------ store


DOCS = [Document(f"d{i}", t, dom) for i, (t, dom) in enumerate(
    [("alpha", "web"), ("β-gamma 😀", "code"), ("delta\n", "web"), ("εψιλον", "wiki")])]


def fingerprint(docs) -> str:
    h = hashlib.sha256(b"fusion_jax.documents.v1\0")
    for d in docs:
        rec = json.dumps({"id": d.id, "text": d.text, "domain": d.domain}, ensure_ascii=False, separators=(",", ":")).encode()
        h.update(len(rec).to_bytes(8, "little") + rec)
    return h.hexdigest()


def test_store_round_trip(tmp_path):
    meta = write_documents(tmp_path / "docs", DOCS[:3], DOCS[3:], {"prepare": {"max_tokens": 7}})
    assert sorted(p.name for p in (tmp_path / "docs").iterdir()) == ["documents.json", "train.array_record",
                                                                     "validation.array_record"]
    assert not (tmp_path / "docs.partial").exists()
    on_disk = json.loads((tmp_path / "docs" / "documents.json").read_text())
    assert on_disk == meta and meta["prepare"] == {"max_tokens": 7} and meta["version"] == 1
    assert meta["splits"]["train"]["documents"] == 3
    assert meta["splits"]["train"]["bytes"] == sum(len(d.text.encode()) for d in DOCS[:3])
    assert meta["splits"]["train"]["domains"] == {"code": {"documents": 1, "bytes": 13}, "web": {"documents": 2, "bytes": 11}}
    assert meta["splits"]["validation"]["domains"] == {"wiki": {"documents": 1, "bytes": 12}}

    train, val = DocumentStore(tmp_path / "docs", "train"), DocumentStore(tmp_path / "docs", "validation")
    assert len(train) == 3 and len(val) == 1
    assert [train[i] for i in range(3)] == DOCS[:3] and list(train) == DOCS[:3] and val[0] == DOCS[3]
    assert train[-1] == DOCS[2] and train.__getitems__([2, 0]) == [DOCS[2], DOCS[0]]
    with pytest.raises(IndexError):
        train[3]
    assert train.fingerprint == fingerprint(DOCS[:3]) and val.fingerprint == fingerprint(DOCS[3:])
    assert train.meta == meta
    train.verify()
    clone = pickle.loads(pickle.dumps(train))  # as a grain worker gets it: the file is opened again, lazily
    assert clone._reader is None and clone[1] == DOCS[1] and len(clone) == 3

    empty = write_documents(tmp_path / "empty", [], [], {})
    assert empty["splits"]["train"]["documents"] == 0 and list(DocumentStore(tmp_path / "empty")) == []


def test_store_errors_and_overwrite(tmp_path):
    out = tmp_path / "docs"
    with pytest.raises(FileNotFoundError, match="no documents store here; create it with python -m fusion_jax.prepare"):
        DocumentStore(out)
    write_documents(out, DOCS[:1], [], {})
    with pytest.raises(StoreError, match=r"already exists \(a documents store\).*overwrite=true"):
        write_documents(out, DOCS, [], {})
    assert len(DocumentStore(out)) == 1  # kept
    (tmp_path / "docs.partial").mkdir()  # a leftover from a killed run
    (tmp_path / "docs.partial" / "junk").write_text("x")
    write_documents(out, DOCS, [], {}, overwrite=True)
    assert len(DocumentStore(out)) == 4 and not (tmp_path / "docs.partial").exists()

    # an exception while writing leaves neither the output nor the partial directory
    with pytest.raises(RuntimeError):
        with DocumentWriter(tmp_path / "boom", {}) as w:
            w.add(DOCS[0], "train")
            raise RuntimeError("reader failed")
    assert not (tmp_path / "boom").exists() and not (tmp_path / "boom.partial").exists()

    other = tmp_path / "other"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(StoreError, match="is not a documents store .*refusing to replace it"):
        write_documents(other, DOCS, [], {}, overwrite=True)
    assert (other / "precious.txt").read_text() == "keep me"
    with pytest.raises(StoreError, match=r"incomplete documents store \(no documents.json\)"):
        DocumentStore(other)

    (out / "validation.array_record").unlink()
    with pytest.raises(StoreError, match=r"validation.array_record is missing"):
        DocumentStore(out, "validation")
    meta = json.loads((out / "documents.json").read_text())
    meta["splits"]["train"]["documents"] = 5
    (out / "documents.json").write_text(json.dumps(meta))
    with pytest.raises(StoreError, match="holds 4 records, documents.json says 5"):
        DocumentStore(out, "train")


# ------------------------------------------------------------------------------------------------ prepare


def corpus_file(tmp_path) -> Path:
    rows = [{"text": f"{i}: {TEXT[: 40 + 37 * i]}", "src": "ab"[i % 2]} for i in range(12)]
    rows.insert(3, {"text": "", "src": "a"})
    f = tmp_path / "corpus.jsonl"
    f.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return f


def prepare_config(tmp_path, tiny, **kw) -> prepare.PrepareConfig:
    data = {"corpus": {"format": "jsonl", "paths": [str(corpus_file(tmp_path))], "domain_field": "src"},
            "tokenizers": [str(tiny["bl"]), str(tiny["sp"])], "max_tokens": 40, "validation_fraction": 0.25,
            "output": str(tmp_path / "docs"), **kw}
    return config_loader.from_dict(prepare.PrepareConfig, data)


def test_prepare_end_to_end(tmp_path, tiny, toks, caplog):
    cfg = prepare_config(tmp_path, tiny)
    with caplog.at_level(logging.INFO):
        meta = prepare.main(cfg)
    assert "prepare: 12 documents read;" in caplog.text and "1 empty skipped" in caplog.text
    originals = read(format="jsonl", paths=[tmp_path / "corpus.jsonl"], domain_field="src")
    stores = {s: list(DocumentStore(cfg.output, s)) for s in ("train", "validation")}
    for s, docs in stores.items():
        assert meta["splits"][s]["documents"] == len(docs)
    assert 0 < len({d.id.split("#")[0] for d in stores["validation"]}) < len(originals)
    n_split = 0
    for doc in originals:
        split = split_of(doc.id, 0.25)
        pieces = [p for p in stores[split] if p.id == doc.id or p.id.startswith(doc.id + "#")]
        expected = split_long(doc, [toks["bl"], toks["sp"]], 40)
        assert pieces == expected
        check_pieces(doc, pieces, [toks["bl"], toks["sp"]], 40)
        n_split += len(pieces) > 1
    assert n_split >= 6
    assert meta["tokenizers"] == [{"path": str(tiny[k]), "name": toks[k].name, "fingerprint": toks[k].fingerprint}
                                  for k in ("bl", "sp")]
    assert meta["prepare"]["max_tokens"] == 40 and meta["prepare"]["corpus"]["domain_field"] == "src"
    assert set(meta["splits"]["train"]["domains"]) == {"a", "b"}

    # the existing store is kept unless overwrite; workers give the same store
    with pytest.raises(StoreError, match="already exists"):
        prepare.main(cfg)
    again = prepare.main(prepare_config(tmp_path, tiny, overwrite=True, workers=2))
    assert again["splits"] == meta["splits"]


def test_prepare_normalization(tmp_path, tiny):
    decomposed = unicodedata.normalize("NFD", "café résumé déjà vu")
    f = tmp_path / "nfd.jsonl"
    f.write_text(json.dumps({"text": decomposed}) + "\n" + json.dumps({"text": "plain"}) + "\n", encoding="utf-8")
    base = {"corpus": {"paths": [str(f)]}, "tokenizers": [str(tiny["nfc"])], "output": str(tmp_path / "o"),
            "validation_fraction": 0.0}
    with pytest.raises(TokenizationError, match=r"document 'nfd.jsonl:1': .*Set normalize=nfc"):
        prepare.main(config_loader.from_dict(prepare.PrepareConfig, {**base, "normalize": "none"}))
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()
    skipped = prepare.main(config_loader.from_dict(
        prepare.PrepareConfig, {**base, "normalize": "none", "on_tokenization_error": "skip"}))
    assert skipped["splits"]["train"]["documents"] == 1
    meta = prepare.main(config_loader.from_dict(prepare.PrepareConfig, {**base, "overwrite": True}))
    assert meta["splits"]["train"]["documents"] == 2
    assert DocumentStore(tmp_path / "o")[0].text == unicodedata.normalize("NFC", decomposed)


def test_prepare_cli(tmp_path, tiny):
    cfg_file = tmp_path / "prepare.yaml"
    cfg_file.write_text(
        f"corpus:\n  format: jsonl\n  paths: [{corpus_file(tmp_path)}]\n"
        f"tokenizers: [{tiny['bl']}, {tiny['sp']}]\noutput: {tmp_path / 'docs'}\n", encoding="utf-8")
    p = subprocess.run([sys.executable, "-m", "fusion_jax.prepare", "--config", str(cfg_file), "--set", "max_tokens=30",
                        "--set", "corpus.max_documents=5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "prepare: 5 documents read;" in p.stderr
    meta = DocumentStore(tmp_path / "docs").meta
    assert meta["prepare"]["max_tokens"] == 30 and meta["prepare"]["corpus"]["max_documents"] == 5
    # configuration errors end in one line (checked in process: the same entry point)
    with pytest.raises(SystemExit, match="error: .*tokenizers is required"):
        cli.run(prepare.main, lambda: prepare_cli.parse(["--config", str(cfg_file), "--set", "tokenizers=[]"]))
    with pytest.raises(SystemExit, match=r"error: corpus: paths is required"):
        cli.run(prepare.main, lambda: prepare_cli.parse(["--config", str(cfg_file), "--set", "corpus.paths=[]"]))
    with pytest.raises(SystemExit, match="error: .*already exists"):
        cli.run(prepare.main, lambda: prepare_cli.parse(["--config", str(cfg_file)]))
