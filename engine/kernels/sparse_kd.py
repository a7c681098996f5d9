"""Distillation from a teacher cache: (1 - alpha) * KD(sparse targets, student) + alpha * CE.

The entry point of the sparse loss, kd_loss's counterpart when the teacher is not run but read
from a cache (engine/data/teacher_cache.py): the teacher side is `SparseTargets`
(engine/kernels/sparse_targets.py: a few listed columns per position with their masses, a tail
bucket,
an entropy), never a [tokens x vocab] tensor. Definition: engine/kernels/sparse_kd_torch.py and
docs/loss.md. The loss and its gradient with respect to the student logits are formed together
in the forward (the Triton kernel on CUDA, the chunked PyTorch path elsewhere); backward only
scales the stored gradient, and the memory modes (`inplace_grad`) are kd_loss's.

Only the forward KL is supported. The sampled targets are unbiased only for a loss linear in
the teacher's probabilities (forward KL = cross-entropy minus a constant); the reverse KL, JSD,
the skew KLs and TVD need the teacher's probability at every column the student puts mass on,
which neither a top-k nor a sampled cache has. Any other divergence is refused, by name.
"""

from __future__ import annotations

import torch

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.kd_loss import LogitsLossFunction, check_student_dtype
from engine.kernels.loss_spec import LossOptions, LossSpec, loss_stats, prepare_loss
from engine.kernels.sparse_kd_torch import sparse_kd_forward_chunked, sparse_kd_reference
from engine.kernels.sparse_targets import SparseTargets, check_target_values, check_targets

__all__ = ["SUPPORTED_DIVERGENCES", "SparseTargets", "sparse_kd_loss", "sparse_kd_reference"]

SUPPORTED_DIVERGENCES = ("forward_kl",)


def sparse_options(flat_labels, device, targets: SparseTargets, spec: LossSpec, *,
                   valid_vocab: int, normalizer):
    """prepare_loss for the sparse loss: the same checks, the divergence refused unless it is
    the forward KL, and on CPU the targets' values checked. Returns prepare_loss's tuple."""
    prepared = prepare_loss(flat_labels, device, spec, valid_vocab=valid_vocab,
                            normalizer=normalizer)
    if prepared[0].divergence not in SUPPORTED_DIVERGENCES:
        raise ValueError(
            f"divergence={spec.divergence!r} cannot be computed from a teacher cache: it stores a "
            "few columns of the teacher per position, and only the forward KL (linear in the "
            "teacher's probabilities, so a sampled cache estimates it without bias) needs no "
            f"more; supported: {SUPPORTED_DIVERGENCES}. Use an online teacher (teacher.path) "
            "for the other divergences")
    if device.type == "cpu":
        check_target_values(targets, prepared[0].valid_vocab)
    return prepared


def sparse_loss_and_grad(backend: str, s, targets: SparseTargets, labels, grad_out, inv_norm,
                         options: LossOptions):
    """Run the resolved backend on [N, V] logits and flat targets; write d loss / d s into
    grad_out (may be s; None: forward only). (ce_sum, kd_sum), no host sync, autocast off."""
    with torch.autocast(s.device.type, enabled=False):
        if backend == "triton":
            from engine.kernels.sparse_kd_triton import sparse_kd_forward_triton

            return sparse_kd_forward_triton(s, targets, labels, grad_out, options,
                                            inv_norm=inv_norm)
        return sparse_kd_forward_chunked(s, targets, labels, grad_out, options, inv_norm=inv_norm)


def _flat_student(student_logits, labels, valid_vocab) -> tuple[int, torch.Tensor]:
    """(valid_vocab, flat labels) after checking shapes and dtypes (ValueError naming them)."""
    if student_logits.dim() not in (2, 3) or not student_logits.dtype.is_floating_point:
        raise ValueError(f"student_logits must be floating point [N, V] or [B, T, V], got "
                         f"{student_logits.dtype} {tuple(student_logits.shape)}")
    check_student_dtype(student_logits)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits' leading "
                         f"dims {tuple(student_logits.shape[:-1])}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.device != student_logits.device:
        raise ValueError(f"labels ({labels.device}) and student_logits "
                         f"({student_logits.device}) must be on one device")
    vocab = student_logits.shape[-1]
    valid_vocab = vocab if valid_vocab is None else int(valid_vocab)
    if not 1 <= valid_vocab <= vocab:
        raise ValueError(f"valid_vocab={valid_vocab} must be in [1, {vocab}] (logits last dim)")
    return valid_vocab, labels.reshape(-1)


def sparse_kd_loss(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
    valid_vocab: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    inplace_grad: bool = False,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    t2_scale: bool = True,
):
    """Distillation loss against cached sparse targets, summed over valid tokens / normalizer.

    student_logits [N, V] or [B, T, V]; labels and the targets' positions share its leading
    dims; every keyword means what it means for engine.kernels.kd_loss.kd_loss (divergence: the
    forward KL only, see the module docstring; beta and skew are range-checked as there, and
    read by no divergence the cache supports). Returns (loss, stats) like kd_loss: stats
    {"ce_sum", "kd_sum", "valid_tokens"}, detached fp32 sums.
    """
    valid_vocab, flat_labels = _flat_student(student_logits, labels, valid_vocab)
    flat_targets = check_targets(targets, labels.shape, student_logits.device)
    options, resolved, valid_count, inv_norm = sparse_options(
        flat_labels, student_logits.device, flat_targets,
        LossSpec(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                 skew=skew, t2_scale=t2_scale, valid_vocab=valid_vocab,
                 ignore_index=ignore_index, backend=backend),
        valid_vocab=valid_vocab, normalizer=normalizer)
    def run(s, grad):
        return sparse_loss_and_grad(resolved, s, flat_targets, flat_labels, grad, inv_norm,
                                    options)

    loss, ce_sum, kd_sum = LogitsLossFunction.apply(
        student_logits, inv_norm, options.alpha, resolved == "triton", bool(inplace_grad), run,
        "sparse_kd_loss")
    return loss, loss_stats(ce_sum, kd_sum, valid_count)
