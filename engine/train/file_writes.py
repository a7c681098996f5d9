"""Files the engine writes through libraries (safetensors): umask and clear write errors.

safetensors creates its files 0600, so without a fix a checkpoint or export would be
unreadable by the other users of a shared run folder; every other file the engine writes
follows the umask (engine/data/atomic.py). And a full disk surfaces as a library message
("Error while serializing: I/O error ...", or an OSError without a file name): the user
needs "no space left on device" and the path.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path

from safetensors import SafetensorError

from engine.data.atomic import current_umask

_DISK_FULL = {errno.ENOSPC: "no space left on device",
              errno.EDQUOT: "no space left on device (disk quota exceeded)"}
# Write errors worth one clear line: the OS's, and those of the libraries that write for us.
WRITE_ERRORS = (OSError, SafetensorError)


class WriteFailed(RuntimeError):
    """A checkpoint or export could not be written; the message names the path and why."""


def follow_umask(folder: str | os.PathLike) -> None:
    """Give every file and folder below `folder` the mode a plain open/mkdir would (umask)."""
    mask = current_umask()
    for dirpath, _, filenames in os.walk(folder):
        os.chmod(dirpath, 0o777 & ~mask)
        for name in filenames:
            os.chmod(Path(dirpath) / name, 0o666 & ~mask)


def is_disk_full(exc: BaseException) -> bool:
    return describe_write_error(exc) in _DISK_FULL.values()


def describe_write_error(exc: BaseException) -> str:
    """'no space left on device' for a full disk or quota, else the OS's or library's words
    (with the file an OSError names)."""
    if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
        return _DISK_FULL[exc.errno]
    text = str(exc)
    if "os error 28" in text or "No space left" in text:
        return _DISK_FULL[errno.ENOSPC]
    if "os error 122" in text or "quota exceeded" in text.lower():
        return _DISK_FULL[errno.EDQUOT]
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return exc.strerror.lower() + where
    return text or "write failed"
