"""The record of one engine.data.preprocess job in its output folder: what it owns, where it
resumes.

Why: an output folder may hold the user's files (it may even be the inputs' folder), so
preprocess deletes only names it recorded before creating them. ``.progress.json`` is written
before the job's first file and again before each new shard, so at every moment it names all
that the job created and has not yet recorded as a finished shard: the shard being written,
its temporary name, and its real names (for a crash between the rename and the record). A
rerun deletes exactly those and continues; a non-empty folder without a record or a manifest
is not ours and is refused. While the record exists the folder is unfinished: ShardSet
refuses to train on it and quotes the record's command that finishes the job.
"""

from __future__ import annotations

import json
import re
import secrets
from pathlib import Path

from engine.data.atomic import temporary_leftovers, write_json_atomic
from engine.data.owned_folder import shown_names
from engine.data.shards import (
    FORMAT_NAME,
    FORMAT_VERSION,
    MANIFEST_NAME,
    PROGRESS_NAME,
    file_sha256,
    shard_paths,
)

SHARD_NAME = re.compile(r"shard_\d{5}")


class PreprocessError(ValueError):
    """Bad input or a bad output folder; the message names the file (and line)."""


def read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PreprocessError(f"{path}: unreadable: {exc}; delete it to start over") from None
    if not isinstance(obj, dict):
        raise PreprocessError(f"{path}: not a JSON object; delete it to start over")
    return obj


def shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def verified_prefix(folder: Path, shards: list[dict]) -> list[dict]:
    """The leading shards whose files exist and match their recorded sha256."""
    kept = []
    for i, entry in enumerate(shards):
        bin_path, idx_path = shard_paths(folder / entry["name"])
        if entry["name"] != shard_name(i) or not (bin_path.is_file() and idx_path.is_file()):
            break
        if bin_path.stat().st_size != entry["bin_bytes"]:
            break
        if file_sha256(idx_path) != entry["idx_sha256"] or \
                file_sha256(bin_path) != entry["bin_sha256"]:
            break
        kept.append(entry)
    return kept


# ------------------------------------------------------------------ comparing settings


def _input_change(old: list, new: list) -> str:
    if [e.get("path") for e in old] != [e.get("path") for e in new]:
        return "other inputs"
    edited = [n["path"] for o, n in zip(old, new, strict=True) if o != n]
    return f"other input content ({', '.join(edited)} changed since)"


def settings_problem(old: object, new: dict) -> str | None:
    """How the settings a folder was made with differ from `new`, in words; None if equal."""
    if not isinstance(old, dict):
        return "no readable settings"
    if old.get("format") != FORMAT_NAME:
        return "another tool (its format is not neox-distill preprocess's)"
    if old.get("format_version") != FORMAT_VERSION:
        return (f"an older neox-distill preprocess (format_version "
                f"{old.get('format_version')}) that did not record its inputs' content, so a "
                "changed input cannot be told")
    changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    if changed == ["inputs"]:
        return _input_change(old["inputs"], new["inputs"])
    return f"other {', '.join(changed)}" if changed else None


def settings_of(manifest: dict) -> dict:
    """The part of a manifest that determines its shards (what a rerun must match)."""
    settings = {k: v for k, v in manifest.items() if k not in ("shards", "totals", "skipped")}
    settings["inputs"] = [
        {k: e.get(k) for k in ("path", "bytes", "sha256") if k in e} for e in settings["inputs"]
    ]
    return settings


def finished_manifest(folder: Path, settings: dict) -> dict | None:
    """The manifest of a complete, intact folder made with `settings`; None if there is none.

    A folder with a manifest but other settings, or shards that no longer match it, is
    refused: its shards are never touched.
    """
    manifest_path = folder / MANIFEST_NAME
    if not manifest_path.is_file():
        return None
    old = read_json(manifest_path)
    try:
        problem = settings_problem(settings_of(old), settings)
        intact = problem is None and len(verified_prefix(folder, old["shards"])) == len(
            old["shards"])
    except (KeyError, TypeError, AttributeError) as exc:
        raise PreprocessError(f"{manifest_path}: not a preprocess manifest ({exc})") from None
    if problem:
        raise PreprocessError(f"{manifest_path}: the folder holds shards made with {problem}; "
                              "choose another --output or delete it")
    if not intact:
        raise PreprocessError(f"{manifest_path}: complete, but its shards no longer match "
                              "their sha256; delete the folder to rebuild it")
    _drop_finished_record(folder / PROGRESS_NAME, settings)
    return old


def _drop_finished_record(path: Path, settings: dict) -> None:
    """Delete the job record a run killed between its manifest and the record's removal left
    behind, after checking it is the record of this job (these settings); anything else by
    that name is refused and kept (ShardSet would take it for an unfinished job)."""
    if not path.is_file():
        return
    problem = settings_problem(read_json(path).get("settings"), settings)
    if problem:
        raise PreprocessError(f"{path}: the folder is complete, but this file is not its own "
                              f"job record ({problem}); nothing was deleted: move it away")
    path.unlink()


# -------------------------------------------------------------------------- the record


def _foreign_folder_message(folder: Path, entries: list[Path], inputs: list[str]) -> str:
    names = [p.name for p in entries]
    shown = shown_names(names)
    message = (f"{folder}: not empty and not a neox-distill preprocess output folder (no "
               f"{MANIFEST_NAME}, no {PROGRESS_NAME}); it holds {shown}. Nothing was deleted")
    held = [i for i in inputs if Path(i).resolve().is_relative_to(folder.resolve())]
    if held:
        message += f"; it holds the input {held[0]}"
    if any(n.endswith(".idx") for n in names):
        message += ("; if these are shards whose manifest.json was lost, ShardSet still reads "
                    "a folder of complete .bin/.idx pairs")
    return message + ". Choose a new or empty --output folder"


def _malformed(path: Path, exc: Exception) -> PreprocessError:
    return PreprocessError(f"{path}: not a neox-distill preprocess progress record (bad or missing "
                           f"field: {exc}); delete it to start over")


def _recorded_state(path: Path, state: dict) -> tuple[list[dict], dict | None]:
    """(finished shards, pending shard) of a record, every file name in it checked, so that
    a damaged or foreign record can never make a rerun delete anything else."""
    try:
        shards, pending = list(state["shards"]), state.get("pending")
        names = [entry["name"] for entry in shards]
        if pending is not None:
            names.append(pending["name"])
            temporary = re.escape(f"{pending['name']}.bin.") + r"[0-9a-f]{8}\.tmp"
            if not re.fullmatch(temporary, pending["temporary"]):
                names.append(pending["temporary"])  # reported as strange below
    except (KeyError, TypeError, AttributeError) as exc:
        raise _malformed(path, exc) from None
    strange = [n for n in names if not isinstance(n, str) or not SHARD_NAME.fullmatch(n)]
    if strange:
        raise PreprocessError(f"{path}: names {strange[0]!r}, not a file neox-distill preprocess "
                              "writes; delete the record to start over")
    return shards, pending


class JobRecord:
    """The .progress.json of the job for `settings` in `folder` (see the module docstring)."""

    def __init__(self, folder: Path, settings: dict, command: str):
        self.folder = folder
        self.settings = settings
        self.command = command
        self.shards: list[dict] = []
        self.pending: dict | None = None
        self.tag = secrets.token_hex(4)  # makes this run's temporary names its own

    @property
    def path(self) -> Path:
        return self.folder / PROGRESS_NAME

    @classmethod
    def open(cls, folder: Path, settings: dict, command: str) -> JobRecord:
        """Resume the record in `folder` (deleting what it owns beyond its verified shards),
        or start one in an empty folder; anything else is refused and left untouched."""
        if folder.exists() and not folder.is_dir():
            raise PreprocessError(f"{folder}: exists and is not a folder; --output must be one")
        folder.mkdir(parents=True, exist_ok=True)
        job = cls(folder, settings, command)
        if job.path.is_file():
            job._resume()
        else:
            job._start()
        return job

    def _start(self) -> None:
        ours = temporary_leftovers(self.folder, PROGRESS_NAME)  # a first record never landed
        others = [p for p in self.folder.iterdir() if p not in ours]
        if others:
            inputs = [entry["path"] for entry in self.settings["inputs"]]
            raise PreprocessError(_foreign_folder_message(self.folder, others, inputs))
        for path in ours:
            path.unlink()
        self.save()

    def _resume(self) -> None:
        state = read_json(self.path)
        problem = settings_problem(state.get("settings"), self.settings)
        if problem:
            raise PreprocessError(f"{self.path}: an interrupted run with {problem} is in this "
                                  "folder; choose another --output or delete the folder")
        recorded, pending = _recorded_state(self.path, state)
        try:
            self.shards = verified_prefix(self.folder, recorded)
        except (KeyError, TypeError) as exc:
            raise _malformed(self.path, exc) from None
        for path in self._owned_leftovers(recorded, pending):
            path.unlink(missing_ok=True)
        self.save()

    def _owned_leftovers(self, recorded: list[dict], pending: dict | None) -> list[Path]:
        """Files the record owns that are not verified finished shards."""
        names = [entry["name"] for entry in recorded[len(self.shards):]]
        paths = [p for name in names for p in shard_paths(self.folder / name)]
        atomic_names = [PROGRESS_NAME, MANIFEST_NAME]
        if pending is not None:
            bin_path, idx_path = shard_paths(self.folder / pending["name"])
            paths += [bin_path, idx_path, self.folder / pending["temporary"]]
            atomic_names.append(idx_path.name)
        return paths + [p for n in atomic_names for p in temporary_leftovers(self.folder, n)]

    def save(self) -> None:
        record = {"settings": self.settings, "command": self.command, "shards": self.shards,
                  "pending": self.pending}
        write_json_atomic(self.path, record, indent=1, sort_keys=True)

    def begin_shard(self, writer) -> None:
        """Record the shard `writer` (a ShardWriter) will create, before any file of it exists."""
        for path in (writer.bin_path, writer.idx_path):
            if path.exists():
                raise PreprocessError(f"{path}: exists, but this job did not write it; nothing "
                                      "was overwritten: move it away and run again")
        self.pending = {"name": writer.name, "temporary": writer.temporary_path.name}
        self.save()

    def finish_shard(self, entry: dict) -> None:
        self.shards.append(entry)
        self.pending = None
        self.save()

    def complete(self, manifest: dict) -> None:
        """Write the manifest (the folder is complete from then on) and drop the record."""
        write_json_atomic(self.folder / MANIFEST_NAME, manifest, indent=1, sort_keys=True)
        self.path.unlink(missing_ok=True)

    def abandon(self) -> None:
        """Forget a job that finished no shard, deleting what it owns (e.g. a first shard's
        .bin renamed into place before a full disk stopped its .idx): the folder is left as
        empty as it was found."""
        for path in self._owned_leftovers(self.shards, self.pending):
            path.unlink(missing_ok=True)
        self.path.unlink(missing_ok=True)
