"""Pile ``.jsonl(.zst)`` -> Megatron ``.bin/.idx`` token shards plus ``manifest.json``.

    python -m data.preprocess --input 'pile/train/*.jsonl.zst' --tokenizer tokenizer.json \\
        --output shards/ [--workers N] [--shard-tokens N] [--text-key text] [--strict]

How it works: one reader thread streams and parses lines into batches of about
``BATCH_BYTES`` of text; each batch is tokenised with ``Tokenizer.encode_batch`` (the
tokenizers Rust thread pool, in this process) or, with ``--workers N > 1``, by N worker
processes; the main thread writes the batches in input order, so the shards and the manifest
are byte-identical whatever N. Every document gets the tokenizer's ``<|endoftext|>`` id
appended (0 for GPT-NeoX). Documents are never split across shards: a shard is closed as
soon as the next document would push it past ``--shard-tokens``.

Why one process by default: tokenising is >90% of the work and the tokenizers Rust pool
already spreads each batch over all cores with the GIL released, while the reader thread
parses the next batch. On the 2-core development machine (shared, load 7-9) workers=2 ran
at 0.61x, 1.06x and 0.91x the speed of workers=1 in three runs: no gain beyond noise, so
the simpler path with no pickling and no process start-up is the default. Worker processes
(each with a single Rust thread) are for many-core machines, where the one GIL-bound main
process (JSON parsing, id-list conversion) would otherwise become the bottleneck;
``python -m benchmarks.preprocess --workers 1,4,8`` measures it there.

Crash safety: a shard is written under ``*.tmp`` names and renamed when complete; after each
shard ``.progress.json`` records the finished shards, their hashes and the exact input line
to resume after. Run the same command again and it verifies those shards and continues.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import queue
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from data.atomic import write_json_atomic
from data.jsonl import SKIP_REASONS, InputError, iter_records
from data.progress import Progress
from data.shards import ShardWriter, file_sha256, shard_paths

FORMAT_NAME = "neox-distill-token-shards"
FORMAT_VERSION = 1
DEFAULT_SHARD_TOKENS = 100_000_000
BATCH_BYTES = 1 << 20
BATCH_DOCS = 4096
MAX_SKIP_EXAMPLES = 10
PROGRESS_NAME = ".progress.json"
MANIFEST_NAME = "manifest.json"
EOS_TOKEN = "<|endoftext|>"
DTYPE_CHOICES = ("auto", "uint16", "int32")


class PreprocessError(ValueError):
    """Bad input or a bad output folder; the message names the file (and line)."""


# --------------------------------------------------------------------------------- helpers


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PreprocessError(f"{path}: unreadable: {exc}; delete it to start over") from exc
    if not isinstance(obj, dict):
        raise PreprocessError(f"{path}: not a JSON object; delete it to start over")
    return obj


def expand_inputs(inputs: list[str | Path]) -> list[Path]:
    """Paths in the order given; a pattern that is not an existing file expands sorted."""
    paths: list[Path] = []
    for item in inputs:
        item = str(item)
        if Path(item).is_file():
            paths.append(Path(item))
            continue
        matches = sorted(glob.glob(item))
        if not matches:
            raise PreprocessError(f"{item}: no such input file")
        paths.extend(Path(m) for m in matches)
    return paths


def load_tokenizer(tokenizer_path: str | Path):
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tokenizer_path))
    except Exception as exc:
        raise PreprocessError(f"{tokenizer_path}: cannot load tokenizer: {exc}") from exc


def choose_dtype(tokenizer, requested: str) -> np.dtype:
    """uint16 when every id fits, else int32 (Megatron code 4; it has no uint32 code)."""
    if requested not in DTYPE_CHOICES:
        raise PreprocessError(f"dtype must be one of {DTYPE_CHOICES}, not {requested!r}")
    if requested != "auto":
        return np.dtype(requested)
    vocab = tokenizer.get_vocab(with_added_tokens=True)
    id_bound = max([*vocab.values(), tokenizer.get_vocab_size(with_added_tokens=True) - 1]) + 1
    return np.dtype(np.uint16) if id_bound <= 1 << 16 else np.dtype(np.int32)


def encode_texts(tokenizer, texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(flat uint32 tokens with EOS after each document, per-document lengths incl. EOS)."""
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)
    id_lists = [encoding.ids for encoding in encode(texts, add_special_tokens=False)]
    lengths = np.fromiter((len(ids) + 1 for ids in id_lists), dtype=np.int64, count=len(id_lists))
    ends = np.cumsum(lengths)
    flat = np.empty(int(ends[-1]) if len(ends) else 0, dtype=np.uint32)
    start = 0
    for ids, end in zip(id_lists, ends.tolist(), strict=True):
        flat[start : end - 1] = ids
        flat[end - 1] = eos_id
        start = end
    return flat, lengths


# Worker-process side of --workers N: each process loads its own tokenizer once.
_WORKER_TOKENIZER = None


def _worker_init(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    # One Rust thread per process: the processes themselves are the parallelism.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["RAYON_RS_NUM_CPUS"] = "1"
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_path)


def _worker_encode(texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    return encode_texts(_WORKER_TOKENIZER, texts, eos_id)


class _Prefetch:
    """Runs a generator in a thread, a bounded number of items ahead of the consumer.

    Why: reading and JSON parsing (GIL) overlap with tokenising (Rust, GIL released), and
    the bound keeps memory flat however large the input.
    """

    _DONE = object()

    def __init__(self, generator: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(generator,), daemon=True)
        self._thread.start()

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, generator: Iterator) -> None:
        try:
            for item in generator:
                if not self._put((True, item)):
                    return
        except BaseException as exc:  # handed to the consumer, raised there
            self._put((False, exc))
            return
        self._put((True, self._DONE))

    def __iter__(self):
        while True:
            ok, item = self._queue.get()
            if not ok:
                raise item
            if item is self._DONE:
                return
            yield item

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ------------------------------------------------------------------------------ the run


class _Run:
    """State of one preprocessing run: counters, the open shard, the resume bookkeeping."""

    def __init__(self, settings: dict, output_dir: Path, dtype: np.dtype, strict: bool,
                 progress: Progress):
        self.settings = settings
        self.output_dir = output_dir
        self.dtype = dtype
        self.limit = int(np.iinfo(dtype).max)
        self.strict = strict
        self.progress = progress
        self.input_names = [entry["path"] for entry in settings["inputs"]]
        self.shards: list[dict] = []
        self.input_stats = [{"lines": 0, "documents": 0, "skipped": 0} for _ in self.input_names]
        self.skip_counts = dict.fromkeys(SKIP_REASONS, 0)
        self.skip_examples: list[str] = []
        self.position = [0, 0]  # (input file index, line) of the last consumed line
        self.writer: ShardWriter | None = None

    # resume state ------------------------------------------------------------------
    def snapshot(self) -> dict:
        return json.loads(json.dumps({
            "position": self.position,
            "input_stats": self.input_stats,
            "skip_counts": self.skip_counts,
            "skip_examples": self.skip_examples,
        }))

    def restore(self, shards: list[dict]) -> None:
        self.shards = [dict(s) for s in shards]
        if shards:
            state = json.loads(json.dumps(shards[-1]["resume"]))
            self.position = state["position"]
            self.input_stats = state["input_stats"]
            self.skip_counts = state["skip_counts"]
            self.skip_examples = state["skip_examples"]

    def save_progress(self) -> None:
        write_json_atomic(
            self.output_dir / PROGRESS_NAME,
            {"settings": self.settings, "shards": self.shards},
            indent=1,
            sort_keys=True,
        )

    # writing -------------------------------------------------------------------------
    def _new_writer(self) -> ShardWriter:
        return ShardWriter(self.output_dir / f"shard_{len(self.shards):05d}", self.dtype)

    def finish_shard(self) -> None:
        entry = self.writer.finish()
        entry["resume"] = self.snapshot()
        self.shards.append(entry)
        self.writer = None
        self.save_progress()

    def where(self, file_index: int, line: int) -> str:
        return f"{self.input_names[file_index]}:{line}"

    def consume(self, batch: list, flat: np.ndarray, lengths: np.ndarray) -> None:
        """Write one tokenised batch in input order, closing shards at document boundaries."""
        if len(flat) and int(flat.max()) > self.limit:
            bad_doc = int(np.searchsorted(np.cumsum(lengths), np.argmax(flat > self.limit),
                                          side="right"))
            record = [r for r in batch if r.text is not None][bad_doc]
            raise PreprocessError(
                f"{self.where(record.file_index, record.line)}: token id "
                f"{int(flat.max())} does not fit the shard dtype {self.dtype} "
                f"(max {self.limit}); use --dtype int32"
            )
        tokens = flat.astype(self.dtype)
        shard_tokens = self.settings["shard_tokens"]
        doc = offset = 0  # documents / tokens of this batch seen so far
        pending_doc = pending_token = 0  # first document / token not yet given to the writer
        nbytes = 0
        for record in batch:
            nbytes += record.size
            if record.text is None:
                self._skip(record)
                self._advance(record)
                continue
            n = int(lengths[doc])
            if self.writer is None:
                self.writer = self._new_writer()
            held_docs = self.writer.documents + doc - pending_doc
            held_tokens = self.writer.tokens + offset - pending_token
            if held_docs and held_tokens + n > shard_tokens:
                # Close the shard before this document; its resume point is the line before.
                self.writer.add_documents(tokens[pending_token:offset], lengths[pending_doc:doc])
                pending_doc, pending_token = doc, offset
                self.finish_shard()
                self.writer = self._new_writer()
            offset += n
            doc += 1
            self.input_stats[record.file_index]["documents"] += 1
            self._advance(record)
        if self.writer is not None and doc > pending_doc:
            self.writer.add_documents(tokens[pending_token:offset], lengths[pending_doc:doc])
        self.progress.update(doc, tokens=len(flat), nbytes=nbytes)

    def _skip(self, record) -> None:
        where = self.where(record.file_index, record.line)
        if self.strict:
            raise PreprocessError(f"{where}: {record.detail} ({record.skip}; --strict)")
        self.skip_counts[record.skip] += 1
        self.input_stats[record.file_index]["skipped"] += 1
        if len(self.skip_examples) < MAX_SKIP_EXAMPLES:
            self.skip_examples.append(f"{where}: {record.skip}: {record.detail}")

    def _advance(self, record) -> None:
        self.input_stats[record.file_index]["lines"] = record.line
        self.position = [record.file_index, record.line]

    def manifest(self) -> dict:
        shards = [{k: v for k, v in s.items() if k != "resume"} for s in self.shards]
        inputs = [
            {**entry, **stats}
            for entry, stats in zip(self.settings["inputs"], self.input_stats, strict=True)
        ]
        return {
            **self.settings,
            "inputs": inputs,
            "shards": shards,
            "totals": {
                "shards": len(shards),
                "documents": sum(s["documents"] for s in shards),
                "tokens": sum(s["tokens"] for s in shards),
            },
            "skipped": {
                "total": sum(self.skip_counts.values()),
                "counts": self.skip_counts,
                "examples": self.skip_examples,
            },
        }


# ------------------------------------------------------------------------ the pipeline


def _batches(paths: list[Path], text_key: str, position: list[int]) -> Iterator[list]:
    """Records of all inputs after ``position``, in order, grouped into batches."""
    start_file, start_line = position
    batch: list = []
    text_bytes = 0
    for file_index in range(start_file, len(paths)):
        after = start_line if file_index == start_file else 0
        for record in iter_records(paths[file_index], file_index, text_key, after):
            batch.append(record)
            if record.text is not None:
                text_bytes += record.size
            if text_bytes >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
                yield batch
                batch, text_bytes = [], 0
    if batch:
        yield batch


def _texts(batch: list) -> list[str]:
    return [record.text for record in batch if record.text is not None]


def _tokenised(batches, tokenizer, tokenizer_path: Path, eos_id: int, workers: int):
    """(batch, flat tokens, lengths) in input order, tokenised in-process or by N processes."""
    if workers <= 1:
        for batch in batches:
            yield (batch, *encode_texts(tokenizer, _texts(batch), eos_id))
        return
    import multiprocessing
    from collections import deque

    # spawn, not fork: the parent's tokenizer thread pool must not be forked mid-flight.
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _worker_init, (str(tokenizer_path),)) as pool:
        in_flight: deque = deque()
        for batch in batches:
            in_flight.append((batch, pool.apply_async(_worker_encode, (_texts(batch), eos_id))))
            if len(in_flight) >= 2 * workers:
                done, result = in_flight.popleft()
                yield (done, *result.get())
        while in_flight:
            done, result = in_flight.popleft()
            yield (done, *result.get())


def _settings_of(manifest: dict) -> dict:
    """The part of a manifest that determines its shards (what a resumed run must match)."""
    settings = {k: v for k, v in manifest.items() if k not in ("shards", "totals", "skipped")}
    settings["inputs"] = [{"path": e["path"], "bytes": e["bytes"]} for e in settings["inputs"]]
    return settings


def _differences(old: dict, new: dict) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def _verified_prefix(output_dir: Path, shards: list[dict]) -> list[dict]:
    """The leading shards whose files exist and match their recorded sha256."""
    kept = []
    for i, entry in enumerate(shards):
        bin_path, idx_path = shard_paths(output_dir / entry["name"])
        if entry["name"] != f"shard_{i:05d}" or not (bin_path.is_file() and idx_path.is_file()):
            break
        if bin_path.stat().st_size != entry["bin_bytes"]:
            break
        if file_sha256(idx_path) != entry["idx_sha256"] or \
                file_sha256(bin_path) != entry["bin_sha256"]:
            break
        kept.append(entry)
    return kept


def _remove_stale_files(output_dir: Path, keep: int) -> None:
    """Delete temporary files and shards beyond the ``keep`` verified ones."""
    for path in output_dir.glob("*.tmp"):
        path.unlink()
    for path in output_dir.glob("shard_*"):
        stem = path.name.split(".")[0]
        number = stem.removeprefix("shard_")
        if number.isdigit() and int(number) >= keep:
            path.unlink()


def preprocess(
    inputs: list[str | Path],
    tokenizer_path: str | Path,
    output_dir: str | Path,
    *,
    workers: int = 1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    text_key: str = "text",
    strict: bool = False,
    dtype: str = "auto",
    show_progress: bool | None = None,
) -> dict:
    """Tokenise ``inputs`` into shards under ``output_dir``; returns the manifest written.

    Resumes an interrupted run into the same folder; refuses a folder that holds the output
    of different inputs or settings.
    """
    if workers < 1:
        raise PreprocessError(f"workers must be >= 1, not {workers}")
    if shard_tokens < 1:
        raise PreprocessError(f"shard_tokens must be >= 1, not {shard_tokens}")
    paths = expand_inputs(inputs)
    tokenizer_path = Path(tokenizer_path)
    tokenizer = load_tokenizer(tokenizer_path)
    eos_id = tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise PreprocessError(f"{tokenizer_path}: the tokenizer has no {EOS_TOKEN} token")
    shard_dtype = choose_dtype(tokenizer, dtype)
    settings = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": {
            "path": str(tokenizer_path),
            "sha256": file_sha256(tokenizer_path),
            "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
            "eos_token": EOS_TOKEN,
            "eos_id": eos_id,
        },
        "dtype": shard_dtype.name,
        "shard_tokens": int(shard_tokens),
        "text_key": text_key,
        "strict": bool(strict),
        "inputs": [{"path": str(p), "bytes": p.stat().st_size} for p in paths],
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = output_dir / MANIFEST_NAME
    progress_path = output_dir / PROGRESS_NAME

    progress = Progress("preprocess", unit="docs", enabled=show_progress)
    run = _Run(settings, output_dir, shard_dtype, strict, progress)
    if manifest_path.is_file():
        old = read_json(manifest_path)
        try:
            changed = _differences(_settings_of(old), settings)
        except (KeyError, TypeError) as exc:
            raise PreprocessError(f"{manifest_path}: not a preprocess manifest ({exc})") from exc
        if changed:
            raise PreprocessError(
                f"{manifest_path}: the folder holds shards made with other {changed}; "
                "choose another --output or delete it"
            )
        if len(_verified_prefix(output_dir, old["shards"])) == len(old["shards"]):
            return old  # already complete and intact
        raise PreprocessError(
            f"{manifest_path}: complete, but its shards no longer match their sha256; "
            "delete the folder to rebuild it"
        )
    if progress_path.is_file():
        state = read_json(progress_path)
        changed = _differences(state.get("settings", {}), settings)
        if changed:
            raise PreprocessError(
                f"{progress_path}: an interrupted run with other {changed} is in this folder; "
                "choose another --output or delete it"
            )
        run.restore(_verified_prefix(output_dir, state["shards"]))
    _remove_stale_files(output_dir, keep=len(run.shards))

    reader = _Prefetch(_batches(paths, text_key, run.position), depth=4)
    try:
        for batch, flat, lengths in _tokenised(reader, tokenizer, tokenizer_path, eos_id, workers):
            run.consume(batch, flat, lengths)
        if run.writer is not None:
            run.finish_shard()
    except BaseException:
        if run.writer is not None:
            run.writer.abort()
        raise
    finally:
        reader.close()
        progress.close()
    manifest = run.manifest()
    write_json_atomic(manifest_path, manifest, indent=1, sort_keys=True)
    progress_path.unlink(missing_ok=True)
    return manifest


def summary(manifest: dict) -> str:
    totals, skipped = manifest["totals"], manifest["skipped"]
    lines = [
        f"{totals['shards']} shards, {totals['documents']:,} documents, "
        f"{totals['tokens']:,} tokens ({manifest['dtype']})"
    ]
    if skipped["total"]:
        reasons = ", ".join(f"{k} {v}" for k, v in skipped["counts"].items() if v)
        lines.append(f"skipped {skipped['total']} lines: {reasons}")
        lines.extend(f"  e.g. {example}" for example in skipped["examples"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data.preprocess", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--input", nargs="+", action="extend", required=True,
                        help=".jsonl or .jsonl.zst files or glob patterns, read in order")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json")
    parser.add_argument("--output", required=True, help="output folder")
    parser.add_argument("--workers", type=int, default=1,
                        help="tokeniser processes; 1 = the tokenizers Rust thread pool (default)")
    parser.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS)
    parser.add_argument("--text-key", default="text")
    parser.add_argument("--strict", action="store_true", help="stop at the first bad line")
    parser.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto")
    args = parser.parse_args(argv)
    from data.shards import ShardError

    try:
        manifest = preprocess(
            args.input, args.tokenizer, args.output, workers=args.workers,
            shard_tokens=args.shard_tokens, text_key=args.text_key, strict=args.strict,
            dtype=args.dtype,
        )
    except (PreprocessError, InputError, ShardError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print(summary(manifest), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
