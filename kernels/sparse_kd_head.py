"""The student's LM head fused with the sparse (teacher cache) loss: no [tokens x vocab] logits.

`sparse_kd_head_loss(student_hidden, student_weight, targets, labels, ...)` returns what
`sparse_kd_loss(student_hidden @ student_weight.T, targets, labels, ...)` returns, working
through chunks of tokens like kernels/kd_head.py (its chunk rule, precision rules and plan,
with no teacher head): each chunk's logits are formed, the sparse loss writes their gradient
in place, and that becomes the chunk's d hidden rows and its part of d weight in the forward;
backward only scales them. Gradients come back in the inputs' dtypes, d weight accumulated in
fp32 across chunks.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from kernels.constants import IGNORE_INDEX
from kernels.dispatch import loss_stats
from kernels.kd_head import HeadPlan, _matmul_dtype, default_chunk_tokens
from kernels.sparse_kd import sparse_kd_reference, sparse_loss_and_grad, sparse_options
from kernels.sparse_targets import SparseTargets, check_targets


def _chunk_gradients(plan: HeadPlan, h_s, w_s):
    """(d hidden buffer or None, fp32 d weight accumulator or None, partial-product buffer)."""
    grad_h = torch.empty_like(h_s) if plan.grad_hidden else None
    acc = torch.float64 if w_s.dtype == torch.float64 else torch.float32
    grad_w = torch.zeros(w_s.shape, dtype=acc, device=w_s.device) if plan.grad_weight else None
    partial = torch.empty(w_s.shape, dtype=plan.student_dtype, device=w_s.device) \
        if grad_w is not None and plan.student_dtype != acc else None
    return grad_h, grad_w, partial


def _sparse_chunks(h_s, w_s, labels, targets, inv_norm, options, backend, plan):
    """The forward proper: (d hidden or None, d weight or None, ce_sum, kd_sum), unscaled."""
    hs, ws = h_s.to(plan.student_dtype), w_s.to(plan.student_dtype)
    block = torch.empty(min(plan.chunk_tokens, max(h_s.shape[0], 1)), w_s.shape[0],
                        dtype=plan.student_dtype, device=h_s.device)
    grad_h, grad_w, partial = _chunk_gradients(plan, h_s, w_s)
    wanted = grad_h is not None or grad_w is not None
    sums = torch.zeros(2, dtype=torch.float64 if w_s.dtype == torch.float64 else torch.float32,
                       device=h_s.device)
    for start in range(0, h_s.shape[0], plan.chunk_tokens):
        stop = min(start + plan.chunk_tokens, h_s.shape[0])
        s = torch.mm(hs[start:stop], ws.t(), out=block[: stop - start])
        sums += torch.stack(sparse_loss_and_grad(backend, s, targets.rows(start, stop),
                                                 labels[start:stop], s if wanted else None,
                                                 inv_norm, options)).to(sums.dtype)
        if grad_h is not None:  # s holds d loss / d logits of the chunk
            grad_h[start:stop] = torch.mm(s, ws)
        if partial is not None:
            grad_w.add_(torch.mm(s.t(), hs[start:stop], out=partial))
        elif grad_w is not None:
            grad_w.addmm_(s.t(), hs[start:stop])
    if grad_w is not None:
        grad_w = grad_w.to(w_s.dtype)
    return grad_h, grad_w, sums[0], sums[1]


class SparseKDHeadLossFunction(torch.autograd.Function):
    """Autograd wrapper: the forward forms d hidden and d weight; backward scales them."""

    @staticmethod
    def forward(ctx, h_s, w_s, labels, inv_norm, targets, options, backend, plan):
        with torch.autocast(h_s.device.type, enabled=False):
            grad_h, grad_w, ce_sum, kd_sum = _sparse_chunks(h_s, w_s, labels, targets, inv_norm,
                                                            options, backend, plan)
        loss = ((1.0 - options.alpha) * kd_sum + options.alpha * ce_sum) * inv_norm
        ctx.grads = (grad_h, grad_w)  # handed to autograd by the first backward
        ctx.save_for_backward(h_s, w_s, labels, inv_norm)  # to recompute; no copies
        ctx.targets, ctx.options, ctx.backend, ctx.plan = targets, options, backend, plan
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grads, ctx.grads = ctx.grads, None
        h_s, w_s, labels, inv_norm = ctx.saved_tensors
        if grads is None:  # a second backward through a retained graph: form them again
            with torch.autocast(h_s.device.type, enabled=False):
                grads = _sparse_chunks(h_s, w_s, labels, ctx.targets, inv_norm, ctx.options,
                                       ctx.backend, ctx.plan)[:2]
        grad_h, grad_w = (None if g is None else g.mul_(grad_loss.to(g.dtype)) for g in grads)
        return grad_h, grad_w, None, None, None, None, None, None


def _plan(student_hidden, student_weight, chunk_tokens) -> HeadPlan:
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool)
                                     or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer or None")
    dtype = _matmul_dtype(student_hidden, student_weight, "student")
    if chunk_tokens is None:  # kd_head's rule with no teacher head
        chunk_tokens = default_chunk_tokens(
            student_hidden.shape[:-1].numel(), student_weight.shape[0],
            student_weight.shape[1], 0, torch.finfo(dtype).bits // 8, student_hidden.device)
    grad_on = torch.is_grad_enabled()
    return HeadPlan(int(chunk_tokens), dtype, dtype, grad_on and student_hidden.requires_grad,
                    grad_on and student_weight.requires_grad)


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
        flat_labels, student_hidden.device, flat_targets, backend=backend,
        normalizer=normalizer, divergence=divergence, alpha=alpha, temperature=temperature,
        ignore_index=ignore_index, valid_vocab=valid_vocab, beta=beta, skew=skew,
        t2_scale=t2_scale)
    plan = _plan(student_hidden, student_weight, chunk_tokens)
    loss, ce_sum, kd_sum = SparseKDHeadLossFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, flat_labels,
        inv_norm, flat_targets, options, resolved, plan)
    return loss, loss_stats(ce_sum, kd_sum, valid_count)


def sparse_kd_head_loss_reference(student_hidden, student_weight, targets, labels, **kwargs):
    """The head matmul followed by sparse_kd_reference: the definition, float64-capable."""
    return sparse_kd_reference(student_hidden @ student_weight.t(), targets, labels, **kwargs)
