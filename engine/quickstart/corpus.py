"""An offline training corpus and tokenizer for the quickstart, made from this machine's Python.

Every Python installation carries megabytes of real, varied, human-written text in its
standard library, so the quickstart can show the whole pipeline (corpus -> tokenizer ->
shards -> pretrain -> distill -> evaluate) without a download and without committing data.
The corpus is written in the Pile's format (one JSON object per line with "text" and "meta",
zstandard-compressed) so that it goes through exactly the code path real Pile files take.
"""

from __future__ import annotations

import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

from engine.data.atomic import open_atomic, write_text_atomic

# Folders whose files are tests, vendored third-party code or IDE resources: large, repetitive
# or not part of "the library", and their presence differs between installations.
SKIPPED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "lib2to3", "idlelib",
     "__pycache__", "ensurepip", "turtledemo", "tkinter"}
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|padding|>")  # ids 0 and 1, as in GPT-NeoX


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: str | os.PathLike | None = None, *, max_bytes: int | None = None):
    """Sorted .py files under `root` (default: the standard library), skipping SKIPPED_DIRS,
    stopping before the running total of file sizes passes `max_bytes`.

    The order is by relative path, so the same installation always yields the same corpus.
    """
    root = Path(root) if root is not None else stdlib_dir()
    if not root.is_dir():
        raise FileNotFoundError(f"standard-library folder {root} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIPPED_DIRS)
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in files:
        size = path.stat().st_size
        if total + size > max_bytes:
            continue  # a smaller later file may still fit; keeps the budget well used
        chosen.append(path)
        total += size
    return chosen


def read_documents(files: Iterable[Path], root: Path) -> Iterator[tuple[str, str]]:
    """(relative path, text) for every file that is non-empty UTF-8."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if text.strip():
            yield path.relative_to(root).as_posix(), text


def write_pile_jsonl_zst(
    documents: Iterable[tuple[str, str]], output: str | os.PathLike, *, set_name: str = "Github"
) -> int:
    """Write (name, text) pairs as a Pile-format .jsonl.zst atomically; return the count."""
    import zstandard  # imported here: the GPU training path must not need it

    count = 0
    with (
        open_atomic(output, "wb") as raw,
        zstandard.ZstdCompressor(level=3).stream_writer(raw, closefd=False) as writer,
    ):
        for name, text in documents:
            record = {"text": text, "meta": {"pile_set_name": set_name, "path": name}}
            writer.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))
            count += 1
    return count


def build_stdlib_corpus(
    output: str | os.PathLike,
    *,
    root: str | os.PathLike | None = None,
    max_bytes: int | None = None,
) -> dict:
    """Write the standard library's sources as one Pile-format file; return a small summary."""
    root = Path(root) if root is not None else stdlib_dir()
    files = stdlib_sources(root, max_bytes=max_bytes)
    texts = list(read_documents(files, root))
    if not texts:
        raise ValueError(f"no readable .py files under {root}")
    count = write_pile_jsonl_zst(texts, output)
    return {
        "path": str(output),
        "source": str(root),
        "documents": count,
        "characters": sum(len(t) for _, t in texts),
    }


def train_bpe_tokenizer(
    texts: Iterable[str], output: str | os.PathLike, *, vocab_size: int = 4096
) -> int:
    """Train a byte-level BPE tokenizer shaped like GPT-NeoX's and save tokenizer.json
    atomically; return its vocabulary size.

    Like GPT-NeoX: NFC normalisation, ByteLevel pre-tokenizer without a prefix space,
    ByteLevel decoder, <|endoftext|> = 0 and <|padding|> = 1. Byte-level means every input
    can be encoded, so nothing in a held-out file ever becomes an unknown token.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"vocab_size {vocab_size} is too small for a byte-level BPE (>= 259)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    for expected_id, token in enumerate(SPECIAL_TOKENS):
        if tokenizer.token_to_id(token) != expected_id:  # pragma: no cover - tokenizers contract
            raise RuntimeError(f"{token} got id {tokenizer.token_to_id(token)}, not {expected_id}")
    # to_str(pretty=True) is exactly what Tokenizer.save writes.
    write_text_atomic(output, tokenizer.to_str(pretty=True))
    return tokenizer.get_vocab_size()
