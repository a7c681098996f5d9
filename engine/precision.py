"""One precision vocabulary for the whole engine: dtype names and training precision modes.

Every command line, the configuration, the loop and the memory plan speak these names, so a
dtype means the same thing everywhere. Short names ("fp32", "bf16", "fp16") are canonical;
the long torch names ("float32", "bfloat16", "float16") are accepted as aliases because some
command lines have always taken them.

A precision *mode* says how the student trains:
  bf16-autocast  fp32 master weights and AdamW state, matmuls in bf16 under torch.autocast
  bf16-pure      bf16 weights and optimizer state, no autocast (the seed recipe)
  fp32           fp32 everywhere, no autocast
"""

from __future__ import annotations

import torch

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
ALIASES: dict[str, str] = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}
# Every name a command line accepts for a dtype, canonical names first.
DTYPE_NAMES: tuple[str, ...] = (*DTYPES, *ALIASES)

# mode -> (student weight dtype, autocast dtype or None)
MODES: dict[str, tuple[torch.dtype, torch.dtype | None]] = {
    "bf16-autocast": (torch.float32, torch.bfloat16),
    "bf16-pure": (torch.bfloat16, None),
    "fp32": (torch.float32, None),
}
PRECISION_MODES: tuple[str, ...] = tuple(MODES)


def canonical_name(name: str) -> str:
    """"bf16" for "bf16" or "bfloat16"; ValueError naming the accepted names otherwise."""
    short = ALIASES.get(name, name)
    if short not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}: use one of {', '.join(DTYPE_NAMES)}")
    return short


def dtype_of(name: str) -> torch.dtype:
    """The torch dtype of a dtype name (short or long)."""
    return DTYPES[canonical_name(name)]


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype name (short or long)."""
    return dtype_of(name).itemsize


def precision_dtypes(mode: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(student weight dtype, autocast dtype or None) of a precision mode."""
    if mode not in MODES:
        raise ValueError(f"unknown precision {mode!r}: use one of {', '.join(PRECISION_MODES)}")
    return MODES[mode]


def compute_dtype(mode: str) -> torch.dtype:
    """The dtype matmuls (and so logits and matmul activations) run in under a mode."""
    weight, autocast = precision_dtypes(mode)
    return autocast or weight


__all__ = [
    "ALIASES",
    "DTYPES",
    "DTYPE_NAMES",
    "MODES",
    "PRECISION_MODES",
    "canonical_name",
    "compute_dtype",
    "dtype_bytes",
    "dtype_of",
    "precision_dtypes",
]
