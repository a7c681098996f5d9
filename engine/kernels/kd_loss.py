"""Fused distillation loss: (1 - alpha) * (T^2 or 1) * D(teacher_T, student_T) + alpha * CE.

The public entry point of the kernel package (D: forward KL by default, or one of the
divergences of engine/kernels/divergences.py). The loss and the gradient with respect to the student
logits are produced together in the forward (by the Triton kernel on CUDA, by the chunked
PyTorch path elsewhere), so no [tokens x vocab] fp32 intermediate is kept for autograd; backward
only scales the stored gradient by the incoming one. `kd_head_loss` (engine/kernels/kd_head.py,
with its CE-only sibling `ce_head_loss`) goes one step further and never forms the logits at
all. `kd_loss_reference` is the same loss written as directly as PyTorch allows (log_softmax,
the divergence's definition, cross entropy, autograd): what every other path is checked
against, float64-capable so tests can compare against a result whose own rounding is
negligible. `flatten_inputs` checks the inputs for every backend, so the same bad input gets
the same message everywhere.

The definitions (per token whose label is not ignore_index, over the columns < valid_vocab
only; D one of the divergences of engine/kernels/divergences.py, default forward KL):
    KD  = (T^2 if t2_scale else 1) * D(softmax(t / T), softmax(s / T))
    CE  = -log softmax(s)[label]
    loss_token = (1 - alpha) * KD + alpha * CE

Where the gradient lives (the in-place decision):
  * default (`inplace_grad=False`): a new buffer of the student's dtype and shape. The first
    backward scales it in place and hands it to autograd, so the peak holds one
    [tokens x vocab] buffer of the input dtype, not two. Autograd stays correct whatever else
    holds the logits. A further backward (retain_graph) recomputes the gradient from the
    inputs, which the function keeps references to (no copies) until its graph is freed.
  * `inplace_grad=True` (the training loop's opt-in): the gradient overwrites the student logits'
    own storage and backward scales it in place, saving that buffer too. The caller promises
    the logits' values are not needed afterwards and that backward runs once. If another
    autograd node saved the logits, PyTorch's version counter makes its backward raise instead
    of silently using overwritten values.
Neither mode syncs with the host. Double differentiation (create_graph) is refused: the
gradient is computed by hand and is not itself differentiable.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.divergences import divergence_reference, resolve_divergence
from engine.kernels.loss_spec import (
    LossSpec,
    check_labels_in_range,
    inverse_normalizer,
    loss_and_grad,
    loss_stats,
    prepare_loss,
)


def check_student_dtype(student_logits: torch.Tensor) -> None:
    """Refuse float16 student logits (ValueError naming the tensor).

    The gradient is stored in the student logits' dtype with the 1 / normalizer folded in:
    at 4096 tokens a typical entry (~1e-5 / 4096 ~ 2e-9) is below float16's smallest
    subnormal (6e-8) and flushes to zero. bf16 has float32's exponent range.
    """
    if student_logits.dtype == torch.float16:
        raise ValueError(
            "student_logits are float16: the loss stores their gradient in that dtype with "
            "1/normalizer folded in, which underflows in float16; pass bfloat16 or float32 "
            "logits (e.g. student_logits.float())"
        )


def flatten_inputs(student_logits, teacher_logits, labels, valid_vocab):
    """Check shapes and flatten [B, T, V] inputs to [N, V] / [N]; return (s, t, labels, vv).

    Shared by every backend so the same bad input gets the same message everywhere.
    """
    if student_logits.dim() not in (2, 3):
        raise ValueError(
            f"student_logits must be [N, V] or [B, T, V], got shape {tuple(student_logits.shape)}"
        )
    if teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher_logits shape {tuple(teacher_logits.shape)} != student_logits shape "
            f"{tuple(student_logits.shape)}"
        )
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' leading dims "
            f"{tuple(student_logits.shape[:-1])}"
        )
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if not student_logits.dtype.is_floating_point or not teacher_logits.dtype.is_floating_point:
        raise ValueError(
            f"logits must be floating point, got student {student_logits.dtype} and "
            f"teacher {teacher_logits.dtype}"
        )
    check_student_dtype(student_logits)
    if student_logits.device != teacher_logits.device or labels.device != student_logits.device:
        raise ValueError(
            f"student_logits ({student_logits.device}), teacher_logits ({teacher_logits.device}) "
            f"and labels ({labels.device}) must be on one device"
        )
    vocab = student_logits.shape[-1]
    if vocab == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    if valid_vocab is None:
        valid_vocab = vocab
    valid_vocab = int(valid_vocab)
    if not 1 <= valid_vocab <= vocab:
        raise ValueError(f"valid_vocab={valid_vocab} must be in [1, {vocab}] (logits last dim)")
    s = student_logits.reshape(-1, vocab)
    t = teacher_logits.reshape(-1, vocab)
    return s, t, labels.reshape(-1), valid_vocab


def _rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


class LogitsLossFunction(torch.autograd.Function):
    """Autograd wrapper of a loss on student logits that forms d loss / d logits in its
    forward (kd_loss, and the teacher cache's sparse_kd_loss): `run(s, grad)`, the loss bound
    to its other inputs (a teacher's logits or cached targets, held by reference, no copies),
    writes the gradient of the [N, V] rows `s` into `grad` and returns (ce_sum, kd_sum);
    backward scales the stored gradient (stored_gradient)."""

    @staticmethod
    def forward(ctx, student, inv_norm, alpha, triton, inplace_grad, run, name):
        s = _rows(student)
        in_place = inplace_grad and s.is_contiguous()
        if in_place:
            grad = s  # overwritten row block by row block after each block is read
        else:
            s = s.contiguous()
            grad = torch.empty_like(s)
        ce_sum, kd_sum = run(s, grad)
        if in_place and triton:
            # The kernel wrote through a raw pointer, which autograd cannot see: bump the
            # version counter so any node that saved the logits refuses to use them.
            torch.autograd.graph.increment_version(student)
        loss = ((1.0 - alpha) * kd_sum + alpha * ce_sum) * inv_norm
        # Kept as an attribute, not a saved tensor: the first backward gives it away (a saved
        # tensor would stay referenced), and in place it is a no-grad view of the logits,
        # which saved-tensor checks forbid.
        ctx.grad_buffer = grad
        if not inplace_grad:
            ctx.save_for_backward(student)  # to recompute, no copies
        ctx.run, ctx.name = run, name
        ctx.student_shape, ctx.inplace_grad = student.shape, inplace_grad
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        def recompute():
            s = _rows(ctx.saved_tensors[0]).contiguous()
            grad = torch.empty_like(s)
            ctx.run(s, grad)
            return grad

        grad = stored_gradient(ctx, grad_loss, ctx.name, recompute)
        return grad, None, None, None, None, None, None


def stored_gradient(ctx, grad_loss, name: str, recompute):
    """The backward of a loss whose forward left d loss / d logits in ctx.grad_buffer: that
    buffer, handed over once and scaled in place by the incoming gradient; a second backward
    (retain_graph) gets `recompute()` instead, except in place (ctx.inplace_grad).

    Scaled even when the incoming gradient is 1 (plain loss.backward()): checking for 1 would
    cost a host sync, and on a GPU that stall (the CPU then launches the whole backward while
    the GPU idles) costs far more than this one extra pass over the buffer (the profile is in
    benchmarks/README.md).
    """
    grad, ctx.grad_buffer = ctx.grad_buffer, None
    if grad is None:  # a second backward through a retained graph
        if ctx.inplace_grad:
            raise RuntimeError(f"{name}(inplace_grad=True) supports a single backward pass")
        grad = recompute()
    grad = grad.mul_(grad_loss.to(grad.dtype))
    return grad.view(ctx.student_shape)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
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
    """Distillation loss summed over valid tokens and divided by `normalizer`.

    student_logits, teacher_logits: [N, V] or [B, T, V] (fp32 / bf16, fp32 math; float16
    student logits are refused: their gradient would underflow, see check_student_dtype).
    labels: [N] or [B, T], already shifted; ignore_index tokens count nowhere, zero gradient.
    valid_vocab: columns >= it are excluded from every softmax and get zero gradient.
    normalizer: divisor of the summed token losses (a number or 0-dim tensor, e.g. the valid
    tokens of a whole accumulation window across ranks); default the local valid count (>= 1).
    divergence: forward_kl (default), reverse_kl, jsd, skew_forward_kl, skew_reverse_kl or tvd
    (definitions in engine/kernels/divergences.py); beta is read by jsd only (0 = forward_kl,
    1 = reverse_kl) and skew by the skew KLs only, both must lie in [0, 1] whatever the
    divergence. t2_scale: multiply the KD term by T^2 (Hinton; False matches peers without it).
    Returns (loss, stats): loss a 0-dim fp32 tensor (float64 for float64 logits on the torch
    path); stats detached 0-dim fp32 tensors
    {"ce_sum", "kd_sum", "valid_tokens"} (sums, so they add up across micro-batches; kd_sum
    includes the T^2 factor when t2_scale). The teacher never receives a gradient. No host
    synchronisation on CUDA.
    """
    s, _, flat_labels, valid_vocab = flatten_inputs(
        student_logits, teacher_logits, labels, valid_vocab
    )
    spec = LossSpec(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                    skew=skew, t2_scale=t2_scale, valid_vocab=valid_vocab,
                    ignore_index=ignore_index, backend=backend)
    options, resolved, valid_count, inv_norm = prepare_loss(
        flat_labels, s.device, spec, valid_vocab=valid_vocab, normalizer=normalizer)
    t = _rows(teacher_logits.detach())
    if t.stride(-1) != 1:
        t = t.contiguous()

    def run(s, grad):
        return loss_and_grad(resolved, s, t, flat_labels, grad, inv_norm, options)

    loss, ce_sum, kd_sum = LogitsLossFunction.apply(
        student_logits, inv_norm, options.alpha, resolved == "triton", bool(inplace_grad), run,
        "kd_loss")
    return loss, loss_stats(ce_sum, kd_sum, valid_count)


def kd_loss_reference(
    student_logits,
    teacher_logits,
    labels,
    *,
    alpha=0.5,
    temperature=2.0,
    ignore_index=IGNORE_INDEX,
    valid_vocab=None,
    normalizer=None,
    divergence="forward_kl",
    beta=0.5,
    skew=0.1,
    t2_scale=True,
):
    """The loss written as plainly as possible; differentiable by autograd; float64-capable.

    Math runs in float64 when the student logits are float64, otherwise in fp32. Takes the
    arguments of `engine.kernels.kd_loss.kd_loss` and returns (loss, stats) exactly like it.
    """
    divergence = resolve_divergence(LossSpec(alpha=alpha, temperature=temperature,
                                             divergence=divergence, beta=beta, skew=skew))
    s, t, labels, valid_vocab = flatten_inputs(student_logits, teacher_logits, labels, valid_vocab)
    compute = torch.float64 if s.dtype == torch.float64 else torch.float32
    s = s[:, :valid_vocab].to(compute)
    t = t[:, :valid_vocab].detach().to(compute)
    valid = labels != ignore_index
    if s.device.type == "cpu":
        check_labels_in_range(labels, ignore_index, valid_vocab)

    log_q = torch.log_softmax(s / temperature, dim=-1)
    log_p = torch.log_softmax(t / temperature, dim=-1)
    kd_scale = temperature**2 if t2_scale else 1.0
    kd_token = kd_scale * divergence_reference(divergence, log_p, log_q, beta=beta, skew=skew)

    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    log_p_student = torch.log_softmax(s, dim=-1)
    ce_token = -log_p_student.gather(1, safe_labels[:, None]).squeeze(1)

    zero = torch.zeros((), dtype=compute, device=s.device)
    kd_token = torch.where(valid, kd_token, zero)
    ce_token = torch.where(valid, ce_token, zero)
    kd_sum = kd_token.sum()
    ce_sum = ce_token.sum()
    valid_count = valid.sum()
    inv_norm = inverse_normalizer(normalizer, valid_count).to(compute)
    loss = ((1.0 - alpha) * kd_sum + alpha * ce_sum) * inv_norm
    stats = {
        "ce_sum": ce_sum.detach().float(),
        "kd_sum": kd_sum.detach().float(),
        "valid_tokens": valid_count.detach().float(),
    }
    return loss, stats
