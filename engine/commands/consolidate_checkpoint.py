"""A sharded (FSDP) checkpoint's student as a plain Hugging Face folder, for evaluation.

    neox-distill consolidate RUN/checkpoints/step-00000010 OUT_DIR

An FSDP run's checkpoints hold the student as one shard file per rank (docs/formats.md);
`python -m engine.eval`, transformers and lm-evaluation-harness want the folder a DDP
checkpoint's `student/` is. This reads the shards in one process (torch.distributed.checkpoint
without a process group, through the same Hugging Face storage reader the engine resumes
with), after checking every file against the DONE marker's sha256, and writes config.json +
model.safetensors and the engine's marker (engine.model.hf_io.save_pretrained: staged). The
output folder is checked first, before any work: it must be new, empty, or an earlier output
of this command (or an export) whose every file is still as the marker records it; anything
else (a model folder, a checkpoint's own student/, a file) is refused and left as it is. The
whole model is in host memory once. Exit 0 on success, 2 on a bad checkpoint or output
folder, each with one line naming the file.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from torch.distributed.checkpoint import HuggingFaceStorageReader
from torch.distributed.checkpoint.api import CheckpointException

from engine.model.config import CheckpointError, GPTNeoXConfig
from engine.model.hf_io import model_folder_refusal, save_pretrained
from engine.model.network import GPTNeoX
from engine.train import checkpoint as ckpt
from engine.train.gathered_export import SAFETENSORS_DTYPES
from engine.train.sharded_checkpoint import LAYOUT, STUDENT_SHARDS


def consolidate(folder: Path, out_dir: Path) -> Path:
    """Write the student of sharded checkpoint `folder` to `out_dir`; ValueError on failure."""
    if not folder.exists():
        raise ckpt.CheckpointLoadError(f"{folder}: no such checkpoint folder")
    if not folder.is_dir() or not (folder / ckpt.DONE_MARKER).exists():
        raise ckpt.CheckpointLoadError(
            f"{folder}: not a checkpoint (no {ckpt.DONE_MARKER}; give a "
            f"{ckpt.CHECKPOINTS_DIR}/step-N folder of an FSDP run)")
    refusal = model_folder_refusal(out_dir, "give a new or empty output folder")
    if refusal:
        raise ckpt.CheckpointLoadError(refusal)
    done = ckpt.verify_checkpoint(folder)
    if done.get("layout") != LAYOUT:
        raise ckpt.CheckpointLoadError(
            f"{folder}: not a sharded checkpoint (its student/ is already a model folder)")
    shards = folder / STUDENT_SHARDS
    config = GPTNeoXConfig.from_json_file(shards / "config.json")
    with torch.device("meta"):
        model = GPTNeoX(config)
    model.to_empty(device="cpu")
    dtype = _stored_dtype(shards)
    model.to(dtype)
    state = model.state_dict()
    try:
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process"
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=HuggingFaceStorageReader(str(shards)), no_dist=True)
    except CheckpointException as exc:
        raise ckpt.CheckpointLoadError(f"{shards}: cannot load ({exc})") from None
    model.load_state_dict(state)
    bad = ckpt.first_non_finite(model)
    if bad is not None:
        raise ckpt.CheckpointLoadError(f"{shards}: weight {bad} is not finite")
    return save_pretrained(model, out_dir, source={"checkpoint": str(folder)})


def _stored_dtype(shards: Path) -> torch.dtype:
    """The dtype the shards hold (the run's training dtype), from the first file's header."""
    first = sorted(shards.glob("*.safetensors"))[0]
    with safe_open(str(first), framework="pt") as handle:
        stored = handle.get_slice(next(iter(handle.keys()))).get_dtype()
    return {name: dtype for dtype, name in SAFETENSORS_DTYPES.items()}[stored]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="neox-distill consolidate",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoints/step-N folder of an FSDP run")
    parser.add_argument("out_dir", type=Path, help="the model folder to write")
    args = parser.parse_args(argv)
    try:
        print(f"wrote {consolidate(args.checkpoint, args.out_dir)}")
    except (ValueError, CheckpointError, OSError) as exc:
        print(f"consolidate_checkpoint: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
