"""Optimizer and trainer state as safetensors + JSON: no pickle is ever read from disk.

A checkpoint folder can come from anyone, and unpickling one would run its author's code. So
a checkpoint holds tensors in safetensors files (data only) and everything else in JSON:

    optimizer.safetensors      AdamW's per-parameter tensors, named "<param index>.<name>"
    optimizer.json             param_groups (hyper-parameters, parameter indices) and any
                               per-parameter state that is not a tensor
    trainer_state.json         step, counters, per-rank loader states, python and numpy RNG
    trainer_state.safetensors  per-rank torch RNG states (uint8), "rank<r>.torch",
                               "rank<r>.cuda<i>", and an on-policy run's sampler
                               generator, "rank<r>.sampler"

Floats go through JSON as their shortest repr, which reads back to the same bits, so a
resume stays bit-exact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError

OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
TRAINER_JSON = "trainer_state.json"
TRAINER_TENSORS = "trainer_state.safetensors"
STATE_FILES = (OPTIMIZER_TENSORS, OPTIMIZER_JSON, TRAINER_JSON, TRAINER_TENSORS)


class StateFileError(ValueError):
    """A state file that cannot be read back; the message names the file."""


# --------------------------------------------------------------------------------------
# Reading and writing the two kinds of file
# --------------------------------------------------------------------------------------


def _write_json(path: Path, payload: Any) -> None:
    # Inside a staged checkpoint folder: fsynced and swapped in with the whole folder.
    path.write_text(json.dumps(payload, indent=1, allow_nan=True) + "\n", encoding="utf-8")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise StateFileError(f"{path}: not valid JSON ({exc})") from None


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise StateFileError(f"{path}: missing")
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise StateFileError(f"{path}: not a readable safetensors file ({exc})") from None


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    plain = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    safetensors.torch.save_file(plain, str(path))


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


def save_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """optimizer.safetensors + optimizer.json for `optimizer.state_dict()`."""
    state_dict = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for name, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{index}.{name}"] = value
            else:
                plain_state.setdefault(str(index), {})[name] = value
    groups = []
    for group in state_dict["param_groups"]:
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                raise TypeError(f"optimizer param_group {key!r} is a tensor; not supported")
        groups.append(dict(group))
    _save_tensors(tensors, folder / OPTIMIZER_TENSORS)
    _write_json(folder / OPTIMIZER_JSON, {"param_groups": groups, "state": plain_state})


def load_optimizer(optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """Restore `optimizer` from save_optimizer's files; errors name the file."""
    meta_path, tensor_path = folder / OPTIMIZER_JSON, folder / OPTIMIZER_TENSORS
    meta = _read_json(meta_path)
    tensors = _read_tensors(tensor_path)
    try:
        state: dict[int, dict[str, Any]] = {}
        for index, plain in meta["state"].items():
            state.setdefault(int(index), {}).update(plain)
        for key, tensor in tensors.items():
            index, name = key.split(".", 1)
            state.setdefault(int(index), {})[name] = tensor
        state = dict(sorted(state.items()))  # the saved order (safetensors sorts names)
        # JSON has no tuples; torch's defaults (betas) are tuples.
        groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v
                   for k, v in group.items()} for group in meta["param_groups"]]
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateFileError(f"{meta_path}: unexpected content ({exc!r})") from None
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise StateFileError(
            f"{meta_path}: does not fit this run's optimizer ({exc})"
        ) from None


# --------------------------------------------------------------------------------------
# Trainer state (counters, loader positions, RNGs)
# --------------------------------------------------------------------------------------


def _rng_to_files(rank: int, rng: dict[str, Any], tensors: dict) -> dict[str, Any]:
    """The JSON part of one rank's RNG state; its tensors go into `tensors`."""
    plain: dict[str, Any] = {}
    if "python" in rng:
        version, internal, gauss_next = rng["python"]
        plain["python"] = [version, list(internal), gauss_next]
    if "numpy" in rng:
        name, key, pos, has_gauss, cached = rng["numpy"]
        plain["numpy"] = {"bit_generator": name, "key": [int(k) for k in key], "pos": int(pos),
                          "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    for name in ("torch", "sampler"):  # the sampler: an on-policy run's generator
        if name in rng:
            tensors[f"rank{rank}.{name}"] = rng[name]
    for device, state in enumerate(rng.get("cuda", [])):
        tensors[f"rank{rank}.cuda{device}"] = state
    plain["cuda_devices"] = len(rng.get("cuda", []))
    return plain


def _rng_from_files(rank: int, plain: dict[str, Any], tensors: dict) -> dict[str, Any]:
    rng: dict[str, Any] = {}
    if "python" in plain:
        version, internal, gauss_next = plain["python"]
        rng["python"] = (version, tuple(internal), gauss_next)
    if "numpy" in plain:
        numpy_state = plain["numpy"]
        rng["numpy"] = (numpy_state["bit_generator"],
                        np.asarray(numpy_state["key"], dtype=np.uint32), numpy_state["pos"],
                        numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    for name in ("torch", "sampler"):
        if f"rank{rank}.{name}" in tensors:
            rng[name] = tensors[f"rank{rank}.{name}"]
    if plain.get("cuda_devices"):
        rng["cuda"] = [tensors[f"rank{rank}.cuda{d}"] for d in range(plain["cuda_devices"])]
    return rng


def save_trainer_state(state: dict[str, Any], folder: Path) -> None:
    """trainer_state.json + trainer_state.safetensors; `state["rng_states"]` holds one
    engine.train.checkpoint.capture_rng_state() dict per rank."""
    tensors: dict[str, torch.Tensor] = {}
    plain = {key: value for key, value in state.items() if key != "rng_states"}
    plain["rng_states"] = [_rng_to_files(rank, rng, tensors)
                           for rank, rng in enumerate(state.get("rng_states", []))]
    _save_tensors(tensors, folder / TRAINER_TENSORS)
    _write_json(folder / TRAINER_JSON, plain)


def load_trainer_state(folder: Path) -> dict[str, Any]:
    """The dict save_trainer_state was given (RNG states in capture_rng_state's shape)."""
    json_path = folder / TRAINER_JSON
    plain = _read_json(json_path)
    tensors = _read_tensors(folder / TRAINER_TENSORS)
    try:
        rng_states = [_rng_from_files(rank, rng, tensors)
                      for rank, rng in enumerate(plain.pop("rng_states"))]
        int(plain["step"])
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise StateFileError(f"{json_path}: unexpected content ({exc!r})") from None
    return {**plain, "rng_states": rng_states}
