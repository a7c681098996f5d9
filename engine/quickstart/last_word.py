"""A LAMBADA-style task for the quickstart: the last word of held-out Python passages.

The seed judged its student by LAMBADA (predict a passage's last word, which the passage's
earlier lines make predictable), and that is the number that went wrong. The quickstart
has no LAMBADA, so it builds the same kind of test from its own source: standard-library
files the training corpus left out (the corpus takes files until quickstart.corpus_max_bytes
is reached, the rest were never seen), cut into passages that end with an identifier which
already appears in an earlier line of the passage but not earlier on its own line. The file
is lambada_openai's format ({"text": ...}, target = the last space-separated word), scored
by engine.eval's evaluate_lambada: ppl of the word given the passage, acc = greedy match.
"""

from __future__ import annotations

import json
import keyword
import re
from collections.abc import Callable
from pathlib import Path

from engine.data.atomic import write_text_atomic
from engine.quickstart.corpus import read_documents, stdlib_dir, stdlib_sources

# An identifier of 4+ characters right after a space: the word a passage ends with.
TARGET = re.compile(r"(?<= )[A-Za-z_][A-Za-z0-9_]{3,}\b")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# Words that say nothing about the passage (the language's own, and the receiver names).
SKIPPED_WORDS = frozenset(keyword.kwlist) | {"self", "cls"}
MAX_LINES = 40  # context lines looked at above the target's line
MAX_PASSAGE_TOKENS = 96  # about a LAMBADA passage; longer ones only cost scoring time
# Longest target in tokens: LAMBADA's words are mostly one or two tokens, and a long name
# would make the perplexity of a word (summed over its tokens) astronomically large.
MAX_WORD_TOKENS = 2
SEARCH = 200  # targets tried after each evenly spaced position in a file

EncodeBatch = Callable[[list[str]], list[list[int]]]


def heldout_files(corpus_max_bytes: int, root: str | Path | None = None) -> list[Path]:
    """Standard-library sources the quickstart corpus of that size does not contain."""
    chosen = set(stdlib_sources(root, max_bytes=corpus_max_bytes))
    return [path for path in stdlib_sources(root) if path not in chosen]


def _line_start(text: str, position: int) -> int:
    return text.rfind("\n", 0, position) + 1


def _lines_up(text: str, line_start: int, lines: int) -> int:
    """Where the line `lines` lines above the one starting at `line_start` starts."""
    start = line_start
    for _ in range(lines):
        if start == 0:
            break
        start = _line_start(text, start - 1)
    return start


def passage(text: str, match: re.Match, encode_batch: EncodeBatch,
            max_tokens: int) -> str | None:
    """The longest whole-line passage (at most MAX_LINES lines above) that ends with the
    match, fits in max_tokens, and shows the word in a line above the target's but not
    earlier on the target's own line; None when there is none."""
    word, line_start = match.group(), _line_start(text, match.start())
    if word in IDENTIFIER.findall(text[line_start:match.start()]):
        return None
    top = _lines_up(text, line_start, MAX_LINES)
    if word not in IDENTIFIER.findall(text[top:line_start]):
        return None
    lines = text[top:line_start].splitlines(keepends=True)
    target = text[line_start:match.end()]
    *costs, target_cost = [len(ids) for ids in encode_batch([*lines, target])]
    budget, first = max_tokens - target_cost, len(lines)
    while first > 0 and costs[first - 1] <= budget:  # per-line counts: a close estimate
        first -= 1
        budget -= costs[first]
    while first < len(lines):  # the exact count decides
        piece = "".join(lines[first:]) + target
        if word not in IDENTIFIER.findall("".join(lines[first:])):
            return None  # dropping more lines cannot bring the word back
        if len(encode_batch([piece])[0]) <= max_tokens:
            return piece
        first += 1
    return None


def file_passages(text: str, count: int, encode_batch: EncodeBatch,
                  max_tokens: int) -> list[tuple[str, str]]:
    """Up to `count` (passage, word) pairs spread over one file: the first usable target
    after each of `count` evenly spaced positions (words of at most MAX_WORD_TOKENS)."""
    targets = [m for m in TARGET.finditer(text) if m.group() not in SKIPPED_WORDS]
    words = list(dict.fromkeys(m.group() for m in targets))
    short = {word for word, ids in zip(words, encode_batch([" " + w for w in words]),
                                       strict=True) if len(ids) <= MAX_WORD_TOKENS}
    targets = [m for m in targets if m.group() in short]
    found: dict[int, tuple[str, str]] = {}
    for j in range(count):
        begin = len(targets) * (j + 1) // (count + 1)
        for index in range(begin, min(begin + SEARCH, len(targets))):
            if index in found:
                break
            piece = passage(text, targets[index], encode_batch, max_tokens)
            if piece is not None:
                found[index] = (piece, targets[index].group())
                break
    return list(found.values())


def spread(files: list[Path], items: int) -> list[Path]:
    """The files in an order that covers the whole list early: every stride-th file from 0,
    then from 1, ... (stride = files per item), so the first `items` span all of them."""
    stride = max(1, len(files) // max(1, items))
    return [files[i] for offset in range(stride) for i in range(offset, len(files), stride)]


def build_last_word_task(output: str | Path, *, corpus_max_bytes: int, items: int,
                         encode_batch: EncodeBatch, max_tokens: int,
                         root: str | Path | None = None) -> dict:
    """Write `items` passages (or all there are) from held-out files spread over the whole
    library as a lambada jsonl, atomically; return a summary."""
    root = Path(root) if root is not None else stdlib_dir()
    files = heldout_files(corpus_max_bytes, root)
    per_file = max(1, -(-items // max(1, len(files))))
    found: list[tuple[str, str, str]] = []
    for name, text in read_documents(spread(files, items), root):
        pieces = file_passages(text, per_file, encode_batch, max_tokens)
        found.extend((name, piece, word) for piece, word in pieces)
        if len(found) >= items:
            break
    if not found:
        raise ValueError(f"no last-word passages in the held-out files under {root}")
    write_text_atomic(output, "".join(
        json.dumps({"text": piece, "meta": {"path": name, "word": word}}) + "\n"
        for name, piece, word in found[:items]
    ))
    return {"path": str(output), "items": len(found[:items]),
            "files": len({name for name, _, _ in found[:items]})}
