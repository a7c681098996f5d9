"""The export of an FSDP run: the same Hugging Face folder DDP writes, gathered weight by weight.

Every rank gathers the weights one at a time, in the same order (DTensor.full_tensor, an
all-gather), and rank 0 appends each one's bytes to model.safetensors at once, so no rank ever
holds more than one whole weight beside its shards. The file is byte for byte what
safetensors.torch.save_file writes for the same tensors: a header listing the tensors in the
order safetensors stores them (larger element size first, then by name) with their offsets,
padded with spaces to a multiple of 8 bytes, then each tensor's bytes in that order.

The rest of the export (config.json, tokenizer files, model card, marker, the staged folder
swapped in whole) is engine/train/export.py's, on rank 0. The ranks agree twice, before and
after the weights, so a refusal or a full disk on rank 0 is an error on every rank, not a hang.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from engine import dist
from engine.model.hf_io import WEIGHTS_NAME, write_model_config
from engine.train.export import export_student
from engine.train.file_writes import WRITE_ERRORS, WriteFailed, describe_write_error

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.bfloat16: "BF16",
                      torch.float16: "F16"}


def safetensors_layout(tensors: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """(the 8-byte length + JSON header of a safetensors file, the names in storage order)."""
    order = sorted(tensors, key=lambda t: (-t[1].itemsize, t[0]))
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, dtype, shape in order:
        size = dtype.itemsize * int(torch.Size(shape).numel())
        header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, [name for name, _, _ in order]


def whole(param: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The whole tensor of a (sharded) parameter on every rank; collective for a DTensor."""
    if not isinstance(param, DTensor):
        return param.detach()
    local = param.to_local()
    if local.device.type != device.type:  # CPU offload: the shard lives on the host
        param = DTensor.from_local(local.to(device), param.device_mesh, param.placements,
                                   shape=param.shape, stride=param.stride())
    return param.full_tensor()


def stream_weights(model: torch.nn.Module, path: Path | None, dtype: torch.dtype,
                   device: torch.device) -> str | None:
    """Gather every weight (on every rank, collectively); with `path` (rank 0) write them as
    one safetensors file. Returns the write error, if any, after gathering everything, so
    the ranks' collectives never go out of step."""
    params = dict(model.named_parameters())
    header, order = safetensors_layout(
        [(name, dtype, tuple(p.shape)) for name, p in params.items()], {"format": "pt"})
    error, handle = None, None
    try:
        if path is not None:
            handle = open(path, "wb")  # noqa: SIM115 (closed below, after the last gather)
            handle.write(header)
    except WRITE_ERRORS as exc:
        error = describe_write_error(exc)
    for name in order:
        tensor = whole(params[name], device)
        if handle is not None and error is None:
            try:
                data = tensor.to(device="cpu", dtype=dtype).contiguous().view(torch.uint8)
                handle.write(data.numpy())
            except WRITE_ERRORS as exc:
                error = describe_write_error(exc)
        del tensor
    if handle is not None:
        try:
            handle.close()
        except WRITE_ERRORS as exc:
            error = error or describe_write_error(exc)
    return error


def export_sharded_student(student: torch.nn.Module, export_dir: str | os.PathLike,
                           **export_kwargs) -> Path:
    """engine.train.export.export_student for an FSDP student: call on every rank (rank 0
    writes). Raises on every rank when rank 0 refuses the folder or cannot write it."""
    export_dir = Path(export_dir)
    dtype = student.embed_out.weight.dtype
    device = next(student.buffers()).device  # the rotary tables live on the compute device
    failed = f"{export_dir}: cannot export the student"
    if dist.get_rank() != 0:
        error = dist.agree(None)  # rank 0 is ready to write, or says why not
        if error is None:
            error = dist.agree(stream_weights(student, None, dtype, device))
        if error is not None:
            raise WriteFailed(f"{failed}: {error}")
        return export_dir
    joined = False

    def write_weights(staged: Path) -> None:
        nonlocal joined
        joined = True
        dist.agree(None)
        error = dist.agree(stream_weights(student, staged / WEIGHTS_NAME, dtype, device))
        if error is not None:
            raise WriteFailed(f"{failed}: {error}")
        write_model_config(student.config, staged, dtype)

    try:
        return export_student(student, export_dir, write_weights=write_weights, **export_kwargs)
    except BaseException as exc:
        if not joined:
            dist.agree(str(exc))
        raise
