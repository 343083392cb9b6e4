"""Bad inputs a user can give (issue 12, items 10 and 11: config and data inputs), one case each: every one is refused
before any work is done, in one `error: …` line (or one exception) that names the file, key or path and the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fusion_jax import cli
from fusion_jax.config import loader as config_loader
from fusion_jax.config.loader import ConfigError
from fusion_jax.data.corpus import CorpusConfig, CorpusError, Document, read_documents
from fusion_jax.data.documents import StoreError, read_meta, write_documents
from fusion_jax.data.splitting import split_long
from fusion_jax.tokenizers import load_tokenizer
from tiny_tokenizers import train_byte_level, train_sentencepiece

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "JAX_PLATFORMS": "cpu"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    return {"bl": train_byte_level(d / "bl.json"), "sp": train_sentencepiece(d / "sp")}


def train_config(*overrides: str, path: str | None = None):
    from fusion_jax.config.schema import TrainConfig

    return config_loader.load(TrainConfig, path, ["target=t", "data.documents=d", *overrides])


def last_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


# ------------------------------------------------------------------------------------------------ config files


def test_a_section_given_twice_names_the_key_the_file_and_both_lines(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("target: t\ntrain:\n  steps: 5\ndata:\n  documents: d\ntrain:\n  log_every: 3\n")
    with pytest.raises(ConfigError) as e:
        train_config(path=str(f))
    assert str(e.value).startswith(f"{f}: key 'train' is given twice (line 2 and line 6)")
    assert "merge the two" in str(e.value)


def test_a_key_given_twice_in_one_mapping(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("train:\n  steps: 5\n  log_every: 1\n  steps: 6\n")
    with pytest.raises(ConfigError, match=r"key 'train.steps' is given twice \(line 2 and line 4\)"):
        train_config(path=str(f))
    f.write_text("sources:\n  - {name: a, checkpoint: b, name: c}\n")
    with pytest.raises(ConfigError, match=r"key 'sources\[0\].name' is given twice \(line 2, columns 6 and 30\)"):
        train_config(path=str(f))
    with pytest.raises(ConfigError, match=r"--set sources=.*: key 'sources\[0\].name' is given twice"):
        train_config("sources=[{name: a, checkpoint: b, name: c}]")
    # a merge key (`<<: *base`) is not a repetition: explicit keys still override merged ones
    f.write_text("a: &b {steps: 5, log_every: 1}\ntrain:\n  <<: *b\n  steps: 7\n")
    assert config_loader._read_yaml(str(f))["train"] == {"steps": 7, "log_every": 1}


def test_invalid_utf8_in_a_config_names_the_file_and_byte_offset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_bytes(b"train:\n  steps: 5  # caf\xe9\n")
    with pytest.raises(ConfigError) as e:
        train_config(path=str(f))
    assert str(e.value) == (f"{f}: not valid UTF-8 at byte offset 24 (line 2: b'\\xe9\\n', invalid continuation byte); "
                            "save the file as UTF-8")


# ------------------------------------------------------------------------------------------------ counts and ranges


@pytest.mark.parametrize("override, allowed", [
    ("train.steps=-3", ">= 1"),
    ("train.steps=0", ">= 1"),
    ("train.checkpoint_every=0", ">= 1"),  # was a ZeroDivisionError after capture and compile
    ("train.log_every=0", ">= 1"),  # the same
    ("train.keep_checkpoints=0", ">= 1"),
    ("train.eval_every=-1", ">= 0"),
    ("train.eval_batches=-1", ">= 0"),
    ("train.eval_documents=-2", ">= 0"),
    ("train.peak_flops=-1", ">= 0"),
    ("capture.k=0", "in [1, 255]"),
    ("capture.k=256", "in [1, 255]"),
    ("capture.seq_len=0", ">= 2"),
    ("capture.batch_size=0", ">= 1"),
    ("capture.docs_per_shard=0", ">= 1"),
    ("data.max_tokens=0", ">= 1"),
    ("data.validation_fraction=1", "in [0, 1)"),
    ("data.validation_fraction=-0.1", "in [0, 1)"),
    ("data.corpus.max_documents=-1", ">= 0"),
    ("optimizer.accumulation=0", ">= 1"),
    ("optimizer.learning_rate=0", "> 0"),
    ("optimizer.learning_rate=-1e-5", "> 0"),
    ("optimizer.learning_rate=.inf", "> 0"),
    ("optimizer.warmup_ratio=1", "in [0, 1)"),
    ("optimizer.b2=1", "in [0, 1)"),
    ("optimizer.eps=.nan", "> 0"),
    ("optimizer.grad_clip=-1", ">= 0"),
    ("loader.seq_len=0", ">= 1"),
    ("loader.global_batch_size=0", ">= 1"),
    ("loader.k=0", ">= 1"),
    ("loader.worker_count=-1", ">= 0"),
    ("fusion.temperature=0", "> 0"),
    ("fusion.teacher_temperature=-1", "> 0"),
    ("loss.lm_weight=1.5", "in [0, 1]"),
    ("loss.chunk_size=-1", ">= 0"),
    ("mesh.process_id=-1", ">= 0"),
    ("demo.code.steps=0", ">= 1"),
])
def test_counts_and_intervals_are_checked_at_load(override, allowed):
    key, _, value = override.partition("=")
    with pytest.raises(ConfigError) as e:
        train_config(override)
    assert str(e.value).startswith(f"{key}: must be {allowed}, got ")
    assert f"(in --set {override})" in str(e.value)


def test_a_range_covers_each_item_of_a_list(tmp_path):
    with pytest.raises(ConfigError, match=r"^fusion.teacher_weights\[1\]: must be >= 0, got -1.0 \(in --set "):
        train_config("fusion.teacher_weights=[1, -1]")
    f = tmp_path / "run.yaml"
    f.write_text("sources:\n  - {name: a, checkpoint: b, seq_len: -4}\n")
    with pytest.raises(ConfigError, match=rf"^sources\[0\].seq_len: must be >= 0, got -4 \(in {f}\)"):
        train_config(path=str(f))


@pytest.mark.parametrize("command, override, message", [
    ("prepare", "workers=-1", "workers: must be >= 0"),
    ("prepare", "max_tokens=0", "max_tokens: must be >= 1"),
    ("capture", "docs_per_shard=0", "docs_per_shard: must be >= 1"),
    ("evaluate", "logits_chunk=0", "logits_chunk: must be >= 1"),
    ("forward", "model.norm_eps=-1", "model.norm_eps: must be >= 0"),
    ("forward", "model.head_dim=0", "model.head_dim: must be >= 1"),
])
def test_every_command_checks_ranges(command, override, message):
    import importlib

    module = importlib.import_module(f"fusion_jax.cli.{command}")
    with pytest.raises(SystemExit) as e:
        cli.run(lambda cfg: pytest.fail("main ran"), lambda: module.parse(["--set", override]))
    assert str(e.value).startswith(f"error: {message}, got ")


def test_import_fusellm_checks_docs_per_shard(capsys):
    from fusion_jax.cli import import_fusellm

    with pytest.raises(SystemExit) as e:
        cli.run(lambda cfg: pytest.fail("main ran"),
                lambda: import_fusellm.parse(["ds", "out", "--tokenizer", "tok", "--docs-per-shard", "0"]))
    assert str(e.value).startswith("error: docs_per_shard: must be >= 1, got 0")


@pytest.mark.parametrize("override, choices", [
    ("sources=[{name: a, checkpoint: b, align: dtw}]", "'bytes', 'fusellm'"),
    ("sources=[{name: a, checkpoint: b, vocab_map: mined}]", "'prefix', 'exact', 'identity'"),
    ("sources=[{name: a, checkpoint: b, fallback: none}]", "'onehot_next', 'mask'"),
    ("sources=[{name: a, checkpoint: b, vocab_align: medium}]", "'hard', 'soft'"),
    ("sources=[{name: a, checkpoint: b, onehot_target: prev}]", "'current', 'next'"),
    ("sources=[{name: a, checkpoint: b, tie_order: fusechat}]", "'official', 'fusechat_v2'"),
    ("sources=[{name: a, checkpoint: b, mode: live}]", "'cached', 'online'"),
    ("target_teacher_mode=live", "'cached', 'online'"),
])
def test_string_choices_are_checked_at_load(override, choices):
    with pytest.raises(ConfigError, match=f"invalid choice .*; valid choices: {choices}"):
        train_config(override)


def test_help_lists_ranges_choices_and_the_fields_of_list_items():
    out = subprocess.run([sys.executable, "-m", "fusion_jax.train", "--help"], cwd=REPO, env=ENV, capture_output=True,
                         text=True, timeout=120, check=True).stdout
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ") and line.split()}
    assert "int (>= 1) = 1000" in rows["train.steps"]
    assert "int (>= 1) = 100" in rows["train.checkpoint_every"]
    assert "float (in [0, 1)) = 0.01" in rows["data.validation_fraction"]
    assert "float (> 0) = 1e-05" in rows["optimizer.learning_rate"]
    assert "'bytes' | 'fusellm' = \"bytes\"" in rows["sources[].align"]
    assert "'cached' | 'online' = \"cached\"" in rows["sources[].mode"]
    assert "str = (required)" in rows["sources[].name"] and "int (>= 0) = 0" in rows["sources[].seq_len"]
    capture = subprocess.run([sys.executable, "-m", "fusion_jax.capture", "--help"], cwd=REPO, env=ENV,
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert "'quantized' | 'float16' = \"quantized\"" in capture and "'train' | 'validation' = \"train\"" in capture


# ------------------------------------------------------------------------------------------------ data inputs


def test_jsonl_read_as_parquet_names_the_file_and_the_format(tmp_path):
    f = tmp_path / "corpus.jsonl"
    f.write_text('{"text": "a"}\n{"text": "b"}\n')
    with pytest.raises(CorpusError) as e:
        list(read_documents(CorpusConfig(format="parquet", paths=(str(f),))))
    assert str(e.value).startswith(f"{f}: cannot be read as Parquet")
    assert str(e.value).endswith("it looks like jsonl: set corpus.format=jsonl")


def test_parquet_read_as_jsonl_names_the_file_and_the_format(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    f = tmp_path / "corpus.jsonl"
    pq.write_table(pa.table({"text": ["a", "b"]}), f)
    with pytest.raises(CorpusError) as e:
        list(read_documents(CorpusConfig(format="jsonl", paths=(str(f),))))
    assert str(e.value).startswith(f"{f} line 1: ")
    assert str(e.value).endswith("it looks like parquet: set corpus.format=parquet")


def test_a_damaged_saved_hf_dataset_names_the_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.disable_progress_bars()
    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "ds"))
    state = tmp_path / "ds" / "state.json"
    state.write_text(state.read_text()[:30])
    with pytest.raises(CorpusError, match=rf"^{tmp_path / 'ds'}: damaged saved dataset, datasets.load_from_disk "
                                          r"failed \(.*\); save it again"):
        list(read_documents(CorpusConfig(format="hf", paths=(str(tmp_path / "ds"),))))


def test_a_damaged_documents_json_names_the_file(tmp_path):
    write_documents(tmp_path / "docs", [Document("a", "x", "d")], [])
    meta = tmp_path / "docs" / "documents.json"
    meta.write_text(meta.read_text()[:40])
    with pytest.raises(StoreError) as e:
        read_meta(tmp_path / "docs")
    assert str(e.value).startswith(f"{meta}: damaged (") and "prepare the store again" in str(e.value)


class _Spy:
    """A tokenizer that records the longest text it was asked to encode."""

    def __init__(self, tok):
        self.tok, self.name, self.longest = tok, tok.name, 0

    def encode(self, text):
        self.longest = max(self.longest, len(text.encode()))
        return self.tok.encode(text)


def test_a_long_document_is_tokenized_window_by_window(tiny):
    """A 50 MB document used to be tokenized whole (minutes, gigabytes); no text longer than a window is now."""
    window = 1 << 20  # splitting.window_bytes(30)
    line = "fusion of large language models, café 日本語\n"
    text = line * (int(1.3 * window) // len(line.encode()))
    spies = [_Spy(load_tokenizer(tiny["bl"])), _Spy(load_tokenizer(tiny["sp"]))]
    doc = Document("big", text, "web")
    pieces = split_long(doc, spies, 30)
    assert max(s.longest for s in spies) <= window < len(text.encode())
    assert "".join(p.text for p in pieces) == text
    assert [p.id for p in pieces] == [f"big#{i}" for i in range(len(pieces))]
    assert all(len(s.tok.encode(p.text).ids) <= 30 for p in pieces for s in spies)


def test_windows_end_at_line_ends_else_spaces_else_characters(tiny):
    from fusion_jax.data.splitting import _windows

    data = ("ab\n" * 10 + "c d " * 10 + "é" * 20).encode()
    spans = _windows(data, 8)
    assert spans[0] == (0, 6) and data[spans[0][1] - 1:spans[0][1]] == b"\n"  # after the last newline of the window
    assert b"".join(data[a:b] for a, b in spans) == data and all(0 < b - a <= 8 for a, b in spans)
    assert all(data[b:b + 1] == b" " for a, b in spans if 30 < b < 70)  # before a space in the words' part
    assert all(data[b:].decode() for a, b in spans[:-1])  # character starts in the two-byte part


def test_the_same_paths_written_differently_reuse_the_documents(tiny, tmp_path, monkeypatch):
    """Once relative, once absolute (and ./corpus.jsonl vs corpus.jsonl): the same store, not "other settings"."""
    from fusion_jax.config import schema
    from fusion_jax import pipeline

    monkeypatch.chdir(tmp_path)
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(5)))
    (tmp_path / "tok.json").write_bytes(Path(tiny["bl"]).read_bytes())

    def cfg(run_dir: str, corpus: str, tok: str):
        return schema.TrainConfig(run_dir=run_dir, target=tok, data=schema.DataConfig(
            corpus=CorpusConfig(paths=(corpus,)), max_tokens=100), capture=schema.CaptureSettings(seq_len=128))

    first = pipeline.documents_stage(cfg("run", "corpus.jsonl", "tok.json"))
    again = pipeline.documents_stage(cfg(str(tmp_path / "run"), "./corpus.jsonl", str(tmp_path / "tok.json")))
    assert Path(again).resolve() == Path(first).resolve()
    with pytest.raises(ValueError, match=r"prepared with other settings \(max_tokens differ\)"):
        pipeline.documents_stage(dataclasses_replace_max_tokens(cfg("run", "corpus.jsonl", "tok.json"), 99))


def dataclasses_replace_max_tokens(cfg, max_tokens: int):
    import dataclasses

    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, max_tokens=max_tokens))


# ------------------------------------------------------------------------------------------------ read-only outputs


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nothing can be created in, also for root (which ignores permission bits): chmod for others,
    the immutable attribute for root."""
    d = tmp_path / "read_only"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
        yield d
        d.chmod(0o755)
        return
    if subprocess.run(["chattr", "+i", str(d)], capture_output=True).returncode != 0:
        pytest.skip("running as root without chattr +i: no way to make a read-only directory here")
    try:
        yield d
    finally:
        subprocess.run(["chattr", "-i", str(d)], check=True)


def test_prepare_into_a_read_only_directory_is_one_error_line(tiny, tmp_path, read_only_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text('{"text": "hello"}\n')
    r = subprocess.run([sys.executable, "-m", "fusion_jax.prepare", "--set", f"corpus.paths=[{corpus}]",
                        "--set", f"tokenizers=[{tiny['bl']}]", "--set", f"output={read_only_dir / 'docs'}"],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    line = last_error_line(r.stderr)
    assert line.startswith("error: ") and str(read_only_dir / "docs") in line
    assert "choose" in line  # what to do about it


def test_audit_json_into_a_read_only_directory_fails_before_the_audit(tiny, tmp_path, read_only_dir):
    text = tmp_path / "text.txt"
    text.write_text("hello world\n" * 50)
    out = read_only_dir / "audit.json"
    r = subprocess.run([sys.executable, "-m", "fusion_jax.align", "audit", "--source", str(tiny["bl"]), "--target",
                        str(tiny["sp"]), "--text", str(text), "--json", str(out)],
                       cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1, r.stderr
    line = last_error_line(r.stderr)
    assert line.startswith("error: cannot write --json: ") and line.split(" (")[0].endswith(str(out))
    assert "fusion_jax alignment audit" not in r.stdout  # refused before the work, not after
