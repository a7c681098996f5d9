"""Fused distillation loss: (1 - alpha) * T^2 * KL(teacher_T || student_T) + alpha * CE.

The public entry point of the kernel package. The loss and the gradient with respect to the
student logits are produced together in the forward (by the Triton kernel on CUDA, by the chunked
PyTorch path elsewhere), so no [tokens x vocab] fp32 intermediate is kept for autograd; backward
only scales the stored gradient by the incoming one.

Where the gradient lives (the in-place decision):
  * default (`inplace_grad=False`): a new buffer of the student's dtype and shape. Autograd stays
    correct whatever else holds the logits, and backward may run more than once (retain_graph).
  * `inplace_grad=True` (the training loop's opt-in): the gradient overwrites the student logits'
    own storage and backward scales it in place, saving one [tokens x vocab] buffer. The
    caller promises the logits' values are not needed afterwards and that backward runs once.
    If another autograd node saved the logits, PyTorch's version counter makes its backward
    raise instead of silently using overwritten values. Neither mode syncs with the host.
    The default mode's backward allocates the scaled gradient (the buffer it saved may be needed
    again under retain_graph), so its peak holds two [tokens x vocab] buffers of the input dtype.
"""

from __future__ import annotations

import os

import torch

from kernels.kd_loss_torch import (
    check_hyperparameters,
    check_labels_in_range,
    flatten_inputs,
    inverse_normalizer,
    kd_loss_forward_chunked,
    kd_loss_reference,
)

__all__ = ["KDLossFunction", "kd_loss", "kd_loss_reference", "triton_available"]

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} must be one of {BACKENDS}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but triton is not installed")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 set before "
                "triton is imported"
            )
    return backend


class KDLossFunction(torch.autograd.Function):
    """Autograd wrapper: forward computes loss, stats and d loss / d student; backward scales."""

    @staticmethod
    def forward(
        ctx,
        student,
        teacher,
        labels,
        alpha,
        temperature,
        ignore_index,
        valid_vocab,
        inv_norm,
        backend,
        inplace_grad,
    ):
        s = student.reshape(-1, student.shape[-1])
        t = teacher.reshape(-1, teacher.shape[-1])
        if t.stride(-1) != 1:
            t = t.contiguous()
        if inplace_grad and s.is_contiguous():
            grad = s  # overwritten row block by row block after each block is read
        else:
            s = s.contiguous()
            grad = torch.empty_like(s)
        kwargs = dict(
            alpha=alpha,
            temperature=temperature,
            ignore_index=ignore_index,
            valid_vocab=valid_vocab,
            inv_norm=inv_norm,
        )
        if backend == "triton":
            from kernels.kd_loss_triton import kd_loss_forward_triton

            ce_sum, kd_sum = kd_loss_forward_triton(s, t, labels, grad, **kwargs)
            if grad is s:
                # The kernel wrote through a raw pointer, which autograd cannot see: bump the
                # version counter so any node that saved the logits refuses to use them.
                torch.autograd.graph.increment_version(student)
        else:
            ce_sum, kd_sum = kd_loss_forward_chunked(s, t, labels, grad, **kwargs)
        loss = ((1.0 - alpha) * kd_sum + alpha * ce_sum) * inv_norm
        if inplace_grad:
            # The buffer is a view of the student logits made in no-grad mode, which saved-tensor
            # checks forbid; keep it as an attribute and drop it in the (single) backward.
            ctx.grad_buffer = grad
        else:
            # Saved tensors are freed by backward (unless retain_graph), so the buffer does not
            # outlive the step while the caller still holds the loss.
            ctx.save_for_backward(grad)
        ctx.student_shape = student.shape
        ctx.dtype = grad.dtype
        ctx.inplace_grad = inplace_grad
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        scale = grad_loss.to(ctx.dtype)
        if ctx.inplace_grad:
            grad, ctx.grad_buffer = ctx.grad_buffer, None
            if grad is None:
                raise RuntimeError("kd_loss(inplace_grad=True) supports a single backward pass")
            # Scaled in place even when the incoming gradient is 1 (plain loss.backward()):
            # checking for 1 would cost a host sync, and on a GPU that stall (the CPU then
            # launches the whole backward while the GPU idles) measured far dearer than this
            # one extra pass over the buffer (H200, seed step: GPU busy 1% -> 16% under the
            # profiler, benchmarks/step_profile.py).
            grad = grad.mul_(scale)
        else:
            (grad,) = ctx.saved_tensors
            grad = grad * scale
        return grad.view(ctx.student_shape), None, None, None, None, None, None, None, None, None


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = -100,
    valid_vocab: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    inplace_grad: bool = False,
):
    """Distillation loss summed over valid tokens and divided by `normalizer`.

    student_logits, teacher_logits: [N, V] or [B, T, V] (fp32 / bf16 / fp16, fp32 math).
    labels: [N] or [B, T], already shifted; ignore_index tokens count nowhere, zero gradient.
    valid_vocab: columns >= it are excluded from every softmax and get zero gradient.
    normalizer: divisor of the summed token losses (a number or 0-dim tensor, e.g. the valid
    tokens of a whole accumulation window across ranks); default the local valid count (>= 1).
    Returns (loss, stats): loss a 0-dim fp32 tensor; stats detached 0-dim fp32 tensors
    {"ce_sum", "kd_sum", "valid_tokens"} (sums, so they add up across micro-batches). The teacher
    never receives a gradient. No host synchronisation on CUDA.
    """
    check_hyperparameters(alpha, temperature)
    s, _, flat_labels, valid_vocab = flatten_inputs(
        student_logits, teacher_logits, labels, valid_vocab
    )
    resolved = _resolve_backend(backend, s.device)
    if s.device.type == "cpu":
        check_labels_in_range(flat_labels, ignore_index, valid_vocab)
    valid_count = (flat_labels != ignore_index).sum()
    inv_norm = inverse_normalizer(normalizer, valid_count)
    loss, ce_sum, kd_sum = KDLossFunction.apply(
        student_logits,
        teacher_logits.detach(),
        flat_labels,
        float(alpha),
        float(temperature),
        int(ignore_index),
        valid_vocab,
        inv_norm,
        resolved,
        bool(inplace_grad),
    )
    stats = {
        "ce_sum": ce_sum.detach(),
        "kd_sum": kd_sum.detach(),
        "valid_tokens": valid_count.detach().float(),
    }
    return loss, stats
