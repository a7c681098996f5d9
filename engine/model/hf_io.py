"""Hugging Face model folders in and out: config.json + safetensors (single or sharded).

    model = load_pretrained(folder, dtype=torch.bfloat16, device="cuda")
    save_pretrained(model, folder, dtype=torch.float16)

Plain functions beside the network rather than methods on it, so the network module stays the
maths only and nothing in it imports its own I/O back. A bad folder raises CheckpointError
naming the file and the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import safetensors.torch
import torch
from safetensors import safe_open
from torch import nn

from engine.data.atomic import current_umask, staged_folder
from engine.data.owned_folder import (
    changed_since_marked,
    read_folder_marker,
    shown_names,
    write_folder_marker,
)
from engine.model.config import CheckpointError, GPTNeoXConfig
from engine.model.network import GPTNeoX

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Written last into every model folder the engine writes whole (save_pretrained, an export):
# each file's sha256, so only a folder of ours, unchanged since, is ever replaced.
MODEL_MARKER = "neox_distill_export.json"
MODEL_MARKER_FORMAT = "neox-distill-export"

# Buffers older GPT-NeoX checkpoints carry: a uint8 causal mask, a masking constant and a
# stored inv_freq. We rebuild all three from the config, so they are read past, not loaded.
_LEGACY_BUFFER = re.compile(
    r"^gpt_neox\.(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"
    r"|rotary_emb\.inv_freq)$"
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_HEADER_DTYPES = ("F16", "BF16", "F32", "F64")


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def load_pretrained(
    path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"
) -> GPTNeoX:
    """Load a HF GPT-NeoX folder (config.json + single or sharded safetensors), in eval mode.

    Every header is checked (names, shapes, dtypes) before any tensor data is read, so a
    bad checkpoint fails fast and names the tensor. The module is built on the meta device
    and each tensor is then read, cast and moved on its own straight into its parameter:
    at no point do two full copies of the weights exist. A few threads overlap the casts
    (torch releases the GIL), as transformers does.
    """
    path = Path(path)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if not path.is_dir():
        raise CheckpointError(f"{path}: model folder not found")
    config = GPTNeoXConfig.from_json_file(path / CONFIG_NAME)
    files = _weight_files(path)
    with torch.device("meta"):
        model = GPTNeoX(config)
    expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
    with contextlib.ExitStack() as stack:
        where = _locate_tensors(path, files, expected, stack)

        def materialize(name: str) -> torch.Tensor:
            return _read_tensor(name, *where[name], device=device, dtype=dtype)

        workers = max(1, min(4, os.cpu_count() or 1))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            for name, value in zip(expected, pool.map(materialize, expected), strict=True):
                module_path, _, attr = name.rpartition(".")
                setattr(model.get_submodule(module_path), attr, nn.Parameter(value))
    model.rotary.rebuild(torch.device(device))
    return model.eval()


def _locate_tensors(folder: Path, files: list[Path], expected: dict, stack) -> dict:
    """{tensor name: (file, open handle)} for every expected tensor, headers checked."""
    where: dict[str, tuple[Path, object]] = {}
    for file in files:
        handle = stack.enter_context(_open_safetensors(file))
        for name in _checked_names(file, handle, expected):
            if name in where:
                raise CheckpointError(f"{file}: tensor {name!r} also appears in {where[name][0]}")
            where[name] = (file, handle)
    missing = [name for name in expected if name not in where]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise CheckpointError(f"{folder}: missing tensor(s) {shown} ({len(missing)} in all)")
    return where


def _read_tensor(name: str, file: Path, handle, *, device, dtype) -> torch.Tensor:
    try:
        tensor = handle.get_tensor(name)
    except Exception as error:  # safetensors raises its own error types
        raise CheckpointError(f"{file}: cannot read tensor {name!r} ({error})") from error
    if tensor.dtype not in _FLOAT_DTYPES:
        raise CheckpointError(
            f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype"
        )
    # copy=True: never alias the file's memory map, even when no cast is needed.
    return tensor.to(device=device, dtype=dtype, copy=True)


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards an index names, or model.safetensors."""
    index_path = folder / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            shard_names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        files = []
        for name in shard_names:
            shard = folder / name
            if not shard.is_file():
                raise CheckpointError(f"{index_path}: references missing shard file {shard}")
            files.append(shard)
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (only safetensors are supported)"
    )


def _open_safetensors(file: Path):
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as error:  # SafetensorError, OSError, ...: all mean "cannot use this file"
        raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from error


def _checked_names(file: Path, handle, expected: dict[str, tuple]) -> list[str]:
    """The model tensors a file holds, with names, shapes and dtypes checked from its header
    alone; legacy buffers are skipped."""
    names = []
    for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
        if _LEGACY_BUFFER.match(name):
            continue
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {name!r}")
        info = handle.get_slice(name)
        found = tuple(info.get_shape())
        if found != expected[name]:
            raise CheckpointError(
                f"{file}: shape mismatch for {name!r}: expected {list(expected[name])}, "
                f"found {list(found)}"
            )
        # get_dtype is missing from some older safetensors; _read_tensor checks again.
        stored = info.get_dtype() if hasattr(info, "get_dtype") else "F32"
        if stored not in _FLOAT_HEADER_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {stored}, expected a float dtype"
            )
        names.append(name)
    return names


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def save_pretrained(
    model: GPTNeoX, path: str | os.PathLike, dtype: torch.dtype | None = None, *,
    source: dict | None = None,
) -> Path:
    """Write config.json + model.safetensors (HF names) and the engine's marker atomically.

    The folder is staged beside the target and swapped in complete (engine.data.atomic
    .staged_folder), so a crash leaves either the old folder or the new one. An existing
    folder is replaced only when it is empty or carries the marker this function (or an
    export) wrote, with every file in it still as recorded there: a model folder of anyone
    else's, a checkpoint's own student/, or a file edited since, is refused (CheckpointError).
    `source` (e.g. the checkpoint it came from) goes into the marker.
    """
    path = Path(path)
    refusal = model_folder_refusal(path, "choose another folder, or move it away")
    if refusal:
        raise CheckpointError(refusal)
    _check_save_dtype(dtype)
    with staged_folder(path) as staged:
        write_model_files(model, staged, dtype)
        write_folder_marker(staged, MODEL_MARKER, MODEL_MARKER_FORMAT,
                            {"written": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **(source or {})})
    return path


def model_folder_refusal(path: Path, fix: str) -> str | None:
    """Why a model folder the engine writes whole must not replace `path` (None: it may):
    not a folder; not written by the engine (no MODEL_MARKER); or a file added or edited
    since the engine wrote it (the marker's sha256). `fix` ends the message."""
    if not path.exists():
        return None
    if not path.is_dir():
        return f"{path}: exists and is not a folder (a file); not replacing it ({fix})"
    if not any(path.iterdir()):
        return None
    record = read_folder_marker(path, MODEL_MARKER, MODEL_MARKER_FORMAT)
    if record is None:
        return (f"{path}: exists and was not exported by neox-distill (no {MODEL_MARKER}); "
                f"not replacing it ({fix})")
    changed = changed_since_marked(path, MODEL_MARKER, record)
    if changed:
        return (f"{path}: written by neox-distill, but not all as it wrote them: "
                f"{shown_names(changed)}; not replacing it (move those files away, or {fix})")
    return None


def write_model_files(model: GPTNeoX, folder: Path, dtype: torch.dtype | None = None) -> None:
    """config.json + model.safetensors into an existing (staged) folder; the caller swaps it
    into place. `dtype` None keeps the model's own dtype."""
    _check_save_dtype(dtype)
    save_dtype = dtype or model.embed_out.weight.dtype
    tensors = {
        name: p.detach().to(device="cpu", dtype=save_dtype).contiguous()
        for name, p in model.named_parameters()
    }
    write_model_config(model.config, folder, save_dtype)
    safetensors.torch.save_file(tensors, str(folder / WEIGHTS_NAME), metadata={"format": "pt"})
    # safetensors creates the file 0600; give it the mode a plain open() would (the umask's).
    os.chmod(folder / WEIGHTS_NAME, 0o666 & ~current_umask())


def write_model_config(config, folder: Path, dtype: torch.dtype) -> None:
    """config.json (Hugging Face's GPT-NeoX fields) for weights stored in `dtype`."""
    text = json.dumps(config.to_hf_dict(dtype), indent=2) + "\n"
    (folder / CONFIG_NAME).write_text(text, encoding="utf-8")


def _check_save_dtype(dtype: torch.dtype | None) -> None:
    if dtype is not None and dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")


__all__ = [
    "CONFIG_NAME",
    "MODEL_MARKER",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "CheckpointError",
    "load_pretrained",
    "model_folder_refusal",
    "save_pretrained",
    "write_model_files",
]
