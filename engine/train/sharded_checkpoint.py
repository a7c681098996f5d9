"""Checkpoints of an FSDP run: every rank writes and reads its own shards; no rank ever holds
the whole state.

Layout of <out_dir>/checkpoints/step-00000010/ under dist.strategy=fsdp (docs/formats.md):
    student_shards/    torch.distributed.checkpoint through its Hugging Face storage writer:
                       shard-<k>-model-00001-of-00001.safetensors, one file per rank, each
                       holding that rank's rows of every weight under the transformers name;
                       the rows' offsets are in the safetensors header (DCP_SHARDING_INFO).
                       Plus config.json (the model's shape).
    optimizer_shards/  the same for AdamW's tensors, named "<weight name>.exp_avg",
                       ".exp_avg_sq", ".step"
    optimizer.json     {"param_groups": [... "params": weight names], "state": non-tensor state}
    trainer_state.json/.safetensors, config.json, DONE   as in the single-file layout, DONE
                       with "layout": "sharded" and the world size that wrote it.

No pickle anywhere: DCP's default FileSystemWriter would write a pickled .metadata file (and
its reader unpickle it); the Hugging Face storage writer keeps everything in safetensors
headers, and its reader rebuilds the metadata from them. Loading reshards: a checkpoint
written by N ranks loads onto M (the loader's position is converted by
engine.train.checkpointer).

Atomicity is the single-file layout's: rank 0 stages a hidden folder, every rank writes into
it, the files are hashed (each rank a share), rank 0 fsyncs and renames it, then writes DONE.
Every step that can fail on one rank ends with all ranks agreeing on the outcome, so a failure
is one clear error on every rank, never a hang.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import HuggingFaceStorageReader, HuggingFaceStorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from engine import dist
from engine.data import failpoints
from engine.data.atomic import staged_folder, write_json_atomic
from engine.train import checkpoint as ckpt
from engine.train import fsdp, state_files
from engine.train.file_writes import WRITE_ERRORS, WriteFailed, describe_write_error, follow_umask

STUDENT_SHARDS = "student_shards"
OPTIMIZER_SHARDS = "optimizer_shards"
OPTIMIZER_JSON = "optimizer.json"
LAYOUT = "sharded"


# --------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------


def _optimizer_parts(student, optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors by "<weight>.<name>" for DCP, the JSON part: param groups and plain state)."""
    state_dict = get_optimizer_state_dict(student, optimizer)
    tensors, plain = {}, {}
    for weight, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{weight}.{name}"] = value
            else:
                plain.setdefault(weight, {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": plain}


def _write_shards(staged: Path, *, student, optimizer, main_files: dict[str, Any]) -> str | None:
    """Every rank's shards (two collective DCP saves), then rank 0's JSON and trainer state
    files; returns this rank's error, if any."""
    try:
        dcp.save(get_model_state_dict(student),
                 storage_writer=HuggingFaceStorageWriter(str(staged / STUDENT_SHARDS),
                                                         save_distributed=True))
        tensors, plain = _optimizer_parts(student, optimizer)
        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(
            str(staged / OPTIMIZER_SHARDS), save_distributed=True))
        if main_files:
            trainer_state = main_files.pop("trainer_state")
            state_files.save_trainer_state(trainer_state, staged)
            write_json_atomic(staged / OPTIMIZER_JSON, plain)
            for name, payload in main_files.items():
                write_json_atomic(staged / name, payload)
    except (*WRITE_ERRORS, CheckpointException) as exc:
        return describe_write_error(exc)
    return None


def _hash_share(staged: Path) -> tuple[dict[str, str], str | None]:
    """sha256 of this rank's share of the staged files (every world_size-th, by name)."""
    names = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    mine = names[dist.get_rank() :: dist.get_world_size()]
    try:
        return {name: ckpt.file_sha256(staged / name) for name in mine}, None
    except OSError as exc:
        return {}, describe_write_error(exc)


def _write_and_hash(staged: Path, step: int, **parts) -> dict[str, str]:
    """The collective middle of a save: shards, JSON, hashes. Raises WriteFailed on every
    rank when any rank failed; returns every file's sha256."""
    error = dist.agree(_write_shards(staged, **parts))
    if error is None and dist.get_rank() == 0:
        failpoints.pause("checkpoint.save", step=step, folder=staged)
        follow_umask(staged)
    dist.barrier()
    hashes, hash_error = _hash_share(staged) if error is None else ({}, None)
    error = error or dist.agree(hash_error)
    if error is not None:
        raise WriteFailed(f"{staged}: cannot save the checkpoint: {error}")
    merged: dict[str, str] = {}
    for share in dist.all_gather_object(hashes):
        merged.update(share)
    return dict(sorted(merged.items()))


def save_sharded_checkpoint(out_dir, step: int, *, student, optimizer, trainer_state: dict,
                            config: dict, keep_last: int,
                            keep: Path | None = None) -> Path | None:
    """Write checkpoint `step` from every rank (call on all of them); rank 0 returns its path.

    Three agreements keep the ranks together: rank 0 announces the staged folder (or why it
    has none), all write and hash (engine: _write_and_hash), rank 0 announces whether the
    rename and DONE marker succeeded. The caller has checked the weights are finite
    (engine.train.fsdp.first_non_finite). A failed write raises WriteFailed on every rank and
    leaves the earlier checkpoints alone.
    """
    final = ckpt.checkpoint_root(out_dir) / ckpt.step_dir_name(step)
    if dist.get_rank() != 0:
        staged, error = dist.all_gather_object(None)[0]
        if error is None:
            _write_and_hash(Path(staged), step, student=student, optimizer=optimizer,
                            main_files={})
            error = dist.agree(None)
        if error is not None:
            raise WriteFailed(f"{final}: cannot save the checkpoint: {error}")
        return None
    main_files = {"trainer_state": {**trainer_state, "step": step}, "config.json": config,
                  f"{STUDENT_SHARDS}/config.json": student.config.to_hf_dict()}
    announced = False
    try:
        with staged_folder(final) as staged:
            dist.all_gather_object((str(staged), None))
            announced = True
            hashes = _write_and_hash(staged, step, student=student, optimizer=optimizer,
                                     main_files=main_files)
        done = {"format": ckpt.FORMAT_NAME, "format_version": ckpt.FORMAT_VERSION, "step": step,
                "bad_steps": int(trainer_state.get("bad_steps", 0)), "layout": LAYOUT,
                "world_size": dist.get_world_size(), "files": hashes}
        write_json_atomic(final / ckpt.DONE_MARKER, done)
    except WRITE_ERRORS as exc:
        reason = describe_write_error(exc)
        dist.all_gather_object(reason if announced else (None, reason))
        raise WriteFailed(f"{final}: cannot save the checkpoint: {reason}") from None
    dist.agree(None)
    ckpt.prune_checkpoints(out_dir, keep_last, newest_step=step, keep=keep)
    return final


# --------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------


def _check_share(folder: Path, files: dict[str, str]) -> str | None:
    """This rank's share of the hash check: the first problem, or None."""
    names = sorted(files)[dist.get_rank() :: dist.get_world_size()]
    for name in names:
        path = folder / name
        if not path.is_file():
            return f"{path}: missing (listed in {folder / ckpt.DONE_MARKER})"
        if ckpt.file_sha256(path) != files[name]:
            return f"{path}: damaged (its sha256 differs from the one recorded when it was saved)"
    return None


def verify_sharded(folder: Path) -> dict[str, Any]:
    """DONE marker read and every file's sha256 checked, the work split over the ranks
    (collective); raises CheckpointLoadError on every rank for any problem."""
    done = ckpt.read_done(folder)  # the same file, the same verdict on every rank
    if done.get("layout") != LAYOUT:
        raise ckpt.CheckpointLoadError(
            f"{folder}: written by a run with dist.strategy=ddp (whole-model files); this run "
            "shards the student (dist.strategy=fsdp): resume it with --dist.strategy=ddp, or "
            "start a new run"
        )
    error = dist.agree(_check_share(folder, done["files"]))
    if error is not None:
        raise ckpt.CheckpointLoadError(error)
    return done


def _load_into(state: dict[str, torch.Tensor], folder: Path) -> None:
    """DCP-load the tensors of `state` (this rank's shards, in place) from `folder`."""
    try:
        dcp.load(state, storage_reader=HuggingFaceStorageReader(str(folder)))
    except CheckpointException as exc:
        causes = "; ".join(f"rank {rank}: {error!r}" for rank, error in exc.failures.items())
        raise ckpt.CheckpointLoadError(f"{folder}: cannot load ({causes})") from None


def _load_optimizer(folder: Path, student, optimizer) -> None:
    tensors, _ = _optimizer_parts(student, optimizer)  # allocates the state to load into
    _load_into(tensors, folder / OPTIMIZER_SHARDS)
    meta_path = folder / OPTIMIZER_JSON
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        state: dict[str, dict[str, Any]] = {}
        for key, tensor in tensors.items():
            weight, _, name = key.rpartition(".")
            state.setdefault(weight, {})[name] = tensor
        for weight, plain in meta["state"].items():
            state.setdefault(weight, {}).update(plain)
        # JSON has no tuples; torch's defaults (betas) are tuples.
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v
                   for k, v in group.items()} for group in meta["param_groups"]]
        set_optimizer_state_dict(student, optimizer, {"state": state, "param_groups": groups})
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError,
            ValueError, AttributeError, RuntimeError) as exc:
        raise ckpt.CheckpointLoadError(f"{meta_path}: does not fit this run's optimizer "
                                       f"({exc!r})") from None


def load_sharded_checkpoint(folder, *, student, optimizer) -> dict[str, Any]:
    """Verify a sharded checkpoint and load it into the sharded `student` and `optimizer`
    (call on every rank; any world size); return the trainer state. Every failure is a
    CheckpointLoadError naming the file, raised on every rank."""
    folder = Path(folder)
    if not (folder / ckpt.DONE_MARKER).is_file():
        raise ckpt.CheckpointLoadError(
            f"{folder}: incomplete checkpoint (no {ckpt.DONE_MARKER} marker)")
    verify_sharded(folder)
    weights = get_model_state_dict(student)
    _load_into(weights, folder / STUDENT_SHARDS)
    set_model_state_dict(student, weights)
    bad = fsdp.first_non_finite(student)
    if bad is not None:
        raise ckpt.CheckpointLoadError(f"{folder / STUDENT_SHARDS}: weight {bad} is not finite")
    if optimizer is not None:
        _load_optimizer(folder, student, optimizer)
    try:
        return state_files.load_trainer_state(folder)
    except state_files.StateFileError as exc:
        raise ckpt.CheckpointLoadError(str(exc)) from None
