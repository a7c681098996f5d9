"""Stream documents out of Pile-style ``.jsonl.zst`` (or plain ``.jsonl``) files.

Real Pile files are tens of GB, so nothing here ever holds a whole file: compressed bytes
are fed to zstd a block at a time and complete lines are cut out of the decompressed
stream. Every record carries its file index and 1-based line number, so a bad line can be
reported as ``file:line`` and an interrupted preprocessing run can skip exactly the lines
it has already consumed.

zstandard is imported lazily: the GPU machine that trains from finished shards does not
have it, and nothing on the training path needs it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

READ_BLOCK_BYTES = 1 << 20
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"

# Reasons a line is skipped (the keys of the skip counts in the manifest).
SKIP_BLANK_LINE = "blank_line"
SKIP_INVALID_UTF8 = "invalid_utf8"
SKIP_MALFORMED_JSON = "malformed_json"
SKIP_MISSING_TEXT = "missing_text"
SKIP_NON_STRING_TEXT = "non_string_text"
SKIP_EMPTY_TEXT = "empty_text"
SKIP_REASONS = (
    SKIP_BLANK_LINE,
    SKIP_INVALID_UTF8,
    SKIP_MALFORMED_JSON,
    SKIP_MISSING_TEXT,
    SKIP_NON_STRING_TEXT,
    SKIP_EMPTY_TEXT,
)


class InputError(ValueError):
    """The input file itself is unreadable (corrupt or truncated compression, I/O)."""


@dataclass(frozen=True)
class Record:
    """One line of one input file: either a document (``text``) or a skip (``skip``)."""

    file_index: int
    line: int
    size: int  # bytes of the line including its newline (progress in MB/s)
    text: str | None = None
    skip: str | None = None
    detail: str = ""


def is_zstd_path(path: str | Path) -> bool:
    return str(path).endswith(".zst")


def refuse_hidden_zstd(path: str | Path, head: bytes) -> None:
    """A file not named .zst whose first bytes (`head`) are zstd's magic is an error: read
    as text it would be skipped line by line as invalid UTF-8, and give no tokens."""
    if not is_zstd_path(path) and head.startswith(ZSTD_MAGIC):
        raise InputError(f"{path}: zstd-compressed data in a file not named .zst; rename it "
                         f"to {Path(path).name}.zst")


def _zstd_chunks(path: Path) -> Iterator[bytes]:
    """Decompressed blocks of a (possibly multi-frame) .zst file; errors name the position."""
    try:
        import zstandard
    except ImportError as exc:  # pragma: no cover - zstandard is a declared dependency
        raise InputError(f"{path}: reading .zst needs the 'zstandard' package") from exc

    decompressor = zstandard.ZstdDecompressor()
    compressed_pos = 0  # bytes of the file fed to zstd so far
    decompressed_pos = 0
    frame = None
    frame_has_input = False
    with open(path, "rb") as handle:
        while True:
            block = handle.read(READ_BLOCK_BYTES)
            if not block:
                break
            pending = block
            while pending:
                if frame is None:
                    frame = decompressor.decompressobj()
                    frame_has_input = False
                try:
                    out = frame.decompress(pending)
                except zstandard.ZstdError as exc:
                    raise InputError(
                        f"{path}: corrupt zstd data in the block at compressed bytes "
                        f"{compressed_pos}..{compressed_pos + len(block)} (decompressed byte "
                        f"{decompressed_pos}): {exc}"
                    ) from exc
                frame_has_input = True
                if out:
                    decompressed_pos += len(out)
                    yield out
                if frame.eof:
                    # One frame ended; whatever followed it starts the next frame.
                    pending = frame.unused_data
                    frame = None
                else:
                    pending = b""
            compressed_pos += len(block)
    if frame is not None and frame_has_input:
        raise InputError(
            f"{path}: truncated zstd stream: the file ends at compressed byte {compressed_pos} "
            f"(decompressed byte {decompressed_pos}) in the middle of a frame"
        )


def _plain_chunks(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as handle:
        block = handle.read(READ_BLOCK_BYTES)
        refuse_hidden_zstd(path, block)
        while block:
            yield block
            block = handle.read(READ_BLOCK_BYTES)


def iter_lines(path: str | Path) -> Iterator[bytes]:
    """Raw lines (without the newline) of a .jsonl or .jsonl.zst file, streamed."""
    path = Path(path)
    chunks = _zstd_chunks(path) if is_zstd_path(path) else _plain_chunks(path)
    tail = b""
    for chunk in chunks:
        pieces = chunk.split(b"\n")
        if len(pieces) == 1:
            tail += pieces[0]
            continue
        pieces[0] = tail + pieces[0]
        tail = pieces.pop()
        yield from pieces
    # Only reached when the stream ended cleanly, so a truncated .zst never yields the
    # half line it was cut in.
    if tail:
        yield tail


def parse_line(raw: bytes, text_key: str) -> tuple[str | None, str | None, str]:
    """(text, skip_reason, detail) for one raw line; exactly one of text/skip is set."""
    if not raw.strip():
        return None, SKIP_BLANK_LINE, "blank line"
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, SKIP_INVALID_UTF8, f"invalid UTF-8 at byte {exc.start} of the line"
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as exc:
        return None, SKIP_MALFORMED_JSON, f"malformed JSON: {exc.msg} at column {exc.colno}"
    if not isinstance(obj, dict) or text_key not in obj:
        return None, SKIP_MISSING_TEXT, f"no {text_key!r} field"
    text = obj[text_key]
    if not isinstance(text, str):
        return None, SKIP_NON_STRING_TEXT, f"{text_key!r} is {type(text).__name__}, not a string"
    if not text:
        return None, SKIP_EMPTY_TEXT, f"{text_key!r} is empty"
    try:
        # Lone surrogates from JSON escapes ("\ud800") are not encodable text either.
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return None, SKIP_INVALID_UTF8, f"unpaired surrogate at character {exc.start}"
    return text, None, ""


def iter_records(
    path: str | Path, file_index: int, text_key: str = "text", start_after_line: int = 0
) -> Iterator[Record]:
    """Documents and skips of one file in order; lines <= start_after_line are not parsed."""
    for line_no, raw in enumerate(iter_lines(path), start=1):
        if line_no <= start_after_line:
            continue
        text, skip, detail = parse_line(raw, text_key)
        yield Record(file_index, line_no, len(raw) + 1, text=text, skip=skip, detail=detail)
