"""The student's LM head fused with the sparse (teacher cache) loss: no [tokens x vocab] logits.

`sparse_kd_head_loss(student_hidden, student_weight, targets, labels, ...)` returns what
`sparse_kd_loss(student_hidden @ student_weight.T, targets, labels, ...)` returns, through
engine/kernels/kd_head.py's own chunk loop, plan and autograd wrapper (its chunk rule and precision
rules, with no teacher head): each chunk's logits are formed, the sparse loss writes their
gradient in place, and that becomes the chunk's d hidden rows and its part of d weight in the
forward; backward only scales them. Gradients come back in the inputs' dtypes, d weight
accumulated in fp32 across chunks.
"""

from __future__ import annotations

import functools

import torch

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.kd_head import HeadLossFunction, head_plan, student_head_chunks
from engine.kernels.loss_spec import LossSpec, loss_stats
from engine.kernels.sparse_kd import sparse_kd_reference, sparse_loss_and_grad, sparse_options
from engine.kernels.sparse_targets import SparseTargets, check_targets


def _sparse_chunks(h_s, w_s, *, labels, targets, inv_norm, options, backend, plan):
    """The forward proper: (d hidden or None, d weight or None, ce_sum, kd_sum), unscaled."""

    def block_loss(s, start, stop, write_grad):
        return sparse_loss_and_grad(backend, s, targets.rows(start, stop), labels[start:stop],
                                    s if write_grad else None, inv_norm, options)

    return student_head_chunks(h_s, w_s, plan, block_loss)


def _check_student_head(hidden, weight, labels) -> None:
    """ValueError naming the tensor when shapes, dtypes or devices do not fit together."""
    for name, tensor in (("student_hidden", hidden), ("student_weight", weight)):
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
        if tensor.device != labels.device:
            raise ValueError(f"{name} is on {tensor.device} but labels on {labels.device}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if hidden.dim() < 2 or labels.shape != hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(hidden.shape)} must be labels' shape "
                         f"{tuple(labels.shape)} plus a hidden dimension")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"student_weight {tuple(weight.shape)} must be [vocab > 0, "
                         f"{hidden.shape[-1]}] (the student_hidden size)")


def sparse_kd_head_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
    valid_vocab: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    t2_scale: bool = True,
    chunk_tokens: int | None = None,
):
    """`sparse_kd_loss(student_hidden @ student_weight.T, targets, labels)` without the logits.

    student_hidden [..., H] shares labels' leading dims (and the targets' positions); the
    weight is [V, H] (embed_out.weight, no bias). Keywords as for sparse_kd_loss; chunk_tokens
    as for kd_head_loss. Returns (loss, stats). Gradients flow to student_hidden and
    student_weight in their own dtypes. No host synchronisation on CUDA.
    """
    _check_student_head(student_hidden, student_weight, labels)
    vocab = student_weight.shape[0]
    valid_vocab = vocab if valid_vocab is None else int(valid_vocab)
    if not 1 <= valid_vocab <= vocab:
        raise ValueError(f"valid_vocab={valid_vocab} must be in [1, {vocab}] (the weight's rows)")
    flat_labels = labels.reshape(-1)
    flat_targets = check_targets(targets, labels.shape, student_hidden.device)
    options, resolved, valid_count, inv_norm = sparse_options(
        flat_labels, student_hidden.device, flat_targets,
        LossSpec(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                 skew=skew, t2_scale=t2_scale, valid_vocab=valid_vocab,
                 ignore_index=ignore_index, backend=backend),
        valid_vocab=valid_vocab, normalizer=normalizer)
    plan = head_plan(student_hidden, student_weight, None, None, chunk_tokens)
    chunks = functools.partial(_sparse_chunks, labels=flat_labels, targets=flat_targets,
                               inv_norm=inv_norm, options=options, backend=resolved, plan=plan)
    loss, ce_sum, kd_sum = HeadLossFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, inv_norm,
        options.alpha, chunks)
    return loss, loss_stats(ce_sum, kd_sum, valid_count)


def sparse_kd_head_loss_reference(student_hidden, student_weight, targets, labels, **kwargs):
    """The head matmul followed by sparse_kd_reference: the definition, float64-capable."""
    return sparse_kd_reference(student_hidden @ student_weight.t(), targets, labels, **kwargs)
