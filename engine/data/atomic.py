"""Atomic file writes: nothing half-written ever replaces a good file.

The ground floor of the project's file handling: data/ (shards, manifests), the engine
(checkpoints, exports, metrics), the benchmarks and the tools all write through here.

A run can be killed at any moment (preemption, OOM, Ctrl-C), and a reader (a resumed run, a
report script, another rank) must then find either the old file or the complete new one,
never a torn one. So every whole-file write here goes to a temporary name in the same folder,
is flushed and fsynced, renamed over the target with ``os.replace`` (atomic on one file
system), and the folder is fsynced so the rename itself survives a power loss.

The new file gets the permissions a plain ``open(path, "w")`` would give (0666 less the
umask), not the 0600 of ``mkstemp``, so results stay readable by others where they were.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a file's data to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames and new entries in a folder durable by fsyncing the folder itself."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; the rename is still atomic
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def open_atomic(
    path: str | os.PathLike, mode: str = "w", *, encoding: str | None = "utf-8"
) -> Iterator[IO[Any]]:
    """Open a temporary file beside `path`; on a clean exit it replaces `path` atomically.

    `mode` is "w" (text, in `encoding`) or "wb". On an exception the temporary file is
    removed and `path` is left as it was. The parent folder is created when missing.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp: a unique name per call, so concurrent writers never share a temporary file.
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):
            os.fchmod(fd, 0o666 & ~current_umask())  # mkstemp's 0600 would hide it from others
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def temporary_leftovers(folder: str | os.PathLike, name: str) -> list[Path]:
    """What `open_atomic` leaves for `name` in `folder` when killed mid-write.

    The temporary names are ``.<name>.<random>.tmp`` (see open_atomic); a job that records
    which `name`s it writes can remove exactly these, and nothing else, when it resumes.
    """
    pattern = re.compile(rf"\.{re.escape(name)}\.[A-Za-z0-9_]+\.tmp")
    folder = Path(folder)
    return [p for p in folder.glob(f".{glob.escape(name)}.*.tmp") if pattern.fullmatch(p.name)]


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Replace `path` with `text` atomically."""
    with open_atomic(path, "w", encoding=encoding) as handle:
        handle.write(text)


def write_json_atomic(
    path: str | os.PathLike,
    payload: Any,
    *,
    indent: int | None = 2,
    default: Callable[[Any], Any] | None = None,
    sort_keys: bool = False,
    trailing_newline: bool = True,
) -> None:
    """Replace `path` with `payload` as JSON atomically (options as in ``json.dumps``)."""
    text = json.dumps(payload, indent=indent, default=default, sort_keys=sort_keys)
    write_text_atomic(path, text + "\n" if trailing_newline else text)


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file and folder below `folder` (itself included)."""
    for dirpath, _, filenames in os.walk(folder):
        for name in filenames:
            fsync_file(Path(dirpath) / name)
        fsync_dir(dirpath)


def replace_folder(staged: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a complete, fsynced `staged` folder to `final`, replacing any folder there.

    os.replace cannot rename a folder over a non-empty one, so an existing `final` is first
    moved aside into a hidden folder beside it and deleted only once the new one is in
    place: a complete copy, old or new, is on disk at every moment.
    """
    staged, final = Path(staged), Path(final)
    parent = final.parent
    if final.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=parent))
        os.replace(final, old / final.name)
        os.replace(staged, final)
        fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
        fsync_dir(parent)


@contextlib.contextmanager
def staged_folder(final: str | os.PathLike) -> Iterator[Path]:
    """Stage a folder, write into it, fsync it, swap it into place; clean up on failure.

    Yields a fresh hidden folder beside `final` (``.<name>.tmp-XXXX``, permissions as a plain
    ``mkdir`` would give). Files written into it need no atomic writes of their own: on a
    clean exit everything below it is fsynced and it replaces `final` through
    `replace_folder`; on an exception it is deleted and `final` is left as it was.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staged = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(staged, 0o777 & ~current_umask())  # mkdtemp's 0700 would hide it from others
        yield staged
        fsync_tree(staged)
        replace_folder(staged, final)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise


__all__ = [
    "current_umask",
    "fsync_dir",
    "fsync_file",
    "fsync_tree",
    "open_atomic",
    "replace_folder",
    "staged_folder",
    "temporary_leftovers",
    "write_json_atomic",
    "write_text_atomic",
]
