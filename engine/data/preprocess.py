"""Pile ``.jsonl(.zst)`` -> Megatron ``.bin/.idx`` token shards plus ``manifest.json``.

    neox-distill preprocess --input 'pile/train/*.jsonl.zst' --tokenizer tokenizer.json \\
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
parses the next batch; on the 2-core development machine workers=2 gained nothing (see
benchmarks/README.md). Worker processes (one Rust thread each) are for many-core machines,
where the GIL-bound main process (JSON parsing, id-list conversion) becomes the bottleneck.

Crash safety and ownership: ``.progress.json`` is written before the job's first file and
names everything the job creates before it creates it (engine/data/preprocess_job.py); a shard is
streamed under a temporary name and renamed when complete; after each shard the record holds
the finished shards, their hashes and the exact input line to resume after. Run the same
command again and it verifies those shards, deletes only what the record owns, and continues.
A non-empty folder that holds no record and no manifest is refused, never cleaned. Inputs are
identified by their sha256 (one streaming read each per run, before any token is written:
a resumed or repeated run must know whether an input changed before it keeps any shard).
A worker process that dies (e.g. killed for memory) stops the run within seconds with a
message naming the input lines it held; the finished shards stay for the rerun.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import multiprocessing.connection
import os
import queue
import shlex
import signal
import sys
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import numpy as np

from engine.data import failpoints
from engine.data.jsonl import SKIP_REASONS, InputError, iter_records, refuse_hidden_zstd
from engine.data.preprocess_job import JobRecord, PreprocessError, finished_manifest, shard_name
from engine.data.progress import Progress
from engine.data.shards import FORMAT_NAME, FORMAT_VERSION, ShardError, ShardWriter, file_sha256
from engine.data.tokenizer_file import TokenizerFileError, read_tokenizer_file

DEFAULT_SHARD_TOKENS = 100_000_000
BATCH_BYTES = 1 << 20
BATCH_DOCS = 4096
MAX_SKIP_EXAMPLES = 10
EOS_TOKEN = "<|endoftext|>"
DTYPE_CHOICES = ("auto", "uint16", "int32")

__all__ = ["PreprocessError", "main", "preprocess", "summary"]


# --------------------------------------------------------------------------------- helpers


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


def describe_inputs(paths: list[Path]) -> list[dict]:
    """Path, size and content sha256 of each input; a zstd file not named .zst is refused
    here, before anything is written."""
    described = []
    for path in paths:
        with open(path, "rb") as handle:
            refuse_hidden_zstd(path, handle.read(4))
        described.append(
            {"path": str(path), "bytes": path.stat().st_size, "sha256": file_sha256(path)}
        )
    return described


def load_tokenizer(tokenizer_path: str | Path):
    """(the loaded tokenizer file, its EOS id); every failure names the file."""
    loaded = read_tokenizer_file(tokenizer_path)
    eos_id = loaded.tokenizer.token_to_id(EOS_TOKEN)
    if eos_id is None:
        raise PreprocessError(f"{tokenizer_path}: the tokenizer has no {EOS_TOKEN} token")
    return loaded, eos_id


def choose_dtype(tokenizer, requested: str) -> np.dtype:
    """uint16 when every id fits, else int32 (Megatron code 4; it has no uint32 code)."""
    if requested not in DTYPE_CHOICES:
        raise PreprocessError(f"--dtype: must be one of {DTYPE_CHOICES}, not {requested!r}")
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


def resume_command(settings: dict, output_dir: Path, workers: int) -> str:
    """The command line that continues this job (paths as recorded, so from the same cwd)."""
    args = ["neox-distill", "preprocess",
            "--input", *[entry["path"] for entry in settings["inputs"]],
            "--tokenizer", settings["tokenizer"]["path"], "--output", str(output_dir),
            "--shard-tokens", str(settings["shard_tokens"]), "--text-key", settings["text_key"],
            "--dtype", settings["dtype"], "--workers", str(workers)]
    if settings["strict"]:
        args.append("--strict")
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(args)}"


# Worker-process side of --workers N: each process loads its own tokenizer once.
_WORKER_TOKENIZER = None


def _exit_with_parent(parent_sentinel) -> None:
    """Wait for the parent to die, then exit: a pool worker holds its own task queue open,
    so after a kill -9 of the parent it would otherwise wait for work forever."""
    multiprocessing.connection.wait([parent_sentinel])
    os._exit(1)


def _worker_init(tokenizer_path: str) -> None:
    global _WORKER_TOKENIZER
    # One Rust thread per process: the processes themselves are the parallelism.
    os.environ["RAYON_NUM_THREADS"] = "1"
    os.environ["RAYON_RS_NUM_CPUS"] = "1"
    # Ctrl-C is the parent's to handle: it stops the pool; workers must not die of it first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent.sentinel,), daemon=True).start()
    _WORKER_TOKENIZER = read_tokenizer_file(tokenizer_path).tokenizer


def _worker_encode(texts: list[str], eos_id: int) -> tuple[np.ndarray, np.ndarray]:
    failpoints.kill_on("preprocess.worker", texts)
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
    """State of one preprocessing run: counters, the open shard, the job's record."""

    def __init__(self, settings: dict, job: JobRecord, dtype: np.dtype, strict: bool,
                 progress: Progress):
        self.settings = settings
        self.job = job
        self.dtype = dtype
        self.limit = int(np.iinfo(dtype).max)
        self.strict = strict
        self.progress = progress
        self.input_names = [entry["path"] for entry in settings["inputs"]]
        self.input_stats = [{"lines": 0, "documents": 0, "skipped": 0} for _ in self.input_names]
        self.skip_counts = dict.fromkeys(SKIP_REASONS, 0)
        self.skip_examples: list[str] = []
        self.position = [0, 0]  # (input file index, line) of the last consumed line
        self.writer: ShardWriter | None = None
        if job.shards:  # resumed: the counters as they were after the last verified shard
            state = json.loads(json.dumps(job.shards[-1]["resume"]))
            self.position = state["position"]
            self.input_stats = state["input_stats"]
            self.skip_counts = state["skip_counts"]
            self.skip_examples = state["skip_examples"]

    def snapshot(self) -> dict:
        return json.loads(json.dumps({
            "position": self.position,
            "input_stats": self.input_stats,
            "skip_counts": self.skip_counts,
            "skip_examples": self.skip_examples,
        }))

    # writing -------------------------------------------------------------------------
    def _new_writer(self) -> ShardWriter:
        name = shard_name(len(self.job.shards))
        writer = ShardWriter(self.job.folder / name, self.dtype, tag=self.job.tag)
        self.job.begin_shard(writer)  # recorded before its first byte exists
        return writer

    def finish_shard(self) -> None:
        entry = self.writer.finish()
        entry["resume"] = self.snapshot()
        self.job.finish_shard(entry)
        self.writer = None

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
        shards = [{k: v for k, v in s.items() if k != "resume"} for s in self.job.shards]
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
                "max_token_id": max(s["max_token_id"] for s in shards),
            },
            "skipped": {
                "total": sum(self.skip_counts.values()),
                "counts": self.skip_counts,
                "examples": self.skip_examples,
            },
        }

    def nothing_written(self) -> str:
        """Why a run that finished without a single document has no shards."""
        names = self.input_names[0] if len(self.input_names) == 1 else \
            f"{self.input_names[0]} (and {len(self.input_names) - 1} more inputs)"
        skipped = sum(self.skip_counts.values())
        if not skipped:
            return f"{names}: no lines to tokenise (empty input); no shards written"
        reasons = ", ".join(f"{k} {v}" for k, v in self.skip_counts.items() if v)
        return (f"{names}: every one of the {skipped} lines was skipped ({reasons}; e.g. "
                f"{self.skip_examples[0]}); no shards written")


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


def _worker_died(batches: list[list], input_names: list[str]) -> PreprocessError:
    """The error for a dead worker, naming the input lines that were being tokenised."""
    first, last = batches[0][0], batches[-1][-1]
    held = f"{input_names[first.file_index]}:{first.line}-"
    held += str(last.line) if last.file_index == first.file_index else \
        f"{input_names[last.file_index]}:{last.line}"
    return PreprocessError(
        f"{held}: a tokenizer worker process died while these lines were being tokenised "
        "(killed by the system, e.g. out of memory?); run the same command again to continue "
        "from the last finished shard"
    )


def _oldest_result(in_flight: deque) -> tuple:
    batch, future = in_flight[0]
    flat, lengths = future.result()
    in_flight.popleft()
    return batch, flat, lengths


def _tokenised_by_workers(batches, tokenizer_path: Path, eos_id: int, workers: int,
                          input_names: list[str]):
    """(batch, flat tokens, lengths) in input order from `workers` processes.

    concurrent.futures, not multiprocessing.Pool: when a worker dies its futures fail (and
    so does the next submit) with BrokenProcessPool, where Pool waits forever for the result.
    """
    # spawn, not fork: the parent's tokenizer thread pool must not be forked mid-flight.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(str(tokenizer_path),))
    in_flight: deque = deque()
    batch: list = []
    try:
        for batch in batches:
            in_flight.append((batch, pool.submit(_worker_encode, _texts(batch), eos_id)))
            if len(in_flight) >= 2 * workers:
                yield _oldest_result(in_flight)
        while in_flight:
            yield _oldest_result(in_flight)
    except BrokenProcessPool:
        held = [b for b, _ in in_flight] or [batch]
        raise _worker_died(held, input_names) from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _tokenised(batches, loaded, eos_id: int, workers: int, input_names: list[str]):
    """(batch, flat tokens, lengths) in input order, tokenised in-process or by N processes."""
    if workers <= 1:
        for batch in batches:
            yield (batch, *encode_texts(loaded.tokenizer, _texts(batch), eos_id))
        return
    yield from _tokenised_by_workers(batches, loaded.path, eos_id, workers, input_names)


def _write_shards(run: _Run, paths: list[Path], loaded, eos_id: int, workers: int) -> None:
    """Tokenise every input line after the run's position into shards."""
    reader = _Prefetch(_batches(paths, run.settings["text_key"], run.position), depth=4)
    tokenised = _tokenised(reader, loaded, eos_id, workers, run.input_names)
    try:
        for batch, flat, lengths in tokenised:
            run.consume(batch, flat, lengths)
        if run.writer is not None:
            run.finish_shard()
    except BaseException:
        if run.writer is not None:
            run.writer.abort()
        raise
    finally:
        tokenised.close()
        reader.close()


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

    Resumes an interrupted run into the same folder; returns a finished one as it is;
    refuses a folder that holds the output of other inputs or settings, or anything else.
    """
    if workers < 1:
        raise PreprocessError(f"--workers: must be >= 1, not {workers}")
    if shard_tokens < 1:
        raise PreprocessError(f"--shard-tokens: must be >= 1, not {shard_tokens}")
    paths = expand_inputs(inputs)
    loaded, eos_id = load_tokenizer(tokenizer_path)
    shard_dtype = choose_dtype(loaded.tokenizer, dtype)
    settings = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "tokenizer": {"path": str(loaded.path), "sha256": loaded.sha256,
                      "fingerprint": loaded.fingerprint, "vocab_size": loaded.vocab_size,
                      "eos_token": EOS_TOKEN, "eos_id": eos_id},
        "dtype": shard_dtype.name,
        "shard_tokens": int(shard_tokens),
        "text_key": text_key,
        "strict": bool(strict),
        "inputs": describe_inputs(paths),
    }
    output_dir = Path(output_dir)
    finished = finished_manifest(output_dir, settings)
    if finished is not None:
        return finished
    job = JobRecord.open(output_dir, settings, resume_command(settings, output_dir, workers))
    progress = Progress("preprocess", unit="docs", enabled=show_progress)
    run = _Run(settings, job, shard_dtype, strict, progress)
    try:
        _write_shards(run, paths, loaded, eos_id, workers)
        if not job.shards:
            raise PreprocessError(run.nothing_written())
    except BaseException:
        if not job.shards:
            job.abandon()  # nothing to resume: leave the folder as empty as it was found
        raise
    finally:
        progress.close()
    manifest = run.manifest()
    job.complete(manifest)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neox-distill preprocess", description=__doc__.split("\n\n")[0]
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
    return parser


def _os_error_message(exc: OSError) -> str:
    """'<file>: <reason>' (e.g. 'shards/shard_00003.bin: No space left on device')."""
    if exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return exc.strerror or str(exc)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        manifest = preprocess(
            args.input, args.tokenizer, args.output, workers=args.workers,
            shard_tokens=args.shard_tokens, text_key=args.text_key, strict=args.strict,
            dtype=args.dtype,
        )
    except (PreprocessError, InputError, ShardError, TokenizerFileError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {_os_error_message(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    print(summary(manifest), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
