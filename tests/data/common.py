"""Helpers shared by the data tests: generated corpora, a tiny BPE tokenizer, a spec reader."""

from __future__ import annotations

import itertools
import json
import struct
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[2]
WORDS_ALPHABET = "abcdefghijklmnopqrstuvwxyzéüß中文😀 .,\n\t"


def random_texts(count: int, seed: int, max_len: int = 400) -> list[str]:
    """Non-empty texts of very different lengths, with non-ASCII and whitespace runs."""
    rng = np.random.default_rng(seed)
    chars = np.array(list(WORDS_ALPHABET))
    texts = []
    for _ in range(count):
        n = int(rng.choice([1, 2, 7, int(rng.integers(1, max_len))]))
        texts.append("".join(rng.choice(chars, size=n)))
    return texts


def write_jsonl(path: Path, lines: list[str | bytes], compress: bool | None = None,
                frames: int = 1) -> Path:
    """Write raw lines (str or bytes) with newlines; .zst paths are zstd-compressed."""
    payload = b"".join((ln.encode() if isinstance(ln, str) else ln) + b"\n" for ln in lines)
    if compress is None:
        compress = str(path).endswith(".zst")
    if compress:
        import zstandard

        compressor = zstandard.ZstdCompressor(write_checksum=True)
        cut = [len(payload) * k // frames for k in range(frames + 1)]
        payload = b"".join(
            compressor.compress(payload[a:b]) for a, b in itertools.pairwise(cut)
        )
    path.write_bytes(payload)
    return path


def docs_lines(texts: list[str], key: str = "text") -> list[str]:
    return [json.dumps({key: t, "meta": {"pile_set_name": "test"}}) for t in texts]


def train_tokenizer(path: Path, texts: list[str], vocab_size: int = 300) -> Path:
    """A small byte-level BPE with <|endoftext|> = 0 and <|padding|> = 1, like GPT-NeoX."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|padding|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    tokenizer.save(str(path))
    return path


def read_idx_from_spec(idx_path: Path) -> dict:
    """Minimal Megatron .idx reader written from docs/formats.md, independent of
    engine.data.shards."""
    raw = Path(idx_path).read_bytes()
    assert raw[:9] == b"MMIDIDX\x00\x00"
    version, code, count, doc_count = struct.unpack_from("<QBQQ", raw, 9)
    offset = 9 + 8 + 1 + 8 + 8
    sizes = struct.unpack_from(f"<{count}i", raw, offset)
    offset += 4 * count
    pointers = struct.unpack_from(f"<{count}q", raw, offset)
    offset += 8 * count
    doc_idx = struct.unpack_from(f"<{doc_count}q", raw, offset)
    offset += 8 * doc_count
    assert offset == len(raw)
    dtype = {1: "u1", 2: "i1", 3: "<i2", 4: "<i4", 5: "<i8", 8: "<u2"}[code]
    return {"version": version, "dtype": np.dtype(dtype), "sizes": list(sizes),
            "pointers": list(pointers), "doc_idx": list(doc_idx)}


def read_docs_from_spec(prefix: Path) -> list[list[int]]:
    index = read_idx_from_spec(Path(str(prefix) + ".idx"))
    data = Path(str(prefix) + ".bin").read_bytes()
    itemsize = index["dtype"].itemsize
    return [
        np.frombuffer(data, dtype=index["dtype"], count=size, offset=pointer).tolist()
        for size, pointer in zip(index["sizes"], index["pointers"], strict=True)
        if size or itemsize
    ]


def expected_docs(tokenizer_path: Path, texts: list[str], eos_id: int = 0) -> list[list[int]]:
    """Tokenizer.encode + EOS, one document at a time (the definition the shards must meet)."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    return [[*tokenizer.encode(t, add_special_tokens=False).ids, eos_id] for t in texts]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a flat folder (hidden ones too) by name: equal folders, equal dicts."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}
