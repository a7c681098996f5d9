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
    check_hyperparameters,
    check_labels_in_range,
    inverse_normalizer,
    kd_loss_forward_chunked,
)

# "epilogue": the Triton kernels, and for kd_head_loss the head whose matmul epilogue reduces
# the logits (engine/kernels/head_epilogue.py) where it supports the call; on logits it is
# "triton".
BACKENDS = ("auto", "triton", "torch", "epilogue")


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
    """The loss's hyperparameters once checked; `divergence` is the one the kernels run."""

    alpha: float
    temperature: float
    ignore_index: int
    valid_vocab: int
    divergence: str
    beta: float
    skew: float
    t2_scale: bool

    @classmethod
    def checked(cls, *, alpha, temperature, ignore_index, valid_vocab, divergence, beta, skew,
                t2_scale) -> LossOptions:
        """Validate every argument (ValueError naming it) and resolve the divergence."""
        check_hyperparameters(alpha, temperature)
        if not isinstance(t2_scale, bool):
            raise ValueError(f"t2_scale={t2_scale!r} must be True or False")
        divergence = kernel_divergence(resolve_divergence(divergence, beta, skew), skew)
        return cls(float(alpha), float(temperature), int(ignore_index), int(valid_vocab),
                   divergence, float(beta), float(skew), t2_scale)


def prepare_loss(flat_labels, device, *, backend, normalizer, **loss_kwargs):
    """What kd_loss and kd_head_loss do before their autograd Function, in one place.

    Checks every argument (LossOptions.checked takes loss_kwargs), resolves the backend, checks
    labels on CPU (a GPU check would sync) and returns (options, backend, valid_count,
    inv_norm), the last two 0-dim tensors on the labels' device.
    """
    options = LossOptions.checked(**loss_kwargs)
    resolved = resolve_backend(backend, device)
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
    kwargs = dataclasses.asdict(options)
    with torch.autocast(s.device.type, enabled=False):
        if backend == "triton":
            from engine.kernels.kd_loss_triton import kd_loss_forward_triton

            return kd_loss_forward_triton(s, t, labels, grad_out, inv_norm=inv_norm, **kwargs)
        return kd_loss_forward_chunked(s, t, labels, grad_out, inv_norm=inv_norm, **kwargs)
