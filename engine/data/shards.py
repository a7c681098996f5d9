"""Megatron / GPT-NeoX ``MMapIndexedDataset`` token shards: writer and validated reader.

Why this format: it is what EleutherAI's pre-tokenized Pythia Pile ships in, so the same
reader serves our own preprocessed shards and Pythia's exact training data. Layout
(little-endian; docs/formats.md has the whole format):

    .idx  magic b"MMIDIDX\\x00\\x00" | u64 version=1 | u8 dtype code | u64 N | u64 D
          | int32 sizes[N] | int64 pointers[N] (byte offsets into .bin) | int64 doc_idx[D]
    .bin  the tokens of all N sequences, concatenated

Only integer token dtypes are accepted (codes 1-5 and 8). Code 4 (int32) is what we write
for vocabularies that do not fit uint16; Megatron has no unsigned 32-bit code.

A folder written by ``engine.data.preprocess`` also holds ``manifest.json`` (written last, when
every shard is complete) and, while its job is unfinished, ``.progress.json``; both names and
the manifest's format version live here, beside the reader that checks them.

Nothing here imports zstandard: the training machine reads shards without it.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets
import struct
from pathlib import Path

import numpy as np

from engine.data.atomic import open_atomic

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
HEADER_BYTES = len(INDEX_MAGIC) + 8 + 1 + 8 + 8  # 34

DTYPE_BY_CODE: dict[int, np.dtype] = {
    1: np.dtype(np.uint8),
    2: np.dtype(np.int8),
    3: np.dtype(np.int16),
    4: np.dtype(np.int32),
    5: np.dtype(np.int64),
    8: np.dtype(np.uint16),
}
CODE_BY_DTYPE = {dtype: code for code, dtype in DTYPE_BY_CODE.items()}
FLOAT_CODES = {6: "float32/float64", 7: "float64"}

MANIFEST_NAME = "manifest.json"
PROGRESS_NAME = ".progress.json"
FORMAT_NAME = "neox-distill-token-shards"
# Version 2 added the inputs' sha256, the tokenizer fingerprint and max_token_id.
FORMAT_VERSION = 2
READABLE_FORMAT_VERSIONS = (1, 2)

# Validation of huge indexes (Pythia: ~10^8 sequences) runs in slices to bound memory.
_VALIDATE_CHUNK = 1 << 22


class ShardError(ValueError):
    """A shard file is missing, malformed, or inconsistent; the message names the file."""


def shard_paths(prefix: str | Path) -> tuple[Path, Path]:
    """(.bin, .idx) for a prefix given with or without either suffix."""
    prefix = Path(prefix)
    if prefix.suffix in (".bin", ".idx"):
        prefix = prefix.with_suffix("")
    return prefix.with_name(prefix.name + ".bin"), prefix.with_name(prefix.name + ".idx")


def file_sha256(path: str | Path, block: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def encode_index(sizes: np.ndarray, dtype: np.dtype, doc_idx: np.ndarray | None = None) -> bytes:
    """The bytes of an .idx for sequences of the given token counts, stored back to back."""
    dtype = np.dtype(dtype)
    if dtype not in CODE_BY_DTYPE:
        raise ValueError(f"dtype {dtype} has no Megatron code; use one of {list(CODE_BY_DTYPE)}")
    sizes = np.asarray(sizes, dtype=np.int64)
    if sizes.size and (sizes.min() < 0 or sizes.max() > np.iinfo(np.int32).max):
        raise ValueError("sequence sizes must fit int32 and be >= 0")
    pointers = np.zeros(len(sizes), dtype=np.int64)
    if len(sizes) > 1:
        np.cumsum(sizes[:-1] * dtype.itemsize, out=pointers[1:])
    if doc_idx is None:
        doc_idx = np.arange(len(sizes) + 1, dtype=np.int64)
    doc_idx = np.asarray(doc_idx, dtype="<i8")
    header = INDEX_MAGIC + struct.pack(
        "<QBQQ", INDEX_VERSION, CODE_BY_DTYPE[dtype], len(sizes), len(doc_idx)
    )
    return b"".join(
        [header, sizes.astype("<i4").tobytes(), pointers.astype("<i8").tobytes(), doc_idx.tobytes()]
    )


def temporary_bin_path(bin_path: Path, tag: str) -> Path:
    """Where a ShardWriter streams a shard's tokens before the rename (unique per tag)."""
    return bin_path.with_name(f"{bin_path.name}.{tag}.tmp")


class ShardWriter:
    """Writes one shard under a temporary name; ``finish()`` fsyncs and renames it.

    Why temporary names: a crash or an input error must never leave a file under a shard's
    real name that is not complete and consistent with its index. The .bin is streamed to
    ``temporary_bin_path(bin, tag)`` (``tag``: unique per job, so a job can record the name
    before the file exists and delete exactly it later); the .idx is written whole through
    engine.data.atomic. The .bin file is only created by the first ``add_documents`` or ``finish``.
    """

    def __init__(self, prefix: str | Path, dtype: np.dtype, tag: str | None = None):
        self.bin_path, self.idx_path = shard_paths(prefix)
        self.dtype = np.dtype(dtype)
        if self.dtype not in CODE_BY_DTYPE:
            raise ValueError(f"unsupported shard dtype {self.dtype}")
        self.temporary_path = temporary_bin_path(self.bin_path, tag or secrets.token_hex(4))
        self._handle = None
        self._digest = hashlib.sha256()
        self._sizes: list[int] = []
        self.tokens = 0
        self.max_token_id: int | None = None

    @property
    def name(self) -> str:
        return self.bin_path.stem

    @property
    def documents(self) -> int:
        return len(self._sizes)

    def _open(self):
        if self._handle is None:
            self._handle = open(self.temporary_path, "xb")  # noqa: SIM115 - finish()/abort()
        return self._handle

    def add_documents(self, tokens: np.ndarray, sizes: np.ndarray) -> None:
        """Append documents given as one flat token array and their lengths."""
        data = np.ascontiguousarray(tokens, dtype=self.dtype.newbyteorder("<"))
        if len(data):
            largest = int(data.max())
            if self.max_token_id is None or largest > self.max_token_id:
                self.max_token_id = largest
        raw = data.tobytes()
        self._open().write(raw)
        self._digest.update(raw)
        self._sizes.extend(int(s) for s in sizes)
        self.tokens += len(tokens)

    def finish(self) -> dict:
        """Make the shard durable under its real name; returns its manifest entry."""
        handle = self._open()
        handle.flush()
        os.fsync(handle.fileno())
        handle.close()
        index = encode_index(np.asarray(self._sizes, dtype=np.int64), self.dtype)
        os.replace(self.temporary_path, self.bin_path)
        with open_atomic(self.idx_path, "wb") as idx:  # also fsyncs the folder: both renames
            idx.write(index)
        return {
            "name": self.name,
            "tokens": self.tokens,
            "documents": self.documents,
            "max_token_id": self.max_token_id,
            "bin_bytes": self.tokens * self.dtype.itemsize,
            "bin_sha256": self._digest.hexdigest(),
            "idx_sha256": hashlib.sha256(index).hexdigest(),
        }

    def abort(self) -> None:
        """Drop the half-written shard (nothing under the real names is touched)."""
        if self._handle is not None and not self._handle.closed:
            self._handle.close()
        if self._handle is not None:
            self.temporary_path.unlink(missing_ok=True)


def _map_array(path: Path, dtype: str, offset: int, count: int) -> np.ndarray:
    """`count` items of `dtype` at byte `offset` of `path`, memory-mapped (numpy cannot map
    zero bytes, so an empty array stands in for count 0)."""
    if not count:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(count,))


class IndexedShard:
    """Read-only view of one .bin/.idx pair, validated when opened.

    ``doc(i)`` is a zero-copy numpy view into the memory-mapped .bin.
    """

    def __init__(self, prefix_or_path: str | Path):
        self.bin_path, self.idx_path = shard_paths(prefix_or_path)
        self.name = self.bin_path.stem
        for path in (self.idx_path, self.bin_path):
            if not path.is_file():
                raise ShardError(f"{path}: shard file not found")
        self._open_index()
        self._open_tokens()

    def _fail(self, path: Path, what: str):
        raise ShardError(f"{path}: {what}")

    def _open_index(self) -> None:
        path = self.idx_path
        idx_bytes = path.stat().st_size
        if idx_bytes < HEADER_BYTES:
            self._fail(path, f"index is {idx_bytes} bytes, shorter than the header")
        with open(path, "rb") as handle:
            header = handle.read(HEADER_BYTES)
        magic = header[: len(INDEX_MAGIC)]
        if magic != INDEX_MAGIC:
            self._fail(path, f"bad magic {magic!r}, expected {INDEX_MAGIC!r} (not a Megatron .idx)")
        version, code, count, doc_count = struct.unpack("<QBQQ", header[len(INDEX_MAGIC) :])
        if version != INDEX_VERSION:
            self._fail(path, f"unsupported index version {version}, expected {INDEX_VERSION}")
        if code in FLOAT_CODES:
            self._fail(path, f"dtype code {code} is a float type; token shards must be integers")
        if code not in DTYPE_BY_CODE:
            self._fail(path, f"unknown dtype code {code}; known codes {sorted(DTYPE_BY_CODE)}")
        self.dtype = DTYPE_BY_CODE[code]
        expected = HEADER_BYTES + count * (4 + 8) + doc_count * 8
        if idx_bytes != expected:
            self._fail(
                path,
                f"index is {idx_bytes} bytes but its header (N={count} sequences, "
                f"D={doc_count} doc_idx entries) implies {expected} bytes",
            )
        self.sizes = _map_array(path, "<i4", HEADER_BYTES, count)
        self.pointers = _map_array(path, "<i8", HEADER_BYTES + 4 * count, count)
        self.doc_idx = _map_array(path, "<i8", HEADER_BYTES + 12 * count, doc_count)
        self._validate_index(count)

    def _validate_index(self, count: int) -> None:
        path, itemsize = self.idx_path, self.dtype.itemsize
        expected_pointer = 0
        for start in range(0, count, _VALIDATE_CHUNK):
            sizes = np.asarray(self.sizes[start : start + _VALIDATE_CHUNK], dtype=np.int64)
            pointers = np.asarray(self.pointers[start : start + _VALIDATE_CHUNK])
            if sizes.min() < 0:
                bad = start + int(np.argmax(sizes < 0))
                self._fail(path, f"sequence {bad} has negative size {int(self.sizes[bad])}")
            expected = np.empty_like(sizes)
            expected[0] = expected_pointer
            np.cumsum(sizes[:-1] * itemsize, out=expected[1:])
            expected[1:] += expected_pointer
            mismatch = np.flatnonzero(pointers != expected)
            if mismatch.size:
                bad = start + int(mismatch[0])
                self._fail(
                    path,
                    f"pointer of sequence {bad} is {int(self.pointers[bad])}, expected "
                    f"{int(expected[mismatch[0]])} (sequences must be stored back to back)",
                )
            expected_pointer = int(expected[-1] + sizes[-1] * itemsize)
        self.total_tokens = expected_pointer // itemsize
        bin_bytes = self.bin_path.stat().st_size
        if bin_bytes != expected_pointer:
            self._fail(
                self.bin_path,
                f".bin is {bin_bytes} bytes but {self.idx_path.name} describes "
                f"{self.total_tokens} {self.dtype} tokens = {expected_pointer} bytes",
            )
        if len(self.doc_idx):
            first, last = int(self.doc_idx[0]), int(self.doc_idx[-1])
            decreasing = any(
                np.any(np.diff(self.doc_idx[s : s + _VALIDATE_CHUNK + 1]) < 0)
                for s in range(0, len(self.doc_idx), _VALIDATE_CHUNK)
            )
            if first != 0 or last > count or decreasing:
                self._fail(
                    path, f"doc_idx must start at 0, be non-decreasing and end <= N={count}"
                )

    def _open_tokens(self) -> None:
        if self.total_tokens:
            self.tokens = np.memmap(self.bin_path, dtype=self.dtype.newbyteorder("<"), mode="r")
        else:
            self.tokens = np.zeros(0, dtype=self.dtype)

    def __len__(self) -> int:
        return len(self.sizes)

    def doc(self, i: int) -> np.ndarray:
        n = len(self.sizes)
        if not -n <= i < n:
            raise IndexError(f"{self.idx_path}: sequence {i} out of range (N={n})")
        i %= n
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.sizes[i])]

    def __repr__(self) -> str:
        return f"IndexedShard({str(self.bin_path.with_suffix(''))!r}, docs={len(self)}, " \
            f"tokens={self.total_tokens}, dtype={self.dtype})"


def read_manifest(path: Path) -> dict:
    """A engine.data.preprocess manifest (format version 1 or 2), its shard list checked.

    A version-1 manifest lacks the inputs' sha256, the tokenizer fingerprint and
    max_token_id: its shards and their hashes are read as before, but the engine can then
    compare the tokenizer by sha256 only and must check token ids batch by batch.
    """
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise ShardError(f"{path}: not a manifest written by neox-distill preprocess "
                         f"(no \"format\": \"{FORMAT_NAME}\")")
    version = manifest.get("format_version")
    if version not in READABLE_FORMAT_VERSIONS:
        raise ShardError(f"{path}: format_version {version!r} is not one this reader knows "
                         f"{READABLE_FORMAT_VERSIONS}; update neox-distill")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(entry, dict) and isinstance(entry.get("name"), str) for entry in shards
    ):
        raise ShardError(f"{path}: \"shards\" must be a list of entries with a \"name\"")
    return manifest


def unfinished_job_message(folder: Path) -> str | None:
    """Why `folder` must not be trained on yet, or None: an engine.data.preprocess job left it
    unfinished.

    preprocess writes .progress.json before its first file and removes it only after the
    manifest, so the record exists from the first moment of a job until it is complete.
    """
    record_path = folder / PROGRESS_NAME
    if not record_path.is_file() or (folder / MANIFEST_NAME).is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
        done, command = len(record["shards"]), record.get("command")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        done, command = "some", None
    how = (f"finish it with: {command}" if command
           else "run the same neox-distill preprocess command again to finish it")
    return (f"{folder}: an unfinished neox-distill preprocess job is in this folder "
            f"({PROGRESS_NAME}, {done} shards done, no {MANIFEST_NAME} yet); {how}")


class ShardSet:
    """Several shards read as one sequence of documents, in order.

    Accepts a folder written by ``engine.data.preprocess`` (its manifest.json gives the order and
    the hashes; a folder that job left unfinished is refused), a folder of complete .bin/.idx
    pairs without a manifest (sorted by name; EleutherAI's pre-tokenized Pythia Pile), a
    single shard prefix, or a list of prefixes.
    """

    def __init__(self, source: str | Path | list[str | Path] | tuple, *, verify: bool = False):
        self.manifest: dict | None = None
        if isinstance(source, (list, tuple)):
            prefixes = [Path(p) for p in source]
        else:
            source = Path(source)
            if source.is_dir():
                prefixes = self._folder_prefixes(source)
            elif any(p.exists() for p in (source, *shard_paths(source))):
                prefixes = [source]
            else:  # name what the user gave, not the .idx derived from it
                raise ShardError(f"{source}: no such file or folder")
        if not prefixes:
            raise ShardError(f"{source}: no shards found (no manifest.json and no .idx files)")
        self.shards = [IndexedShard(p) for p in prefixes]
        if verify:
            self.verify()
        self.doc_starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([len(s) for s in self.shards], out=self.doc_starts[1:])
        self.token_starts = np.zeros(len(self.shards) + 1, dtype=np.int64)
        np.cumsum([s.total_tokens for s in self.shards], out=self.token_starts[1:])
        self.total_tokens = int(self.token_starts[-1])

    def _folder_prefixes(self, folder: Path) -> list[Path]:
        unfinished = unfinished_job_message(folder)
        if unfinished:
            raise ShardError(unfinished)
        manifest_path = folder / MANIFEST_NAME
        if manifest_path.is_file():
            self.manifest = read_manifest(manifest_path)
            return [folder / entry["name"] for entry in self.manifest["shards"]]
        return sorted(p.with_suffix("") for p in folder.glob("*.idx"))

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads all the data)."""
        if self.manifest is None:
            where = self.shards[0].bin_path.parent
            raise ShardError(f"{where}: no manifest.json to verify the shards against")
        for shard, entry in zip(self.shards, self.manifest["shards"], strict=True):
            for path, key in ((shard.bin_path, "bin_sha256"), (shard.idx_path, "idx_sha256")):
                actual = file_sha256(path)
                if actual != entry[key]:
                    raise ShardError(f"{path}: sha256 {actual} does not match the manifest")

    def tokenizer_info(self) -> dict | None:
        """What the shards were tokenised with, for the engine's start-up check; None when
        there is no manifest (a folder or prefixes of bare .bin/.idx pairs).

        {"sha256": of the tokenizer.json bytes, "fingerprint": of its canonical JSON (see
        engine.data.tokenizer_file; None for a version-1 manifest, which did not record it: compare
        the sha256 then), "vocab_size", "eos_id", "max_token_id" (see max_token_id())}.
        """
        if self.manifest is None:
            return None
        tokenizer = self.manifest.get("tokenizer", {})
        return {
            "sha256": tokenizer.get("sha256"),
            "fingerprint": tokenizer.get("fingerprint"),
            "vocab_size": tokenizer.get("vocab_size"),
            "eos_id": tokenizer.get("eos_id"),
            "max_token_id": self.max_token_id(),
        }

    def max_token_id(self) -> int | None:
        """The largest token id in the shards, from the manifest (nothing is read).

        None when it is not recorded: without a manifest, or with a version-1 manifest. The
        data loader then checks the ids of each batch against the embedding instead, since
        scanning a folder like the Pythia Pile (~300B tokens) at start-up is not an option.
        """
        if self.manifest is None:
            return None
        return self.manifest.get("totals", {}).get("max_token_id")

    @property
    def sizes(self) -> np.ndarray:
        return np.concatenate([np.asarray(s.sizes) for s in self.shards])

    def __len__(self) -> int:
        return int(self.doc_starts[-1])

    def doc(self, i: int) -> np.ndarray:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"document {i} out of range ({n} documents)")
        i %= n
        shard = int(np.searchsorted(self.doc_starts, i, side="right")) - 1
        return self.shards[shard].doc(i - int(self.doc_starts[shard]))

    def token_slice(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Tokens [start, stop) of the concatenated stream (copied into ``out`` if given)."""
        if not 0 <= start <= stop <= self.total_tokens:
            raise IndexError(f"token range [{start}, {stop}) outside [0, {self.total_tokens})")
        shard = int(np.searchsorted(self.token_starts, start, side="right")) - 1
        local = start - int(self.token_starts[shard])
        tokens = self.shards[shard].tokens
        if out is None and local + (stop - start) <= len(tokens):
            return tokens[local : local + (stop - start)]
        if out is None:
            out = np.empty(stop - start, dtype=np.int64)
        filled = 0
        while filled < stop - start:
            tokens = self.shards[shard].tokens
            take = min(stop - start - filled, len(tokens) - local)
            out[filled : filled + take] = tokens[local : local + take]
            filled += take
            shard += 1
            local = 0
        return out

    def content_fingerprint(self) -> str:
        """sha256 of the shards' content, in order, over the sha256 of every .bin and .idx.

        A manifest that records both sha256s of every shard gives them (written from the
        bytes by preprocess, and the same trust the loader gives it: reading a whole corpus
        again each time a run opens a teacher cache is work done twice); otherwise every file
        is read, every byte once. `fingerprint()` without a manifest sees only the shards'
        shapes; what must tell two texts of the same shape apart (a teacher cache) uses this."""
        entries = self.manifest["shards"] if self.manifest else [{}] * len(self.shards)
        digest = hashlib.sha256()
        for shard, entry in zip(self.shards, entries, strict=True):
            for path, key in ((shard.bin_path, "bin_sha256"), (shard.idx_path, "idx_sha256")):
                digest.update(f"{entry.get(key) or file_sha256(path)};".encode())
        return digest.hexdigest()

    def fingerprint(self) -> str:
        """Identifies the data a loader position refers to (cheap: no token data is read)."""
        digest = hashlib.sha256()
        for i, shard in enumerate(self.shards):
            entry = self.manifest["shards"][i] if self.manifest else {}
            digest.update(
                f"{len(shard)}:{shard.total_tokens}:{shard.dtype}:"
                f"{entry.get('bin_sha256', '')}:{entry.get('idx_sha256', '')};".encode()
            )
        return digest.hexdigest()
