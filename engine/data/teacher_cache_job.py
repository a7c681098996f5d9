"""Building a teacher cache: the resumable job, its record, and the loop over the data.

The teacher itself is the caller's (engine/teacher_cache.py passes a function from token ids
to logit chunks), so this layer stays free of models. What this file owns:

* The job record `.progress.json`, written before anything else in the output folder, as
  engine.data.preprocess does (engine/data/preprocess_job.py): the settings, the command that
  continues the
  job, the finished shards with their sha256, the shard being written with its temporary name,
  how many records of it are durable and the sha256 of those bytes, and the next item. A rerun
  of the command verifies all that, truncates the shard being written to its durable prefix
  and continues from the next item; its output is byte-identical to an uninterrupted build
  (the batches are the same, and sampling draws from a generator seeded by (seed, batch)).
  A non-empty folder with neither record nor manifest is refused untouched; a finished one
  with the same settings is returned as it is, with other settings refused.
* `RowStream`: the records of the whole token stream in order, cut into one file per token
  shard, written under `<name>.cache.<tag>.tmp` and renamed when complete; rows no item
  trains are written as empty records.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from engine.data import failpoints
from engine.data.atomic import fsync_dir, temporary_leftovers, write_json_atomic
from engine.data.owned_folder import shown_names
from engine.data.progress import Progress
from engine.data.shards import MANIFEST_NAME, PROGRESS_NAME, file_sha256
from engine.data.teacher_cache import (
    SHARD_SUFFIX,
    CacheError,
    item_rows,
    job_record_kind,
    read_cache_manifest,
    record_problem,
    shards_folder_message,
)
from engine.data.teacher_cache_encode import encode_batch, record_dtype
from engine.kernels.constants import IGNORE_INDEX


def _hash_prefix(path: Path, nbytes: int):
    """sha256 object of the first nbytes of path (None when the file is shorter)."""
    if not path.is_file() or path.stat().st_size < nbytes:
        return None
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        left = nbytes
        while left:
            chunk = handle.read(min(left, 1 << 22))
            digest.update(chunk)
            left -= len(chunk)
    return digest


# Settings the command line sets (rerunning the recorded command restores them); every other
# difference is in the inputs' content (the teacher's files, the shards) or the format.
_ARGUMENT_KEYS = ("kind", "width", "temperature", "valid_vocab", "seed", "batch")


def _kind_option(settings: dict) -> str:
    flag = "--top-k" if settings.get("kind") == "top_k" else "--samples"
    return f"{flag} {settings.get('width')}"


def _changed(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(changed settings the command line gives, changed inputs), in words: how the settings
    a folder was built with (`old`) differ from this command's (`new`)."""
    old_data, new_data = old.get("data") or {}, new.get("data") or {}
    old_teacher, new_teacher = old.get("teacher") or {}, new.get("teacher") or {}
    options = [(_kind_option(old), _kind_option(new))]
    for then, now in ((old, new), (old_data, new_data)):
        keys = ("temperature", "valid_vocab", "seed", "batch") if then is old else (
            "mode", "seq_len", "pad_id")
        options += [(f"--{key.replace('_', '-')} {then.get(key)}",
                     f"--{key.replace('_', '-')} {now.get(key)}") for key in keys]
    options.append((f"--dtype {old_teacher.get('dtype')}", f"--dtype {new_teacher.get('dtype')}"))
    arguments = [f"{then} (this command: {now})" for then, now in options if then != now]
    inputs = []
    if {k: v for k, v in old_teacher.items() if k != "dtype"} != \
            {k: v for k, v in new_teacher.items() if k != "dtype"}:
        inputs.append(f"another teacher (--teacher: fingerprint "
                      f"{str(old_teacher.get('fingerprint'))[:12]}... then, "
                      f"{str(new_teacher.get('fingerprint'))[:12]}... now; its weights or "
                      "config.json changed, or it is another folder)")
    same_shape = all(old_data.get(k) == new_data.get(k) for k in ("mode", "seq_len", "pad_id"))
    # An older format recorded fewer keys: the ones it has tell whether the shards changed.
    if same_shape and old_data != {k: new_data.get(k) for k in old_data}:
        inputs.append("other token shards (--data: their content differs)")
    if old.get("tokenizer") != new.get("tokenizer"):
        inputs.append("shards of another tokenizer")
    if old.get("format_version") != new.get("format_version"):
        inputs.append(f"another neox-distill (cache format_version "
                      f"{old.get('format_version')}; this one writes {new.get('format_version')})")
    if not arguments and not inputs:  # only what follows from the rest (the record layout)
        inputs.append("another record layout")
    return arguments, inputs


def _nothing_durable(state: dict) -> bool:
    """Whether a recorded build had made nothing durable yet (no shard, no record row)."""
    pending = state["pending"]
    return not state["shards"] and (pending is None or pending["rows"] == 0)


def _read_record(path: Path) -> tuple[dict, dict]:
    """(settings, state) of a teacher cache job record, checked enough that nothing it names
    can make a resume touch a file the build did not create; CacheError otherwise."""
    try:
        record = json.loads(path.read_text())
        settings, state = record["settings"], record["state"]
        if not all(isinstance(e["name"], str) and isinstance(e["sha256"], str)
                   for e in state["shards"]):
            raise TypeError("a finished shard without a name or sha256")
        pending = state["pending"]
        if pending is not None and not _is_pending_temporary(pending):
            raise ValueError(f"pending file {pending['temporary']!r} is not one this tool "
                             "writes")
        if pending is not None:
            int(pending["rows"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CacheError(f"{path}: a damaged teacher cache job record ({exc}); nothing was "
                         "deleted: choose another --out") from None
    return settings, state


def refuse_foreign(folder: Path, owned: tuple[str, ...] = ()) -> None:
    """CacheError, touching nothing, unless `folder` is missing, empty, or a teacher cache
    folder (finished or with its job record): a file, token shards (a preprocess job's
    output, finished or not), or a folder holding anything else (`owned`: names of files the
    caller itself keeps there, such as its lock) is the user's and is refused."""
    if folder.exists() and not folder.is_dir():
        raise CacheError(f"{folder}: exists and is not a folder; --out must be one")
    if not folder.is_dir():
        return
    shards = shards_folder_message(folder)
    if shards:
        raise CacheError(f"{shards}; nothing was touched: choose another --out for the cache")
    record = folder / PROGRESS_NAME
    if (folder / MANIFEST_NAME).is_file():
        return  # read_cache_manifest says what a manifest of another kind is
    if record.is_file():
        if job_record_kind(record) != "cache-teacher":
            raise CacheError(f"{record}: not a teacher cache job record; nothing was touched: "
                             "choose another --out")
        return
    ours = temporary_leftovers(folder, PROGRESS_NAME)  # a first record never landed
    others = [p.name for p in folder.iterdir() if p not in ours and p.name not in owned]
    if others:
        raise CacheError(f"{folder}: not empty and not a teacher cache folder (no "
                         f"{MANIFEST_NAME}, no {PROGRESS_NAME}); it holds "
                         f"{shown_names(others)}. Nothing was touched. Choose a new or empty "
                         "--out folder")


class CacheJob:
    """The .progress.json of one build (module docstring); `state` is what it records."""

    def __init__(self, folder: Path, settings: dict, command: str):
        self.folder, self.settings, self.command = folder, settings, command
        self.state = {"shards": [], "pending": None, "next_item": 0}
        self.tag = secrets.token_hex(4)

    @property
    def path(self) -> Path:
        return self.folder / PROGRESS_NAME

    @classmethod
    def open(cls, folder: Path, settings: dict, command: str,
             owned: tuple[str, ...] = ()) -> CacheJob | dict:
        """The job to run (new or resumed), or the manifest of a finished identical build.
        `owned`: names of the caller's own files in the folder (its lock)."""
        refuse_foreign(folder, owned)
        if (folder / MANIFEST_NAME).is_file():
            return _finished_manifest(folder, settings)
        folder.mkdir(parents=True, exist_ok=True)
        job = cls(folder, settings, command)
        if job.path.is_file():
            job._resume()
        else:
            job._start()
        return job

    def _start(self) -> None:
        for path in temporary_leftovers(self.folder, PROGRESS_NAME):
            path.unlink()
        self.save()

    def _resume(self) -> None:
        settings, state = _read_record(self.path)
        if settings != self.settings and _nothing_durable(state):
            self._discard(state)  # a build that wrote nothing: no work of it to keep
            return self._start()
        if settings != self.settings:
            arguments, inputs = _changed(settings, self.settings)
            command = json.loads(self.path.read_text()).get("command")
            advice = (f"to finish it, run its own command again ({command})" if arguments else
                      f"to finish it, restore what changed as it was (its command: {command})")
            raise CacheError(f"{self.path}: an interrupted build is in this folder, built with "
                             f"{'; '.join(arguments + inputs)}. Nothing was touched: {advice}, "
                             "or choose another --out for a new build")
        expected = [entry["name"] for entry in settings["data"]["shards"]]
        names = [entry["name"] for entry in state["shards"]]
        pending = state["pending"]
        if names != expected[:len(names)] or (pending and pending["name"] not in expected):
            raise CacheError(f"{self.path}: names files that are not this data's shards; "
                             "nothing was deleted: choose another --out")
        for entry in state["shards"]:
            path = self.folder / f"{entry['name']}{SHARD_SUFFIX}"
            if not path.is_file() or file_sha256(path) != entry["sha256"]:
                raise CacheError(f"{path}: finished earlier, but missing or changed since; "
                                 "nothing was deleted: choose another --out")
        self.state = state
        for leftover in temporary_leftovers(self.folder, PROGRESS_NAME):
            leftover.unlink()
        self.save()

    def _discard(self, state: dict) -> None:
        """Forget a recorded build that made nothing durable (refused or stopped before its
        first checkpoint): its pending file (named as this tool names them) and its record."""
        if state["pending"] is not None:
            (self.folder / state["pending"]["temporary"]).unlink(missing_ok=True)
        self.path.unlink()

    def save(self) -> None:
        record = {"settings": self.settings, "command": self.command, "state": self.state}
        with named_write_errors(self.path):
            write_json_atomic(self.path, record, indent=1, sort_keys=True)

    def complete(self, manifest: dict) -> None:
        """Write the manifest (the cache is usable from then on) and drop the record."""
        with named_write_errors(self.folder / MANIFEST_NAME):
            write_json_atomic(self.folder / MANIFEST_NAME, manifest, indent=1, sort_keys=True)
        self.path.unlink(missing_ok=True)
        fsync_dir(self.folder)


@contextlib.contextmanager
def named_write_errors(path: Path):
    """An OSError of a write to `path` that names no file (a full disk, a file-size limit)
    is raised again naming `path`: the user must learn where the space ran out."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None:
            raise
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc


def _finished_manifest(folder: Path, settings: dict) -> dict:
    manifest = read_cache_manifest(folder)
    made_with = {k: manifest.get(k) for k in settings}
    if made_with != settings:
        arguments, inputs = _changed(made_with, settings)
        raise CacheError(f"{folder / MANIFEST_NAME}: the folder holds a cache built with "
                         f"{'; '.join(arguments + inputs)}. Nothing was touched: choose another "
                         "--out for a new build")
    for entry in manifest["shards"]:
        path = folder / f"{entry['name']}{SHARD_SUFFIX}"
        if not path.is_file() or file_sha256(path) != entry["sha256"]:
            raise CacheError(f"{path}: the cache is complete, but this shard is missing or "
                             "damaged (its sha256 differs from the manifest's); nothing was "
                             "touched: choose another --out to rebuild it")
    _drop_finished_record(folder / PROGRESS_NAME, settings)
    return manifest


def _drop_finished_record(path: Path, settings: dict) -> None:
    """Delete the job record a build killed between its manifest and the record's removal
    left behind, after checking it is the record of this build (these settings); anything
    else by that name is refused and kept."""
    if not path.is_file():
        return
    try:
        ours = json.loads(path.read_text())["settings"] == settings
    except (OSError, ValueError, KeyError, TypeError):
        ours = False
    if not ours:
        raise CacheError(f"{path}: the cache is complete, but this file is not its own build "
                         "record; nothing was deleted: move it away")
    path.unlink()


def _pending_temporary(name: str, tag: str) -> str:
    """The temporary name a shard of the build tagged `tag` is written under."""
    return f"{name}{SHARD_SUFFIX}.{tag}.tmp"


def _is_pending_temporary(pending: dict) -> bool:
    """Whether a record's pending file is named as this tool names it (so a damaged or
    foreign record can never make a resume rename, truncate or append to another file)."""
    name, temporary = pending["name"], pending["temporary"]
    if not (isinstance(name, str) and isinstance(temporary, str)
            and Path(temporary).name == temporary):  # a bare name: a file in the cache folder
        return False
    pattern = re.escape(_pending_temporary(name, "TAG")).replace("TAG", "[0-9a-f]{8}")
    return re.fullmatch(pattern, temporary) is not None


class RowStream:
    """The records of the token stream in order, one file per token shard (module docstring).

    Resumes from the job's state: the finished shards are kept, the pending one is truncated
    to its durable prefix (its sha256 checked) and appended to."""

    def __init__(self, job: CacheJob, dtype: np.dtype):
        self.job, self.dtype = job, dtype
        self.shard_rows = [entry["tokens"] for entry in job.settings["data"]["shards"]]
        self.index = len(job.state["shards"])
        self.cursor = sum(self.shard_rows[: self.index])  # rows durable or in the open file
        self.handle = None
        self.digest = hashlib.sha256()
        if job.state["pending"] is not None:
            self._reopen(job.state["pending"])

    def _paths(self, pending: dict) -> tuple[Path, Path]:
        final = self.job.folder / f"{pending['name']}{SHARD_SUFFIX}"
        return final, self.job.folder / pending["temporary"]

    def _reopen(self, pending: dict) -> None:
        final, temporary = self._paths(pending)
        if final.is_file() and not temporary.exists():
            os.replace(final, temporary)  # killed between the rename and the record
        durable = pending["rows"] * self.dtype.itemsize
        digest = _hash_prefix(temporary, durable) if durable else hashlib.sha256()
        if digest is None or digest.hexdigest() != pending["sha256"]:
            raise CacheError(f"{temporary}: the shard being written does not match its record "
                             f"in {PROGRESS_NAME}; nothing was deleted: choose another --out")
        self.handle = open(temporary, "r+b" if temporary.exists() else "xb")  # noqa: SIM115
        with named_write_errors(temporary):
            self.handle.truncate(durable)
        self.handle.seek(durable)
        self.digest = digest
        self.cursor += pending["rows"]

    def _open_next(self) -> None:
        name = self.job.settings["data"]["shards"][self.index]["name"]
        temporary = _pending_temporary(name, self.job.tag)
        self.job.state["pending"] = {"name": name, "temporary": temporary, "rows": 0,
                                     "sha256": hashlib.sha256().hexdigest()}
        self.job.save()  # recorded before the file exists
        self.handle = open(self.job.folder / temporary, "xb")  # noqa: SIM115 - closed in _finish
        self.digest = hashlib.sha256()

    def _shard_start(self) -> int:
        return sum(self.shard_rows[: self.index])

    def _pending_path(self) -> Path:
        return self.job.folder / self.job.state["pending"]["temporary"]

    def _refuse_invalid(self, start: int, records: np.ndarray) -> None:
        """CacheError before writing a record training would refuse (engine.data.teacher_cache
        .record_problem): a teacher whose logits overflowed gives NaN log-probabilities."""
        settings = self.job.settings
        problem = record_problem(records, settings["kind"], settings["valid_vocab"])
        if problem is None:
            return
        row = start + problem[0]
        shard = int(np.searchsorted(np.cumsum(self.shard_rows), row, side="right"))
        local = row - sum(self.shard_rows[:shard])
        name = settings["data"]["shards"][shard]["name"]
        raise CacheError(f"{self.job.folder / name}{SHARD_SUFFIX}: record {local} would not be a "
                         f"valid teacher distribution ({problem[1]}); the teacher's logits are "
                         "not finite there (a bf16 or fp16 teacher can overflow: try --dtype "
                         "fp32). It was not written")

    def write(self, start: int, records: np.ndarray) -> None:
        """Records for rows [start, start + len); rows from the cursor to start are empty.

        Rows below the cursor are already written: a resumed build replays the items after
        its last checkpoint, and a shard may have been finished (and recorded) since then."""
        if start < self.cursor:
            records = records[self.cursor - start:]
            start = self.cursor
        if start > self.cursor:
            self.write(self.cursor, np.zeros(start - self.cursor, dtype=self.dtype))
        self._refuse_invalid(start, records)
        done = 0
        while done < len(records):
            if self.handle is None:
                self._open_next()
            room = self._shard_start() + self.shard_rows[self.index] - self.cursor
            piece = np.ascontiguousarray(records[done:done + room]).tobytes()
            with named_write_errors(self._pending_path()):
                self.handle.write(piece)
            self.digest.update(piece)
            taken = min(room, len(records) - done)
            done += taken
            self.cursor += taken
            if taken == room:
                self._finish()

    def _finish(self) -> None:
        pending = self.job.state["pending"]
        with named_write_errors(self._pending_path()):
            self.handle.flush()
            os.fsync(self.handle.fileno())
            self.handle.close()
        self.handle = None
        final, temporary = self._paths(pending)
        if final.exists():
            raise CacheError(f"{final}: exists, but this job did not write it; nothing was "
                             "overwritten: move it away and run again")
        os.replace(temporary, final)
        fsync_dir(self.job.folder)
        rows = self.shard_rows[self.index]
        self.job.state["shards"].append({"name": pending["name"], "rows": rows,
                                         "bytes": rows * self.dtype.itemsize,
                                         "sha256": self.digest.hexdigest()})
        self.job.state["pending"] = None
        self.index += 1

    def finish_all(self) -> None:
        """Empty records to the end of the stream; every shard finished (empty ones too)."""
        self.write(sum(self.shard_rows), np.zeros(0, dtype=self.dtype))
        while self.index < len(self.shard_rows):  # trailing token shards without tokens
            self._open_next()
            self._finish()

    def checkpoint(self, next_item: int) -> None:
        """Make what is written durable and record it with the item to continue from."""
        if self.handle is not None:
            with named_write_errors(self._pending_path()):
                self.handle.flush()
                os.fsync(self.handle.fileno())
            pending = self.job.state["pending"]
            pending["rows"] = self.cursor - self._shard_start()
            pending["sha256"] = self.digest.hexdigest()
        self.job.state["next_item"] = next_item
        self.job.save()

    def close(self) -> None:
        """Close the pending file after an error (a build that finishes has closed it): its
        durable prefix is what the record says, whatever this last flush manages."""
        if self.handle is not None:
            with contextlib.suppress(OSError):  # the error being raised already names it
                self.handle.close()
            self.handle = None


def batch_seed(seed: int, first_item: int) -> int:
    """The sampling seed of the batch starting at first_item: the same whether the build ran
    through or resumed."""
    return int(np.random.SeedSequence([seed, first_item]).generate_state(1, dtype=np.uint64)[0])


def _check_token_ids(dataset, indices, batch: dict, settings: dict) -> None:
    """CacheError naming the shard file of the first token the cache cannot serve: a target
    at or above the scored vocabulary (--valid-vocab), an input outside the teacher's
    embedding. The start-up checks cover shards whose manifest records their largest id; this
    covers shards without one."""
    labels, inputs = batch["labels"], batch["input_ids"]
    limits = ((labels, settings["valid_vocab"], "--valid-vocab"),
              (inputs, settings["teacher"]["vocab_size"], "the teacher's vocabulary"))
    for tokens, limit, what in limits:
        bad = ((tokens >= limit) | ((tokens < 0) & (tokens != IGNORE_INDEX))).nonzero()
        if not len(bad):
            continue
        row, col = (int(v) for v in bad[0])
        token = item_rows(dataset, int(indices[row]))[0] + col + (tokens is labels)
        shards = dataset.shards
        shard = int(np.searchsorted(shards.token_starts, token, side="right")) - 1
        raise CacheError(f"{shards.shards[shard].bin_path}: token "
                         f"{token - int(shards.token_starts[shard])} is id "
                         f"{int(tokens[row, col])}, outside {what} ({limit}); the shards were "
                         "made with another tokenizer than the teacher's, or --valid-vocab is "
                         "too small")


def _teacher_batch(dataset, indices, teacher_chunks, settings: dict) -> tuple[list, list]:
    """(the teacher's logit chunks at the batch's trained positions, trained per item)."""
    batch = dataset.get_batch(indices)
    _check_token_ids(dataset, indices, batch, settings)
    trained = [item_rows(dataset, int(i))[1] for i in indices.tolist()]
    seq_len = batch["input_ids"].shape[1]
    positions = torch.cat([torch.arange(n) + row * seq_len for row, n in enumerate(trained)])
    return list(teacher_chunks(batch["input_ids"], positions)), trained


def _encode_and_write(stream, dataset, indices, chunks, trained, dtype) -> None:
    """Encode one batch's logit chunks into records and write them at the items' rows."""
    settings = stream.job.settings
    generator = None
    if settings["kind"] == "sampled" and chunks:
        generator = torch.Generator(device=chunks[0].device)
        generator.manual_seed(batch_seed(settings["seed"], int(indices[0])))
    flat = encode_batch(chunks, kind=settings["kind"], width=settings["width"],
                        temperature=settings["temperature"], valid_vocab=settings["valid_vocab"],
                        dtype=dtype, generator=generator)
    for item, records in zip(indices.tolist(), np.split(flat, np.cumsum(trained)[:-1]),
                             strict=True):
        stream.write(item_rows(dataset, item)[0], records)


def build_cache(folder, settings: dict, command: str, dataset, teacher_chunks, *,
                show_progress: bool | None = None, checkpoint_seconds: float = 10.0,
                owned: tuple[str, ...] = ()) -> dict:
    """Run (or resume, or return) the build of the cache `settings` describe; the manifest.

    teacher_chunks(input_ids [B, L], positions [P] flat indices) yields the teacher's logits
    of those positions, in order, as [rows, V] chunks. `owned`: names of the caller's own
    files in the folder (the lock it holds over the build).
    """
    job = CacheJob.open(Path(folder), settings, command, owned)
    if isinstance(job, dict):
        return job
    record = settings["record"]
    dtype = record_dtype(record["width"], record["ids"], record["values"])
    stream = RowStream(job, dtype)
    progress = Progress("cache", total=len(dataset), unit="items",
                        initial=job.state["next_item"], enabled=show_progress)
    try:
        _write_items(job, stream, dataset, teacher_chunks, dtype, progress, checkpoint_seconds)
        stream.finish_all()
    finally:
        stream.close()
        progress.close()
    manifest = {**settings, "shards": job.state["shards"], "totals": _totals(job, dtype)}
    job.complete(manifest)
    return manifest


def _write_items(job, stream, dataset, teacher_chunks, dtype, progress, checkpoint_seconds):
    """The teacher's forward of batch b + 1 (this thread) overlaps encoding and writing batch
    b (one worker thread, so records land in order): encoding 2048-50304-wide rows costs about
    as much as a small teacher's forward on a CPU (see benchmarks/README.md)."""
    batch, state = job.settings["batch"], {"last": time.monotonic(), "done": 0}

    def finish(indices, chunks, trained):
        _encode_and_write(stream, dataset, indices, chunks, trained, dtype)
        state["done"] += 1
        failpoints.kill_after("teacher_cache.batches", state["done"])
        if time.monotonic() - state["last"] >= checkpoint_seconds:
            stream.checkpoint(int(indices[-1]) + 1)
            state["last"] = time.monotonic()
        progress.update(len(indices), tokens=sum(trained))

    pending = None
    with ThreadPoolExecutor(max_workers=1) as writer:
        for first in range(job.state["next_item"], len(dataset), batch):
            indices = np.arange(first, min(first + batch, len(dataset)))
            chunks, trained = _teacher_batch(dataset, indices, teacher_chunks, job.settings)
            if pending is not None:
                pending.result()  # the previous batch is written (or its error raised here)
            pending = writer.submit(finish, indices, chunks, trained)
        if pending is not None:
            pending.result()


def _totals(job: CacheJob, dtype: np.dtype) -> dict:
    rows = sum(entry["rows"] for entry in job.state["shards"])
    return {"shards": len(job.state["shards"]), "rows": rows, "bytes": rows * dtype.itemsize,
            "bytes_per_token": dtype.itemsize}
