"""The demo corpus: code and prose taken from the running Python installation (no downloads).

``write_stdlib_corpus`` writes two JSON-lines files, one object per line
``{"id": str, "text": str, "domain": "code" | "prose"}``:

* ``code.jsonl``: standard-library ``.py`` files, one document per file, id ``code:<relpath>``.
* ``prose.jsonl``: the English help topics of ``pydoc_data.topics`` (id ``prose:topic:<name>``) and, per
  module, its module/class/function docstrings joined by blank lines (id ``prose:doc:<relpath>``).

The stdlib files are split in two halves by a hash of their path, so that no file gives text to both
domains: a file's code is used only if it is in the code half, its docstrings only if in the other half.
Documents are taken in a hash order (not alphabetical, so a budget samples the whole library) until a
domain's byte budget is reached. Same installation + same arguments → byte-identical files.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import platform
import sysconfig
import warnings
from pathlib import Path
from typing import Callable, Iterator

from fusion_jax.errors import ConfigError
from fusion_jax.files import atomic_write_bytes

__all__ = ["write_stdlib_corpus", "stdlib_dir", "stdlib_files", "cut_at_line", "module_docstrings"]

EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3", "__pycache__"})
MIN_DOCSTRING_CHARS = 200


def stdlib_dir() -> Path:
    """The standard library directory of the running Python (``sysconfig.get_paths()["stdlib"]``)."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path) -> list[str]:
    """Relative posix paths of the ``.py`` files under ``root``, excluded directories left out, sorted."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in EXCLUDED_DIRS)
        rel = Path(dirpath).relative_to(root)
        found.extend((rel / f).as_posix() for f in filenames if f.endswith(".py"))
    return sorted(found)


def cut_at_line(text: str, max_bytes: int) -> str:
    """``text`` if it fits in ``max_bytes`` UTF-8 bytes, else its longest prefix that ends with a newline
    and fits (a single over-long line is cut at the last whole character that fits)."""
    data = text.encode("utf-8")
    if len(data) <= max_bytes:
        return text
    head = data[:max_bytes]
    nl = head.rfind(b"\n")
    if nl >= 0:
        return head[: nl + 1].decode("utf-8")
    return head.decode("utf-8", errors="ignore")  # drops only a trailing partial character


def _hash(s: str) -> bytes:
    return hashlib.sha256(s.encode("utf-8")).digest()


def _in_code_half(relpath: str, seed: int) -> bool:
    return _hash(f"{seed}:half:{relpath}")[0] % 2 == 0


def _read_utf8(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")  # strict: files in other encodings are skipped
    except (UnicodeDecodeError, OSError):
        return None


def module_docstrings(source: str) -> list[str]:
    """Docstrings of a module, its classes and functions (nested ones too), in source order, cleaned
    (``inspect.cleandoc``). Parsed with ``ast``, never imported; unparsable source → ``[]``."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SyntaxWarning for odd escapes in old modules
            tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and doc.strip():
                out.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


def _candidates(root: Path, seed: int) -> dict[str, list[tuple[str, Callable[[], str | None]]]]:
    """Per domain, ``(id, load)`` pairs; ``load`` reads the text lazily (None or blank → skipped)."""
    from pydoc_data.topics import topics

    code, prose = [], []
    for rel in stdlib_files(root):
        path = root / rel
        if _in_code_half(rel, seed):
            code.append((f"code:{rel}", lambda p=path: _read_utf8(p)))
        else:
            prose.append((f"prose:doc:{rel}", lambda p=path: _docstring_document(p)))
    for name in sorted(topics):
        prose.append((f"prose:topic:{name}", lambda t=topics[name]: t))
    return {"code": code, "prose": prose}


def _docstring_document(path: Path) -> str | None:
    source = _read_utf8(path)
    if source is None:
        return None
    text = "\n\n".join(module_docstrings(source))
    return text if len(text) >= MIN_DOCSTRING_CHARS else None


def _select(cands, budget: int, max_document_bytes: int, seed: int) -> Iterator[tuple[str, str]]:
    """Documents in the order of sha256(f"{seed}:{id}"), cut to ``max_document_bytes``, until the bytes
    taken reach ``budget`` (so the last one may overshoot it by at most one document)."""
    total = 0
    for doc_id, load in sorted(cands, key=lambda c: _hash(f"{seed}:{c[0]}")):
        if total >= budget:
            return
        text = load()
        if text is None or not text.strip():
            continue
        text = cut_at_line(text, max_document_bytes)
        if not text.strip():
            continue
        total += len(text.encode("utf-8"))
        yield doc_id, text


def _jsonl(docs: list[tuple[str, str]], domain: str) -> bytes:
    lines = (json.dumps({"id": i, "text": t, "domain": domain}, ensure_ascii=False) + "\n" for i, t in docs)
    return "".join(lines).encode("utf-8")


def write_stdlib_corpus(
    out_dir: str | Path, *, code_bytes: int, prose_bytes: int, max_document_bytes: int, seed: int = 0,
    stdlib: str | Path | None = None,
) -> dict:
    """Write ``out_dir/code.jsonl`` and ``out_dir/prose.jsonl`` (each replaced atomically) from the
    standard library of the running Python (or ``stdlib``, a directory laid out like it).

    ``code_bytes`` / ``prose_bytes``: UTF-8 text bytes to take per domain (reached, overshot by less than
    ``max_document_bytes``, unless the library runs out). ``max_document_bytes``: longer texts are cut at
    their last line boundary before it. ``seed``: changes the code/docstring split and the order.

    Returns ``{"python_version", "stdlib", "seed", "max_document_bytes", "domains": {domain: {"documents",
    "bytes", "file", "exhausted"}}}`` (``exhausted``: the library had less than the budget). Raises
    ValueError for a budget or ``max_document_bytes`` ≤ 0 (naming it) or a missing stdlib directory
    (naming it).
    """
    sizes = {"code_bytes": code_bytes, "prose_bytes": prose_bytes, "max_document_bytes": max_document_bytes}
    for name, value in sizes.items():
        if not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive number of bytes, got {value!r}")
    root = Path(stdlib) if stdlib is not None else stdlib_dir()
    if not root.is_dir():
        raise ValueError(f"standard library directory {str(root)!r} not found (sysconfig stdlib path)")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cands = _candidates(root, seed)
    summary = {
        "python_version": platform.python_version(), "stdlib": str(root), "seed": seed,
        "max_document_bytes": max_document_bytes, "domains": {},
    }
    for domain, budget in (("code", code_bytes), ("prose", prose_bytes)):
        docs = list(_select(cands[domain], budget, max_document_bytes, seed))
        path = out_dir / f"{domain}.jsonl"
        atomic_write_bytes(path, _jsonl(docs, domain))
        total = sum(len(text.encode("utf-8")) for _, text in docs)
        summary["domains"][domain] = {
            "documents": len(docs), "bytes": total, "file": str(path), "exhausted": total < budget,
        }
    return summary
