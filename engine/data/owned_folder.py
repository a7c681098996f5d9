"""A tool's own output folder, emptied for a rerun: only what the tool writes there is deleted.

A tool that writes a whole folder of results (the quickstart, a study) starts over in it only
when the folder proves to be its own: a marker file the tool writes first is there, and every
entry is one of the names the tool writes (or a temporary of an atomic write of one of them,
engine.data.atomic.temporary_leftovers). Anything else, a user's notes beside the results for
instance, makes it refuse and leave the folder as it was. The named entries are the tool's
own output folders and files, replaced whole.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

from engine.data.atomic import temporary_leftovers


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
