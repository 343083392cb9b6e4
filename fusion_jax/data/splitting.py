"""The FuseLLM long-document rule (`split_long_text.py`), made exact.

Official rule: tokenize each text with every tokenizer of the run (no special tokens); if any yields more
than `block_size - 48` = 2000 tokens, cut the ids of the tokenizer that yields the most into 2000-token
chunks and decode each chunk. Decoding loses or alters whitespace at the chunk edges.

Here the cuts are byte offsets in the UTF-8 text, so the pieces are exact slices that concatenate to the
original text, and each piece is checked again under every tokenizer.

A document longer than a window (1 MiB, or 64 bytes per allowed token if more) is first cut into windows at line
ends (else before a space, else at a character start) and each window is split on its own, so time and memory
stay linear in the document's length (a 50 MB document tokenized whole took minutes and gigabytes). Documents
within one window are split exactly as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

from fusion_jax.data.corpus import Document
from fusion_jax.errors import InputError
from fusion_jax.tokenizers import Tokenizer

__all__ = ["split_long", "token_counts", "window_bytes"]


def token_counts(text: str, tokenizers: Sequence[Tokenizer]) -> list[int]:
    """Tokens per tokenizer for `text` (no special tokens)."""
    return [len(tok.encode(text).ids) for tok in tokenizers]


def _char_start(data: bytes, cut: int) -> int:
    """The start of the UTF-8 character holding byte `cut` (`cut` itself when it already starts one)."""
    while 0 < cut < len(data) and data[cut] & 0xC0 == 0x80:  # a continuation byte 10xxxxxx
        cut -= 1
    return cut


def _char_end(data: bytes, cut: int) -> int:
    """The first UTF-8 character start at or after byte `cut`."""
    while cut < len(data) and data[cut] & 0xC0 == 0x80:
        cut += 1
    return cut


WINDOW_BYTES = 1 << 20


def window_bytes(max_tokens: int) -> int:
    """The longest text `split_long` tokenizes at once for a limit of `max_tokens`."""
    return max(WINDOW_BYTES, 64 * max_tokens)


def _windows(data: bytes, size: int) -> list[tuple[int, int]]:
    """Consecutive spans of at most `size` bytes covering `data`, each ending after a newline, else before a space or
    tab, else at a UTF-8 character start, in its second half (a span ends where it must only when neither is
    there)."""
    spans, start = [], 0
    while len(data) - start > size:
        limit, half = start + size, start + size // 2
        cut = data.rfind(b"\n", half, limit) + 1
        if not cut:
            cut = max(data.rfind(b" ", half, limit), data.rfind(b"\t", half, limit))
        if cut <= start:
            cut = _char_start(data, limit)
        spans.append((start, cut))
        start = cut
    spans.append((start, len(data)))
    return spans


def split_long(doc: Document, tokenizers: Sequence[Tokenizer], max_tokens: int,
               window: int | None = None) -> list[Document]:
    """Split `doc` into consecutive pieces of at most `max_tokens` tokens under every tokenizer.

    A document within the limit under all tokenizers comes back unchanged, as a one-element list. Otherwise
    the tokenizer that yields the most tokens picks the cuts: after every `max_tokens` of its tokens, at the
    token's end byte offset, moved back to the start of the UTF-8 character it falls in (byte-level BPE can
    end a token inside a multi-byte character). Pieces are exact byte slices: `"".join(p.text for p in
    pieces) == doc.text`. Ids are `f"{doc.id}#{i}"` (i = 0, 1, ... over the final pieces), domain unchanged.

    Every piece is tokenized again under every tokenizer and split again while it is still too long. This
    happens because the tokenization of a slice differs from the slice of a tokenization: a piece's first
    word loses the merges it had with the text before it (and SentencePiece adds its dummy-prefix space),
    and another tokenizer, shorter over the whole text, can be locally denser than the one that cut.

    Every document is tokenized, short ones too, so a text that some tokenizer cannot reproduce byte for
    byte raises `TokenizationError` here, in prepare, rather than later in capture. Raises ValueError if one
    UTF-8 character alone exceeds `max_tokens` tokens (only for tiny limits).
    Pieces are never empty; fewer pieces are not guaranteed to be minimal, only within the limit.

    A document longer than `window` bytes (default: `window_bytes(max_tokens)`) is split window by window (see the
    module docstring): no text longer than the window is tokenized, and every window boundary is also a cut.
    """
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if not tokenizers:
        raise ValueError("split_long needs at least one tokenizer")
    data = doc.text.encode("utf-8")
    spans: list[tuple[int, int]] = []
    stack = _windows(data, window or window_bytes(max_tokens))[::-1]  # spans still to check, the next one last
    while stack:
        start, end = stack.pop()
        text = data[start:end].decode("utf-8")
        encodings = [tok.encode(text) for tok in tokenizers]
        counts = [len(e.ids) for e in encodings]
        longest = max(range(len(counts)), key=counts.__getitem__)  # ties: the first tokenizer
        if counts[longest] <= max_tokens:
            spans.append((start, end))
            continue
        byte_end = encodings[longest].byte_end
        cuts, prev = [], start
        for k in range(max_tokens - 1, len(byte_end) - 1, max_tokens):
            cut = _char_start(data, start + int(byte_end[k]))
            if cut <= prev:  # the token ends inside the character the last piece ended at
                cut = _char_end(data, prev + 1)
            if cut >= end:
                break
            cuts.append(cut)
            prev = cut
        if not cuts:
            raise InputError(f"document {doc.id!r}: the character at byte {start} alone takes {counts[longest]} "
                             f"tokens of {tokenizers[longest].name}, more than max_tokens={max_tokens}")
        bounds = [start, *cuts, end]
        stack.extend(reversed(list(zip(bounds[:-1], bounds[1:]))))
    if len(spans) == 1:
        return [doc]
    return [dataclasses.replace(doc, id=f"{doc.id}#{i}", text=data[a:b].decode("utf-8")) for i, (a, b) in enumerate(spans)]
