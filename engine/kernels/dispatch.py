"""Which backend computes the loss, and the one call that runs it on a block of logits.

Shared by `kd_loss` (the whole [tokens x vocab] logits at once) and `kd_head_loss` (one token
chunk at a time), so both take the same options and pick backends the same way.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from engine.kernels.divergences import kernel_divergence, resolve_divergence
from engine.kernels.kd_loss_torch import (
    check_labels_in_range,
    inverse_normalizer,
    kd_loss_forward_chunked,
)
from engine.kernels.loss_spec import BACKENDS, LossSpec


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, device: torch.device) -> str:
    """'triton' or 'torch' for `backend` on `device` ('epilogue' resolves as 'triton');
    ValueError when it cannot run there."""
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend in ("triton", "epilogue"):
        if not triton_available():
            raise ValueError(f"backend={backend!r} requested but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend={backend!r} on a {device.type} tensor needs TRITON_INTERPRET=1 set "
                "before triton is imported"
            )
        return "triton"
    return backend


@dataclasses.dataclass(frozen=True)
class LossOptions:
    """A LossSpec as the kernels run it: numbers coerced, valid_vocab resolved against the
    logits' columns, and `divergence` the one the kernels compute (kernel_divergence)."""

    alpha: float
    temperature: float
    ignore_index: int
    valid_vocab: int
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    t2_scale: bool = True

    @classmethod
    def of(cls, spec: LossSpec, valid_vocab: int) -> LossOptions:
        """The kernels' view of `spec` (already checked) over `valid_vocab` columns."""
        divergence = kernel_divergence(resolve_divergence(spec), spec.skew)
        return cls(float(spec.alpha), float(spec.temperature), int(spec.ignore_index),
                   int(valid_vocab), divergence, float(spec.beta), float(spec.skew),
                   spec.t2_scale)


def prepare_loss(flat_labels, device, spec: LossSpec, *, valid_vocab: int, normalizer):
    """What kd_loss and kd_head_loss do before their autograd Function, in one place.

    `spec` was checked when built; this resolves the backend, checks labels on CPU (a GPU
    check would sync) and returns (options, backend, valid_count, inv_norm), the last two 0-dim
    tensors on the labels' device. `valid_vocab`: the spec's, resolved against the logits.
    """
    options = LossOptions.of(spec, valid_vocab)
    resolved = resolve_backend(spec.backend, device)
    if flat_labels.device.type == "cpu":
        check_labels_in_range(flat_labels, options.ignore_index, options.valid_vocab)
    valid_count = (flat_labels != options.ignore_index).sum()
    return options, resolved, valid_count, inverse_normalizer(normalizer, valid_count)


def loss_stats(ce_sum, kd_sum, valid_count) -> dict:
    """The detached fp32 stats both public functions return (sums, so they add up)."""
    return {
        "ce_sum": ce_sum.detach().float(),
        "kd_sum": kd_sum.detach().float(),
        "valid_tokens": valid_count.detach().float(),
    }


def loss_and_grad(backend: str, s, t, labels, grad_out, inv_norm, options: LossOptions):
    """Run the resolved backend on [N, V] logits; write d loss / d s into grad_out (may be s;
    None: forward only, nothing is written). t may be s for a CE-only caller (alpha = 1).

    Returns (ce_sum, kd_sum) as 0-dim fp32 tensors (float64 for float64 logits on the torch
    path), with no host synchronisation. Runs with autocast off whatever the caller's context:
    under autocast, row dot products (torch.linalg.vecdot) would drop to bf16.
    """
    with torch.autocast(s.device.type, enabled=False):
        if backend == "triton":
            from engine.kernels.kd_loss_triton import kd_loss_forward_triton

            return kd_loss_forward_triton(s, t, labels, grad_out, options, inv_norm=inv_norm)
        return kd_loss_forward_chunked(s, t, labels, grad_out, options, inv_norm=inv_norm)
