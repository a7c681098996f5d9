"""One run per out_dir: an exclusive lock on <out_dir>/.lock for the run's whole lifetime.

Two runs in one folder delete each other's temporary checkpoints, interleave metrics.jsonl
and leave a config.toml that describes neither. fcntl.flock is released by the kernel when
the holder dies, even by SIGKILL, so a crashed run never leaves a stale lock behind; the
file's content (pid, host, start time, command) only tells a second run who holds it. The
file itself stays: deleting it would let a third run lock a different file of the same name.
(flock is per host on some network file systems: keep one out_dir per machine there.)
Under torchrun only rank 0 takes the lock; every rank learns whether it got it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from engine import dist

LOCK_NAME = ".lock"


class RunLocked(RuntimeError):
    """Another process holds the run folder; the message says which one."""


def _holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        info = json.loads(os.read(fd, 1 << 16).decode("utf-8"))
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}, "
                f"command: {info['command']}")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        return "a process that has not yet written its name"


def is_lock_record_text(text: str) -> bool:
    """Empty (just created) or a record a run wrote (a JSON object with its pid)."""
    if not text.strip():
        return True
    try:
        record = json.loads(text)
    except json.JSONDecodeError:
        return False
    return isinstance(record, dict) and "pid" in record


def _is_lock_record(fd: int) -> bool:
    """The file may be rewritten (is_lock_record_text); anything else by that name is the
    user's."""
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        return is_lock_record_text(os.read(fd, 1 << 16).decode("utf-8"))
    except UnicodeDecodeError:
        return False


def _same_file(fd: int, path: Path) -> bool:
    """The locked file is still the one at `path` (a failed launch may have removed it)."""
    try:
        return os.path.samestat(os.fstat(fd), os.stat(path))
    except FileNotFoundError:
        return False


class RunLock:
    """flock on <out_dir>/.lock (created with out_dir when missing); release() or exit frees it.

    release(discard=True) (a launch refused before it wrote anything) also removes the lock
    file and the out_dir when this lock created them, or puts the earlier record back, so the
    refused launch leaves the disk as it found it. A process that opened the file before it
    was removed notices on locking (its file is no longer the one at the path) and opens the
    path again.

    `setting` and `holder` name the folder and its user in the messages: the run's
    ("run.out_dir", "run") by default; the teacher cache build locks its --out the same way.
    """

    def __init__(self, out_dir: str | os.PathLike, *, setting: str = "run.out_dir",
                 holder: str = "run"):
        self.path = Path(out_dir) / LOCK_NAME
        self.setting, self.holder = setting, holder
        self._fd: int | None = None
        self._created: list[Path] = []  # what acquire() created, deepest last
        self._previous = b""  # the record the file held before acquire()
        self.kept = False

    def keep(self) -> None:
        """The launch is past its checks: what acquire() created stays, whatever happens."""
        self.kept = True

    def acquire(self) -> None:
        for _ in range(100):
            fd = self._open_and_lock()
            if _same_file(fd, self.path):
                break
            os.close(fd)  # removed by a refused launch while we waited: lock the new file
        else:
            raise RunLocked(f"{self.path}: keeps being replaced; is another launch looping?")
        if not _is_lock_record(fd):
            os.close(fd)
            raise RunLocked(
                f"{self.path}: exists and is not a neox-distill lock record; not overwriting "
                f"it (move it away, or choose another {self.setting})"
            )
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                  "command": " ".join([sys.executable, *sys.argv])}
        self._previous = os.pread(fd, 1 << 16, 0)  # put back by a discarding release()
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
        self._fd = fd

    def _open_and_lock(self) -> int:
        """Open (creating the folders and the file where missing) and flock the path."""
        missing = [p for p in (*reversed(self.path.parent.parents), self.path.parent)
                   if not p.exists()]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
            self._created = [*missing, self.path]
        except FileExistsError:
            fd = os.open(self.path, os.O_RDWR)
            self._created = missing
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise RunLocked(
                f"{self.setting}={self.path.parent}: in use by another {self.holder} "
                f"({holder}); wait for it to finish, or choose another {self.setting}"
            ) from None
        return fd

    def release(self, *, discard: bool = False) -> None:
        """Unlock; with `discard`, first remove what acquire() created (the file, then the
        folders, each only while still empty)."""
        if self._fd is None:
            return
        if discard and self.path not in self._created:  # the earlier run's record again
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, self._previous, 0)
        if discard:
            for path in reversed(self._created):
                try:
                    path.unlink() if path == self.path else path.rmdir()
                except OSError:
                    break  # a folder that is no longer empty stays, and so do its parents
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> bool:
        self.release()
        return False


@contextlib.contextmanager
def hold_run_lock(out_dir: str | os.PathLike, info: dist.DistInfo) -> Iterator[RunLock]:
    """Rank 0 holds the lock for the block; every rank raises RunLocked when it is taken.

    Until the block calls the lock's keep() (the launch passed its checks and writes), an
    exception leaving it removes the lock file and out_dir where the lock created them."""
    lock = RunLock(out_dir)
    problem = None
    if info.is_main:
        try:
            lock.acquire()
        except (RunLocked, OSError) as exc:
            problem = str(exc) if isinstance(exc, RunLocked) else (
                f"run.out_dir={out_dir}: cannot create the lock file {lock.path} "
                f"({exc.strerror or exc})")
    problems = [p for p in dist.all_gather_object(problem) if p]
    if problems:
        lock.release()
        raise RunLocked(problems[0])
    try:
        yield lock
    except BaseException:
        lock.release(discard=not lock.kept)
        raise
    lock.release()
