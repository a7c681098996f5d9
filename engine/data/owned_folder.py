"""A tool's own output folder, emptied for a rerun: only what the tool writes there is deleted.

A tool that writes a whole folder of results (the quickstart, a study) starts over in it only
when the folder proves to be its own: a marker file the tool writes first is there, and every
entry is one of the names the tool writes (or a temporary of an atomic write of one of them,
engine.data.atomic.temporary_leftovers). Anything else, a user's notes beside the results for
instance, makes it refuse and leave the folder as it was. The named entries are the tool's
own output folders and files, replaced whole.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Collection
from pathlib import Path

from engine.data.atomic import temporary_leftovers
from engine.data.shards import file_sha256


def shown_names(names) -> str:
    """The first six of `names`, sorted, and how many more: for messages about a folder."""
    names = sorted(names)
    return ", ".join(names[:6]) + (f" and {len(names) - 6} more" if len(names) > 6 else "")


class ForeignFolderError(ValueError):
    """The folder is not (only) the tool's own output; nothing was deleted."""


def clear_owned_folder(folder: str | Path, *, markers: Collection[str],
                       names: Collection[str]) -> None:
    """Empty `folder` (absent or empty: nothing to do) if one of `markers` is in it and every
    entry is one of `markers` + `names`; otherwise raise ForeignFolderError, deleting nothing.

    The markers go last, so a rerun after an interruption still finds the folder its own."""
    folder = Path(folder)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise ForeignFolderError(f"{folder}: exists and is not a folder")
    entries = list(folder.iterdir())
    if not entries:
        return
    if not any((folder / marker).is_file() for marker in markers):
        raise ForeignFolderError(f"{folder}: not empty and not written by this tool (no "
                                 f"{' or '.join(markers)}); nothing was deleted")
    own = {*markers, *names}
    temporaries = {p for name in own for p in temporary_leftovers(folder, name)}
    strangers = [p.name for p in entries if p.name not in own and p not in temporaries]
    if strangers:
        raise ForeignFolderError(f"{folder}: holds {shown_names(strangers)}, which this tool "
                                 "does not write; "
                                 "nothing was deleted (move them away, or choose another folder)")
    for path in sorted(entries, key=lambda p: p.name in markers):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


# --------------------------------------------------------------------------------------
# Folders of files the engine wrote whole (an export, a consolidated checkpoint): a marker,
# written last, records each file's sha256, so a rerun replaces the folder only while every
# file is still as the engine wrote it.
# --------------------------------------------------------------------------------------

def _file_entry(path: Path) -> dict:
    stat = path.stat()
    return {"sha256": file_sha256(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def write_folder_marker(folder: Path, marker: str, fmt: str, fields: dict) -> None:
    """Write `marker` into `folder` (a staged folder, swapped in by the caller): `fields` and
    every other file's sha256, size and modification time."""
    files = {p.name: _file_entry(p) for p in sorted(folder.iterdir())
             if p.is_file() and p.name != marker}
    record = {"format": fmt, "format_version": 2, **fields, "files": files}
    (folder / marker).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")


def read_folder_marker(folder: Path, marker: str, fmt: str) -> dict | None:
    """The marker's record when `folder` holds one of format `fmt`, else None."""
    try:
        record = json.loads((folder / marker).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict) or record.get("format") != fmt:
        return None
    return record if isinstance(record.get("files"), (dict, list)) else None


def _unchanged(path: Path, entry, marker_mtime_ns: int) -> bool:
    """The file is as the marker records it: by sha256 (skipped when size and modification
    time are both the recorded ones); a version-1 marker (names only) trusts a file not
    modified after the marker was written."""
    if not path.is_file() or path.is_symlink():
        return False
    stat = path.stat()
    if not isinstance(entry, dict):  # format_version 1: a list of names, no hashes
        return stat.st_mtime_ns <= marker_mtime_ns
    if stat.st_size != entry.get("size"):
        return False
    if stat.st_mtime_ns == entry.get("mtime_ns"):
        return True
    return file_sha256(path) == entry.get("sha256")


def changed_since_marked(folder: Path, marker: str, record: dict) -> list[str]:
    """Entries of `folder` the engine did not write as they are now: added since the marker
    was written, or edited (their sha256 no longer the recorded one)."""
    files = record["files"]
    entries = files if isinstance(files, dict) else dict.fromkeys(files)
    marker_mtime = (folder / marker).stat().st_mtime_ns
    changed = []
    for path in sorted(folder.iterdir()):
        if path.name == marker:
            continue
        if path.name not in entries:
            changed.append(f"{path.name} (added)")
        elif not _unchanged(path, entries[path.name], marker_mtime):
            changed.append(f"{path.name} (edited)")
    return changed
