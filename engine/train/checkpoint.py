"""Training checkpoints: atomic folders that a killed process can never leave half-valid.

Layout of <out_dir>/checkpoints/step-00000010/ (docs/formats.md):
    student/            the student in the Hugging Face layout (engine.model.hf_io)
    optimizer.pt        AdamW state (fp32 moments in the default precision)
    trainer_state.pt    step, per-rank loader states and RNG states, run counters
    config.json         the resolved run configuration
    DONE                written last, after the folder was renamed into place

A checkpoint is assembled in a staged folder (data.atomic.staged_folder: every file fsynced,
the folder renamed to its final name), and only then is DONE written. Readers (resume=auto)
trust only folders with DONE, so a process killed at any moment leaves the previous
checkpoint as the newest usable one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from data.atomic import staged_folder, write_text_atomic
from engine.model.hf_io import load_pretrained, write_model_files

CHECKPOINTS_DIR = "checkpoints"
DONE_MARKER = "DONE"
_STEP_DIR = re.compile(r"^step-(\d+)$")

# Test hook: "STEP:SECONDS" makes the save of checkpoint STEP pause SECONDS between its
# writes (after creating a PAUSED file in the temporary folder), so a test can SIGKILL the
# process in the middle of a save.
SAVE_PAUSE_ENV = "NEOX_DISTILL_TEST_SAVE_PAUSE"


class CheckpointLoadError(ValueError):
    """A checkpoint folder that cannot be resumed from; the message names the file."""


def checkpoint_root(out_dir: str | os.PathLike) -> Path:
    return Path(out_dir) / CHECKPOINTS_DIR


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def complete_checkpoints(out_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, folder) of every checkpoint with a DONE marker, oldest first."""
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


def resolve_resume(resume: str, out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint folder to continue from, per run.resume (auto | none | <path>)."""
    if resume == "none":
        return None
    if resume == "auto":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if not (path / DONE_MARKER).is_file():
        raise CheckpointLoadError(
            f"run.resume={resume!r}: {path} is not a complete checkpoint (no {DONE_MARKER} marker)"
        )
    return path


def _maybe_pause(step: int, tmp: Path) -> None:
    spec = os.environ.get(SAVE_PAUSE_ENV)
    if not spec:
        return
    target, _, seconds = spec.partition(":")
    if int(target) == step:
        (tmp / "PAUSED").write_text("paused mid-save for a test\n")
        time.sleep(float(seconds))


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


def save_checkpoint(
    out_dir: str | os.PathLike,
    step: int,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    trainer_state: dict[str, Any],
    config: dict[str, Any],
    keep_last: int,
) -> Path:
    """Write checkpoint `step` atomically, then prune to the newest `keep_last` complete ones.

    Call on rank 0 only: under DDP the weights and optimizer state are identical on every
    rank, and `trainer_state` already holds the per-rank parts gathered by the caller.
    """
    final = checkpoint_root(out_dir) / step_dir_name(step)
    # The same step may have been saved before (a run resumed from it and stopped at once):
    # the staged folder replaces it only once the new, complete one is in place.
    with staged_folder(final) as staged:
        (staged / "student").mkdir()
        write_model_files(student, staged / "student")
        _maybe_pause(step, staged)
        torch.save(optimizer.state_dict(), staged / "optimizer.pt")
        torch.save({**trainer_state, "step": step}, staged / "trainer_state.pt")
        (staged / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (staged / "PAUSED").unlink(missing_ok=True)
    write_text_atomic(final / DONE_MARKER, f"step {step}\n")  # fsyncs the marker and `final`
    prune_checkpoints(out_dir, keep_last)
    return final


def prune_checkpoints(out_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest `keep_last` complete checkpoints, and leftovers of crashes.

    Incomplete folders (temporary names, or no DONE marker) older than the newest complete
    checkpoint are debris of killed saves; the newest complete one is never touched.
    """
    done = complete_checkpoints(out_dir)
    for _, folder in done[: max(0, len(done) - keep_last)]:
        (folder / DONE_MARKER).unlink(missing_ok=True)  # first make it not-a-checkpoint
        shutil.rmtree(folder, ignore_errors=True)
    clean_incomplete(out_dir)


def clean_incomplete(out_dir: str | os.PathLike) -> None:
    """Remove temporary and marker-less folders: debris of a killed save (rank 0 only)."""
    root = checkpoint_root(out_dir)
    if not root.is_dir():
        return
    for child in root.iterdir():
        if not child.is_dir():
            continue
        if child.name.startswith(".step-") or (
            _STEP_DIR.match(child.name) and not (child / DONE_MARKER).is_file()
        ):
            shutil.rmtree(child, ignore_errors=True)


def load_checkpoint(
    folder: str | os.PathLike,
    *,
    student: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    map_location: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Load weights into `student` and state into `optimizer`; return the trainer state.

    The weights are read through load_pretrained in the dtype of the live student, then
    copied in place, so parameters (and the optimizer's references to them) survive.
    """
    folder = Path(folder)
    if not (folder / DONE_MARKER).is_file():
        raise CheckpointLoadError(f"{folder}: incomplete checkpoint (no {DONE_MARKER} marker)")
    for name in ("student", "optimizer.pt", "trainer_state.pt"):
        if not (folder / name).exists():
            raise CheckpointLoadError(f"{folder}: missing {name}")
    dtype = next(student.parameters()).dtype
    saved = load_pretrained(folder / "student", dtype=dtype, device="cpu")
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
    del saved, saved_params
    if optimizer is not None:
        # Our own file, written by save_checkpoint: the full pickle is trusted.
        state = torch.load(folder / "optimizer.pt", map_location=map_location, weights_only=False)
        optimizer.load_state_dict(state)
    return torch.load(folder / "trainer_state.pt", map_location="cpu", weights_only=False)
