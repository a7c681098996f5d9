"""Training checkpoints: atomic folders, verified on load, never taken from a broken state.

Layout of <out_dir>/checkpoints/step-00000010/ (docs/formats.md):
    student/                    the student in the Hugging Face layout (engine.model.hf_io)
    optimizer.safetensors/.json AdamW state (engine/train/state_files.py)
    trainer_state.json/.safetensors  step, per-rank loader and RNG states, run counters
    config.json                 the resolved run configuration
    DONE                        JSON, written last: the step, the non-finite-step counter and
                                the sha256 of every file above

A checkpoint is assembled in a staged folder (engine.data.atomic.staged_folder: every file fsynced,
the folder renamed to its final name), and only then is DONE written. Readers trust only
folders with DONE, and check every file against its recorded sha256 and the weights for
finiteness before using them; resume=auto falls back to the newest intact checkpoint. No file
is unpickled: a checkpoint from someone else cannot run code.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data import failpoints
from engine.data.atomic import staged_folder, write_json_atomic
from engine.data.shards import file_sha256
from engine.model.config import CheckpointError
from engine.model.hf_io import load_pretrained, write_model_files
from engine.train import state_files
from engine.train.file_writes import (
    WRITE_ERRORS,
    WriteFailed,
    describe_write_error,
    follow_umask,
)

CHECKPOINTS_DIR = "checkpoints"
DONE_MARKER = "DONE"
FORMAT_NAME = "neox-distill-checkpoint"
FORMAT_VERSION = 2
_STEP_DIR = re.compile(r"^step-(\d+)$")
_STAGED_STEP_DIR = re.compile(r"^\.step-\d+\.tmp-[A-Za-z0-9_]+$")  # atomic.staged_folder
_OLD_STEP_DIR = re.compile(r"^\.(step-\d+)\.old-[A-Za-z0-9_]+$")  # atomic.replace_folder
_PICKLED_FILES = ("optimizer.pt", "trainer_state.pt")  # format 1, before version 2


class CheckpointLoadError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file."""


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint with a DONE marker, oldest first (not verified)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / DONE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    done = complete_checkpoints(out_dir)
    return done[-1][1] if done else None


def resume_candidates(resume: str, out_dir: str | os.PathLike) -> list[Path]:
    """Checkpoint folders to try, best first, per run.resume (auto | none | <path>)."""
    if resume == "none":
        return []
    if resume == "auto":
        return [folder for _, folder in reversed(complete_checkpoints(out_dir))]
    path = Path(resume)
    if not (path / DONE_MARKER).is_file():
        raise CheckpointLoadError(
            f"run.resume={resume!r}: {path} is not a complete checkpoint (no {DONE_MARKER} marker)"
        )
    return [path]


# --------------------------------------------------------------------------------------
# The DONE marker and verification
# --------------------------------------------------------------------------------------


def _files_below(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def read_done(folder: Path) -> dict[str, Any]:
    """The DONE marker of a checkpoint folder, format checked."""
    marker = folder / DONE_MARKER
    try:
        done = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        done = None
    if not isinstance(done, dict) or done.get("format") != FORMAT_NAME:
        if any((folder / name).exists() for name in _PICKLED_FILES):
            raise CheckpointLoadError(
                f"{folder}: written by an older neox-distill (pickled optimizer.pt and "
                "trainer_state.pt), which this version never loads; start a new run, or "
                "finish this one with the version that wrote it"
            )
        raise CheckpointLoadError(f"{marker}: not a neox-distill checkpoint marker")
    if done.get("format_version") != FORMAT_VERSION or not isinstance(done.get("files"), dict):
        raise CheckpointLoadError(
            f"{marker}: checkpoint format version {done.get('format_version')!r} is not "
            f"{FORMAT_VERSION}; update neox-distill"
        )
    return done


def verify_checkpoint(folder: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a checkpoint against the sha256 in its DONE marker; return DONE."""
    folder = Path(folder)
    done = read_done(folder)
    for name, expected in done["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointLoadError(f"{path}: missing (listed in {folder / DONE_MARKER})")
        if file_sha256(path) != expected:
            raise CheckpointLoadError(
                f"{path}: damaged (its sha256 differs from the one recorded when it was saved)"
            )
    return done


def done_info(folder: Path) -> dict[str, Any] | None:
    """The DONE marker's content, or None when it is unreadable (no files are hashed)."""
    try:
        return read_done(folder)
    except CheckpointLoadError:
        return None


def last_good_checkpoint(out_dir: str | os.PathLike, finite_steps: Collection[int],
                         *, below: int | None = None) -> Path | None:
    """The newest checkpoint known good: saved with no non-finite step pending, and the step
    after it (its step + 1) in `finite_steps`, the steps whose loss and gradient were finite.

    A checkpoint whose next step was non-finite (or not taken yet) is not known good: its
    weights may already be what gives NaN (optim.lr 1e30: step 1's update is finite, its
    weights make step 2 non-finite). `below`: only checkpoints before that step.
    """
    for step, folder in reversed(complete_checkpoints(out_dir)):
        if below is not None and step >= below:
            continue
        info = done_info(folder)
        if info is not None and info.get("bad_steps", 0) == 0 and step + 1 in finite_steps:
            return folder
    return None


# --------------------------------------------------------------------------------------
# RNG state
# --------------------------------------------------------------------------------------


def capture_rng_state() -> dict[str, Any]:
    """Every RNG this process draws from: python, numpy, torch CPU, and all CUDA devices."""
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def first_non_finite(module: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or inf, or None (one host sync)."""
    names, params = zip(*module.named_parameters(), strict=True)
    finite = torch.stack([torch.isfinite(p).all() for p in params]).cpu()
    bad = (~finite).nonzero()
    return names[int(bad[0])] if len(bad) else None


def _write_checkpoint_files(staged: Path, step: int, *, student, optimizer, trainer_state,
                            config) -> None:
    (staged / "student").mkdir()
    write_model_files(student, staged / "student")
    failpoints.pause("checkpoint.save", step=step, folder=staged)
    state_files.save_optimizer(optimizer, staged)
    state_files.save_trainer_state({**trainer_state, "step": step}, staged)
    (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    follow_umask(staged)


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
    keep: Path | None = None,
) -> Path:
    """Write checkpoint `step` atomically; then keep the newest `keep_last` and `keep` (the
    last good checkpoint: prune_checkpoints).

    Refuses non-finite weights. Call on rank 0 only: under DDP the weights and optimizer
    state are identical on every rank, and `trainer_state` already holds the per-rank parts
    gathered by the caller. A failed write (a full disk) raises WriteFailed and leaves every
    earlier checkpoint as it was.
    """
    bad = first_non_finite(student)
    if bad is not None:
        raise ValueError(f"step {step}: parameter {bad} is not finite; not saving a checkpoint")
    final = checkpoint_root(out_dir) / step_dir_name(step)
    try:
        # The same step may have been saved before (a run resumed from it and stopped at
        # once): the staged folder replaces it only once the new, complete one is in place.
        with staged_folder(final) as staged:
            _write_checkpoint_files(staged, step, student=student, optimizer=optimizer,
                                    trainer_state=trainer_state, config=config)
            hashes = {name: file_sha256(staged / name) for name in _files_below(staged)}
        done = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "step": step,
                "bad_steps": int(trainer_state.get("bad_steps", 0)), "files": hashes}
        write_json_atomic(final / DONE_MARKER, done)  # fsyncs the marker and `final`
    except WRITE_ERRORS as exc:
        previous = [f for s, f in complete_checkpoints(out_dir) if s != step]
        kept = f"; {previous[-1]} is intact" if previous else ""
        raise WriteFailed(
            f"{final}: cannot save the checkpoint: {describe_write_error(exc)}{kept}"
        ) from None
    prune_checkpoints(out_dir, keep_last, newest_step=step, keep=keep)
    return final


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int, *, newest_step: int,
                      keep: Path | None = None) -> None:
    """Delete all but the newest `keep_last` checkpoints up to `newest_step`, and leftovers of
    crashes. `keep` (the last good checkpoint, last_good_checkpoint) is kept too: the newest
    ones are not known good until the step after them was finite. Checkpoints after
    `newest_step` (a damaged one resume fell back from) are left for the run to replace; the
    newest complete one is never touched.
    """
    done = [(s, f) for s, f in complete_checkpoints(out_dir) if s <= newest_step]
    for _, folder in done[: max(0, len(done) - keep_last)]:
        if keep is not None and folder.name == keep.name:
            continue
        if not holds_only_its_files(folder):
            continue  # something was added to it since: never deleted with it, kept whole
        (folder / DONE_MARKER).unlink(missing_ok=True)  # first make it not-a-checkpoint
        shutil.rmtree(folder, ignore_errors=True)
    clean_incomplete(out_dir)


def holds_only_its_files(folder: Path) -> bool:
    """Whether every file below a checkpoint folder is one its DONE marker lists (the files
    the save wrote, hashed), or DONE itself: the proof that pruning deletes only the run's."""
    done = done_info(folder)
    return done is not None and set(_files_below(folder)) <= {*done["files"], DONE_MARKER}


def clean_incomplete(out_dir: str | os.PathLike) -> None:
    """Remove the debris of a killed save (rank 0 only), by the names a save gives it: a
    staged folder (engine.data.atomic.staged_folder's `.step-N.tmp-*`), a step folder renamed into
    place before its DONE, and a replaced step's `.step-N.old-*`. A kill between
    replace_folder's two renames leaves the only complete step N in the `.old-` folder: it is
    moved back, not deleted."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if not child.is_dir():
            continue
        old = _OLD_STEP_DIR.match(child.name)
        if old:
            kept, final = child / old.group(1), root / old.group(1)
            if (kept / DONE_MARKER).is_file() and not final.exists():
                os.replace(kept, final)
        if old or _STAGED_STEP_DIR.match(child.name) or (
            _STEP_DIR.match(child.name) and not (child / DONE_MARKER).is_file()
        ):
            shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _load_weights(folder: Path, student: torch.nn.Module) -> None:
    """Copy the checkpoint's weights into the live student (parameters stay the same objects,
    so the optimizer's references to them survive); refuse non-finite ones."""
    dtype = next(student.parameters()).dtype
    try:
        saved = load_pretrained(folder / "student", dtype=dtype, device="cpu")
    except CheckpointError as exc:
        raise CheckpointLoadError(str(exc)) from None
    saved_params = dict(saved.named_parameters())
    with torch.no_grad():
        for name, param in student.named_parameters():
            if name not in saved_params:
                raise CheckpointLoadError(f"{folder / 'student'}: no tensor {name}")
            if saved_params[name].shape != param.shape:
                raise CheckpointLoadError(
                    f"{folder / 'student'}: {name} has shape {tuple(saved_params[name].shape)}, "
                    f"the model expects {tuple(param.shape)}"
                )
            param.copy_(saved_params[name])
    bad = first_non_finite(student)
    if bad is not None:
        raise CheckpointLoadError(f"{folder / 'student'}: weight {bad} is not finite")


def load_checkpoint(
    folder: str | os.PathLike,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
) -> dict[str, Any]:
    """Verify a checkpoint, load its weights into `student` and its state into `optimizer`;
    return the trainer state. Every failure is a CheckpointLoadError naming the file."""
    folder = Path(folder)
    if not (folder / DONE_MARKER).is_file():
        raise CheckpointLoadError(f"{folder}: incomplete checkpoint (no {DONE_MARKER} marker)")
    if read_done(folder).get("layout", "full") != "full":
        raise CheckpointLoadError(
            f"{folder}: written by a run with dist.strategy=fsdp (sharded files); this run "
            "holds the whole student: resume it with --dist.strategy=fsdp, or start a new run"
        )
    verify_checkpoint(folder)
    _load_weights(folder, student)
    try:
        if optimizer is not None:
            state_files.load_optimizer(optimizer, folder)
        return state_files.load_trainer_state(folder)
    except state_files.StateFileError as exc:
        raise CheckpointLoadError(str(exc)) from None
