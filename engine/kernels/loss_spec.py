"""The loss specification, and how the kernels run it.

The engine builds one `LossSpec` from the configuration's `loss` section (and data.valid_vocab)
and passes it to everything that computes or reports the loss: the training step, the teacher
signals, held-out scoring. The public kernel functions (engine.kernels) keep their keyword form
for users; `spec.keywords()` is that form. Checked once, when built: a bad value is a
ValueError naming the field, as the kernels word it.

How a spec runs, shared by `kd_loss` (the whole [tokens x vocab] logits at once), `kd_head_loss`
(one token chunk at a time) and the sparse losses, so all take the same options and pick
backends the same way: `LossOptions` (the spec as the kernels compute it), `prepare_loss` (the
backend, the label check, the normaliser) and `loss_and_grad` (the one call that runs the
backend on a block of logits).
"""

from __future__ import annotations

import dataclasses
import os

import torch

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.divergences import (
    kd_loss_forward_chunked,
    kernel_divergence,
    resolve_divergence,
)

# "epilogue": the Triton kernels, and for kd_head_loss the head whose matmul epilogue reduces
# the logits (engine/kernels/kd_head.py) where it supports the call; on logits it is
# "triton".
BACKENDS = ("auto", "triton", "torch", "epilogue")


def check_hyperparameters(alpha, temperature) -> None:
    """ValueError unless alpha is in [0, 1] and temperature > 0."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1]")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature={temperature} must be > 0")


@dataclasses.dataclass(frozen=True)
class LossSpec:
    """What the loss computes (docs/loss.md): alpha * CE + (1 - alpha) * KD.

    alpha: weight of the hard-label cross-entropy; temperature: the KD softmaxes' T;
    divergence (beta for jsd, skew for the skew KLs) and t2_scale: the KD term;
    valid_vocab: logit columns >= it are excluded (None: all); ignore_index: unscored labels;
    backend: which kernels run (BACKENDS); fused_head: both LM heads run inside the loss
    (no [tokens x vocab] logits) rather than on the models' full logits.
    """

    alpha: float = 0.5
    temperature: float = 2.0
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    t2_scale: bool = True
    valid_vocab: int | None = None
    ignore_index: int = IGNORE_INDEX
    backend: str = "auto"
    fused_head: bool = True

    def __post_init__(self) -> None:
        check_hyperparameters(self.alpha, self.temperature)
        if not isinstance(self.t2_scale, bool):
            raise ValueError(f"t2_scale={self.t2_scale!r} must be True or False")
        resolve_divergence(self)
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r} must be one of {BACKENDS}")

    def keywords(self) -> dict:
        """The public kernel functions' keyword arguments for this spec (kd_loss, kd_head_loss,
        sparse_kd_loss, sparse_kd_head_loss take them all)."""
        return dict(alpha=self.alpha, temperature=self.temperature,
                    ignore_index=self.ignore_index, valid_vocab=self.valid_vocab,
                    backend=self.backend, divergence=self.divergence, beta=self.beta,
                    skew=self.skew, t2_scale=self.t2_scale)

    def kd_keywords(self) -> dict:
        """The KD term's definition alone (temperature, divergence, beta, skew, t2_scale): what
        held-out scoring and the float64 references take. No alpha (scoring reports the CE
        and KD sums apart) and no backend (scoring picks its own)."""
        return dict(temperature=self.temperature, divergence=self.divergence, beta=self.beta,
                    skew=self.skew, t2_scale=self.t2_scale)

    def replace(self, **changes) -> LossSpec:
        """A copy with `changes` (checked again)."""
        return dataclasses.replace(self, **changes)

    def divergence_label(self) -> str:
        """The KD term's name as metrics report it: "forward_kl", "jsd(beta=0.3)",
        "skew_reverse_kl(skew=0.1)", with ", no T^2" when t2_scale is off."""
        args = {"jsd": f"beta={self.beta:g}", "skew_forward_kl": f"skew={self.skew:g}",
                "skew_reverse_kl": f"skew={self.skew:g}"}.get(self.divergence, "")
        if not self.t2_scale:
            args = f"{args}, no T^2" if args else "no T^2"
        return f"{self.divergence}({args})" if args else self.divergence


# --------------------------------------------------------------------------------------
# How the kernels run a spec
# --------------------------------------------------------------------------------------


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


def check_labels_in_range(labels, ignore_index, valid_vocab):
    """Raise if a non-ignored label falls outside [0, valid_vocab).

    Only called for CPU tensors: on a GPU the check would force a host synchronisation, so the
    Triton path instead turns an out-of-range label into a NaN loss the training loop stops on.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= valid_vocab))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{position}] = {int(labels[position])} is outside [0, {valid_vocab}) "
            f"and is not ignore_index={ignore_index}"
        )


def inverse_normalizer(normalizer, valid_count: torch.Tensor) -> torch.Tensor:
    """1 / normalizer as a 0-dim fp32 tensor on the labels' device, with no host sync.

    The default divisor is the local valid-token count, clamped to 1 so a micro-batch with every
    token ignored gives a loss of exactly 0 instead of 0 / 0.
    """
    device = valid_count.device
    if normalizer is None:
        return 1.0 / valid_count.to(torch.float32).clamp_min(1.0)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer tensor must hold one value, got shape {normalizer.shape}")
        return 1.0 / normalizer.detach().reshape(()).to(device=device, dtype=torch.float32)
    value = float(normalizer)
    if not value > 0.0:
        raise ValueError(f"normalizer={normalizer} must be > 0")
    # torch.full launches a fill; torch.tensor(..., device="cuda") would copy from host memory
    # and synchronise.
    return torch.full((), 1.0 / value, dtype=torch.float32, device=device)


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
