"""fusion_jax.files: the one temp → fsync → rename (`atomic_path`) and what is built on it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from fusion_jax import files


def _leftovers(directory):
    return sorted(p.name for p in directory.iterdir() if p.name.endswith((".tmp", ".partial")))


def test_atomic_write_bytes_writes_the_file_whole(tmp_path):
    path = tmp_path / "a.bin"
    files.atomic_write_bytes(path, b"first")
    assert path.read_bytes() == b"first"
    files.atomic_write_bytes(path, b"second, longer")
    assert path.read_bytes() == b"second, longer"
    files.atomic_write_text(tmp_path / "t.txt", "é\n")
    assert (tmp_path / "t.txt").read_bytes() == "é\n".encode()
    files.atomic_write_json(tmp_path / "j.json", {"x": float("nan")}, indent=None)
    assert (tmp_path / "j.json").read_text() == '{"x": null}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "j.json", "t.txt"]


def test_atomic_write_bytes_failure_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")

    def failing_fsync(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError) as e:
        files.atomic_write_bytes(path, b"new")
    assert e.value.filename is not None and e.value.filename.endswith(".tmp")  # names the file it could not write
    assert path.read_bytes() == b"old"
    assert _leftovers(tmp_path) == []


def test_atomic_path_streams_by_name_and_replaces(tmp_path):
    path = tmp_path / "lengths.npy"
    path.write_bytes(b"old")
    with files.atomic_path(path) as tmp:
        assert tmp.parent == tmp_path and tmp != path and not tmp.exists()
        with open(tmp, "wb") as f:
            np.save(f, np.arange(5))
        assert path.read_bytes() == b"old"  # not replaced before the block ends
    np.testing.assert_array_equal(np.load(path), np.arange(5))
    assert _leftovers(tmp_path) == []


def test_atomic_path_exception_leaves_old_file_and_no_temp(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with files.atomic_path(path) as tmp:
            tmp.write_bytes(b"half")
            raise KeyboardInterrupt
    assert path.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]

    missing = tmp_path / "b.bin"
    with pytest.raises(ValueError):
        with files.atomic_path(missing) as tmp:
            tmp.write_bytes(b"half")
            raise ValueError("boom")
    assert not missing.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin"]


def test_atomic_path_named_temp(tmp_path):
    path = tmp_path / "shard.json"
    tmp = tmp_path / "shard.json.partial"
    tmp.write_bytes(b"left by a crash")
    with files.atomic_path(path, tmp=tmp) as t:
        assert t == tmp
        t.write_bytes(b"{}")
    assert path.read_bytes() == b"{}" and not tmp.exists()


def test_temp_names_are_unique_per_writer(tmp_path):
    path = tmp_path / "a.bin"
    with files.atomic_path(path) as first, files.atomic_path(path) as second:
        assert first != second
        first.write_bytes(b"1")
        second.write_bytes(b"2")
    assert path.read_bytes() == b"1"  # the outer block commits last
    assert _leftovers(tmp_path) == []


def test_commit_directory(tmp_path):
    partial = tmp_path / "out.partial"
    partial.mkdir()
    (partial / "f").write_text("x")
    files.commit_directory(partial, tmp_path / "out")
    assert not partial.exists() and (tmp_path / "out" / "f").read_text() == "x"
