"""Fused LM heads + distillation loss: neither model's [tokens x vocab] logits ever exist.

`kd_head_loss` takes the hidden states and head weights of both models (weights [V, H] as
stored in embed_out.weight, no bias) and returns what the head matmuls followed by
`engine.kernels.kd_loss.kd_loss` return. It works through chunks of tokens: for each chunk it forms
the two [chunk x V] logit blocks, runs the loss kernel on them (Triton on CUDA, the chunked
PyTorch path elsewhere), which writes d loss / d student logits in place over the student block,
and immediately turns that into the chunk's rows of d hidden and its contribution to d weight.
Both gradients therefore exist when the forward returns, and backward only scales them; the
teacher's head runs without autograd. Under torch.no_grad (or for inputs that do not require
grad) it runs forward only: no gradient matmul, and the loss kernel writes no logit gradient.
`ce_head_loss` is the same loop without a teacher: cross-entropy only (alpha = 1).
Peak memory beyond the inputs: the two chunk blocks, d hidden, and d weight (accumulated in
fp32 across chunks, whatever the weight's dtype; a single chunk's product is d weight as it is).

Precision follows the unfused path under each training precision:
  * fp32: fp32 matmuls and loss.
  * bf16-pure (bf16 hidden states and weights): bf16 matmuls, fp32 loss math on bf16 logits,
    bf16 logit gradient; d weight summed in fp32 and rounded to bf16 once.
  * bf16-autocast (fp32 weights under torch.autocast): the matmuls run in the autocast dtype on
    cast copies, as F.linear would; the gradients come back in the inputs' dtypes (fp32).
The autocast decision is read once, before the autograd Function, and the forward runs with
autocast off and casts explicitly: the matmuls then run in exactly that dtype, and in-place
accumulations are never re-cast. Backward only multiplies, which autocast does not touch, so
torch.amp.custom_fwd / custom_bwd are not needed.

Chunk size (`head_chunk_tokens`, the one rule the memory plan, engine/memory.py, uses too):
the largest chunk whose logit blocks fit a fixed budget, then evened out so that every chunk
has the same size (4096 tokens in chunks of at most 1280 run as 4 x 1024, never 3 x 1280 +
256: a short last chunk re-reads both weights for little work). The budget:
  * CPU: the two fp32 logit blocks take CPU_LOGIT_BLOCK_BYTES (measured, see the constant);
    without a teacher head (ce_head_loss, the teacher cache's sparse head) the one block does.
  * CUDA (designed, not yet measured): the blocks take GPU_LOGIT_BLOCK_BYTES: at the seed
    shapes (4096 tokens, V 50304, Hs 512, Ht 768, bf16) 4 chunks of 1024 tokens, under 0.45 GiB
    extra. Each chunk re-reads both head weights and the fp32 d weight accumulator, about a
    third of its matmuls' time before any overlap; the GPU suite's chunk sweep decides whether
    a larger budget pays for its memory.
`chunk_tokens=` overrides the budget (the largest chunk; it is evened out the same way).

backend="epilogue" (EpilogueHeadLoss): no logit is written. The forward runs one Triton
matmul over both heads whose epilogue reduces every logit tile to per-row statistics
(engine/kernels/head_epilogue_triton.py) and merges them per row here: no [tokens x vocab]
tensor and no chunk block exists in the forward. The backward recomputes the logit tiles once,
chunk by chunk, writing d loss / d student logits (the incoming gradient folded in) into one
[chunk x V] block, which two matmuls turn into d hidden and d weight (add_weight_grad). The
gradient is thus formed in the backward: under torch.no_grad only the statistics kernel runs,
and a second backward through a retained graph runs it again. Supported: the forward KL with
a teacher head, bf16 or fp32 matmuls; `epilogue_fallback_reason` names what is not, and
kd_head_loss then runs the chunked path with the Triton loss kernel instead (docs/loss.md).
"""

from __future__ import annotations

import dataclasses
import functools

import torch
from torch.autograd.function import once_differentiable

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.kd_loss import kd_loss_reference
from engine.kernels.loss_spec import LossSpec, loss_and_grad, loss_stats, prepare_loss

# Both fp32 logit blocks of a chunk on the CPU: 100 MiB, i.e. 256 tokens at V = 50304: the
# largest chunk whose extra peak memory stays within 1/8 of the unfused head + loss in both of
# kd_loss's modes, at a few percent of time over larger chunks (benchmarks/README.md).
CPU_LOGIT_BLOCK_BYTES = 100 << 20
# CUDA: both logit blocks of a chunk (the matmul dtype) at most 256 MiB (module docstring).
GPU_LOGIT_BLOCK_BYTES = 256 << 20


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def head_chunk_tokens(n_tokens, vocab, with_teacher, element_size, device, requested=None):
    """Tokens per chunk by the rule of the module docstring: the largest chunk the budget
    (or `requested`) allows, evened out over ceil(n_tokens / largest) equal chunks (the last
    at most one token per chunk shorter). At least 1, at most n_tokens."""
    blocks = 2 if with_teacher else 1  # CE only and the sparse (cached) loss: no teacher block
    if requested is not None:
        largest = requested
    elif device.type == "cuda":
        largest = _round_down(GPU_LOGIT_BLOCK_BYTES // (blocks * element_size * vocab), 64)
    else:
        largest = _round_down(CPU_LOGIT_BLOCK_BYTES // (blocks * 4 * vocab), 32)
    n_tokens = max(n_tokens, 1)
    n_chunks = -(-n_tokens // largest)
    return -(-n_tokens // n_chunks)


# torch >= 2.8: addmm with bf16 / fp16 operands and an fp32 output (CUDA only, cuBLAS).
_ADDMM_OUT_DTYPE = hasattr(torch.ops.aten.addmm, "dtype_out")


def add_weight_grad(grad_w: torch.Tensor, grad_logits: torch.Tensor, hidden: torch.Tensor):
    """grad_w += grad_logits^T @ hidden, accumulated in grad_w's dtype (fp32 / float64).

    The product is never rounded to the operands' dtype: with bf16 operands the matmul's own
    fp32 accumulator goes straight into grad_w (cuBLAS's fp32-output GEMM on CUDA, beta = 1,
    in place), so a sum over many chunks is rounded once, when the caller converts grad_w.
    On the CPU, which has no mixed-dtype GEMM, the chunk's operands are upcast instead.
    """
    if grad_logits.dtype == grad_w.dtype:
        grad_w.addmm_(grad_logits.t(), hidden)
    elif grad_w.is_cuda and _ADDMM_OUT_DTYPE:
        torch.addmm(grad_w, grad_logits.t(), hidden, out_dtype=grad_w.dtype, out=grad_w)
    else:
        grad_w.addmm_(grad_logits.t().to(grad_w.dtype), hidden.to(grad_w.dtype))


@dataclasses.dataclass(frozen=True)
class HeadPlan:
    """How the forward runs: chunk size, matmul dtypes, and which gradients to form."""

    chunk_tokens: int
    student_dtype: torch.dtype
    teacher_dtype: torch.dtype
    grad_hidden: bool
    grad_weight: bool


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor, name: str) -> torch.dtype:
    """The dtype the head matmul runs in: the autocast dtype under autocast, like F.linear."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type) and torch.float64 not in (hidden.dtype,
                                                                         weight.dtype):
        return torch.get_autocast_dtype(device_type)
    if hidden.dtype != weight.dtype:
        raise ValueError(
            f"{name}_hidden ({hidden.dtype}) and {name}_weight ({weight.dtype}) must share a "
            "dtype outside torch.autocast"
        )
    return hidden.dtype


def _check_head_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels):
    """ValueError naming the tensor when shapes, dtypes or devices do not fit together.

    teacher_hidden and teacher_weight are both None for the CE-only head (ce_head_loss)."""
    if teacher_hidden is None:
        teacher_hidden, teacher_weight = student_hidden, student_weight
    tensors = {"student_hidden": student_hidden, "student_weight": student_weight,
               "teacher_hidden": teacher_hidden, "teacher_weight": teacher_weight}
    for name, tensor in tensors.items():
        if not tensor.dtype.is_floating_point:
            raise ValueError(f"{name} must be floating point, got {tensor.dtype}")
        if tensor.device != labels.device:
            raise ValueError(f"{name} is on {tensor.device} but labels on {labels.device}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if student_hidden.dim() < 2 or labels.shape != student_hidden.shape[:-1]:
        raise ValueError(f"student_hidden {tuple(student_hidden.shape)} must be labels' shape "
                         f"{tuple(labels.shape)} plus a hidden dimension")
    if teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
        raise ValueError(f"teacher_hidden {tuple(teacher_hidden.shape)} and student_hidden "
                         f"{tuple(student_hidden.shape)} must have the same leading dims")
    for name in ("student", "teacher"):
        weight, hidden = tensors[f"{name}_weight"], tensors[f"{name}_hidden"]
        if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
            raise ValueError(f"{name}_weight {tuple(weight.shape)} must be [vocab, "
                             f"{hidden.shape[-1]}] (the {name}_hidden size)")
    if student_weight.shape[0] != teacher_weight.shape[0] or student_weight.shape[0] == 0:
        raise ValueError(f"student_weight has {student_weight.shape[0]} vocabulary rows and "
                         f"teacher_weight {teacher_weight.shape[0]}: they must be equal, > 0")


def student_head_chunks(h_s, w_s, plan: HeadPlan, block_loss):
    """The student head, chunk by chunk: (d hidden or None, d weight or None, ce_sum, kd_sum).

    For each chunk of tokens it forms the student's [chunk x V] logits `s` and calls
    `block_loss(s, start, stop, write_grad)`, which returns (ce_sum, kd_sum) of those tokens
    and, when write_grad, leaves d loss / d logits in `s`; the loop turns that into the
    chunk's rows of d hidden and its part of d weight (unscaled; fp32 accumulation).
    Shared by kd_head_loss / ce_head_loss and the teacher cache's sparse_kd_head_loss.
    """
    n_tokens, vocab = h_s.shape[0], w_s.shape[0]
    hs, ws = h_s.to(plan.student_dtype), w_s.to(plan.student_dtype)
    rows = min(plan.chunk_tokens, max(n_tokens, 1))
    s_block = torch.empty(rows, vocab, dtype=plan.student_dtype, device=h_s.device)
    grad_h = torch.empty_like(h_s) if plan.grad_hidden else None
    acc_dtype = torch.float64 if w_s.dtype == torch.float64 else torch.float32
    # One chunk in the weight's own dtype (bf16-pure, fp32): its d weight product (one matmul,
    # rounded once) is the gradient, with no fp32 accumulator to fill and round back: the same
    # bits, two passes over [V, H] fewer. Under autocast the accumulator stays.
    single = (plan.grad_weight and n_tokens <= plan.chunk_tokens
              and plan.student_dtype == w_s.dtype)
    grad_w = (torch.zeros(w_s.shape, dtype=acc_dtype, device=w_s.device)
              if plan.grad_weight and not single else None)
    sums = torch.zeros(2, dtype=acc_dtype, device=h_s.device)
    write_grad = grad_h is not None or plan.grad_weight  # else forward only
    for start in range(0, n_tokens, plan.chunk_tokens):
        stop = min(start + plan.chunk_tokens, n_tokens)
        s = s_block[: stop - start]
        torch.mm(hs[start:stop], ws.t(), out=s)
        sums += torch.stack(block_loss(s, start, stop, write_grad)).to(acc_dtype)
        if grad_h is not None:  # s now holds d loss / d student logits
            if grad_h.dtype == s.dtype:
                torch.mm(s, ws, out=grad_h[start:stop])
            else:
                grad_h[start:stop] = torch.mm(s, ws)
        if single:
            grad_w = torch.mm(s.t(), hs[start:stop])
        elif grad_w is not None:
            add_weight_grad(grad_w, s, hs[start:stop])
    if grad_w is not None and grad_w.dtype != w_s.dtype:
        grad_w = grad_w.to(w_s.dtype)
    return grad_h, grad_w, sums[0], sums[1]


def _chunk_loop(h_s, w_s, *, h_t, w_t, labels, inv_norm, options, backend, plan):
    """The forward proper of kd_head_loss: (d hidden or None, d weight or None, ce_sum, kd_sum),
    unscaled.

    Without a teacher (h_t None: CE only, alpha 1) the loss kernel reads the student block as
    its teacher too (the KD term has weight 0) and kd_sum stays 0."""
    if h_t is not None:
        ht, wt = h_t.to(plan.teacher_dtype), w_t.to(plan.teacher_dtype)
        t_block = torch.empty(min(plan.chunk_tokens, max(h_s.shape[0], 1)), w_s.shape[0],
                              dtype=plan.teacher_dtype, device=h_s.device)

    def block_loss(s, start, stop, write_grad):
        t = s
        if h_t is not None:
            t = torch.mm(ht[start:stop], wt.t(), out=t_block[: stop - start])
        ce, kd = loss_and_grad(backend, s, t, labels[start:stop], s if write_grad else None,
                               inv_norm, options)
        return ce, kd if h_t is not None else torch.zeros_like(kd)

    return student_head_chunks(h_s, w_s, plan, block_loss)


class HeadLossFunction(torch.autograd.Function):
    """Autograd wrapper of a fused head + loss: the forward forms d hidden and d weight with
    `chunks(h_s, w_s)` (-> d hidden, d weight, ce_sum, kd_sum: _chunk_loop or the sparse
    loss's with the other inputs bound, which it holds by reference, no copies), backward
    scales them; a second backward (retain_graph) forms them again."""

    @staticmethod
    def forward(ctx, h_s, w_s, inv_norm, alpha, chunks):
        with torch.autocast(h_s.device.type, enabled=False):
            grad_h, grad_w, ce_sum, kd_sum = chunks(h_s, w_s)
        loss = ((1.0 - alpha) * kd_sum + alpha * ce_sum) * inv_norm
        # Attributes, not saved tensors: the first backward hands them to autograd.
        ctx.grads = (grad_h, grad_w)
        ctx.save_for_backward(h_s, w_s)
        ctx.chunks = chunks
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        grads, ctx.grads = ctx.grads, None
        h_s, w_s = ctx.saved_tensors
        if grads is None:  # a second backward through a retained graph: form them again
            with torch.autocast(h_s.device.type, enabled=False):
                grads = ctx.chunks(h_s, w_s)[:2]
        grad_h, grad_w = grads
        if grad_h is not None:
            grad_h = grad_h.mul_(grad_loss.to(grad_h.dtype)).view(h_s.shape)
        if grad_w is not None:
            grad_w = grad_w.mul_(grad_loss.to(grad_w.dtype))
        return grad_h, grad_w, None, None, None


def head_plan(student_hidden, student_weight, teacher_hidden, teacher_weight, chunk_tokens):
    """The HeadPlan of a call (teacher_hidden / teacher_weight None: the student head only)."""
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool)
                                     or not isinstance(chunk_tokens, int) or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens={chunk_tokens!r} must be a positive integer or None")
    student_dtype = _matmul_dtype(student_hidden, student_weight, "student")
    teacher_dtype = student_dtype  # CE only: no teacher head
    if teacher_hidden is not None:
        teacher_dtype = _matmul_dtype(teacher_hidden, teacher_weight, "teacher")
    chunk_tokens = head_chunk_tokens(
        student_hidden.shape[:-1].numel(), student_weight.shape[0], teacher_hidden is not None,
        torch.finfo(student_dtype).bits // 8, student_hidden.device, chunk_tokens)
    grad_on = torch.is_grad_enabled()
    return HeadPlan(int(chunk_tokens), student_dtype, teacher_dtype,
                    grad_on and student_hidden.requires_grad,
                    grad_on and student_weight.requires_grad)


# --------------------------------------------------------------------------------------
# The epilogue head (backend="epilogue", module docstring)
# --------------------------------------------------------------------------------------

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def epilogue_fallback_reason(options, plan, has_teacher: bool) -> str | None:
    """Why backend="epilogue" cannot run this call (None: it can). plan: the call's HeadPlan
    (its matmul dtypes); the chunk of the backward's gradient block is decided there."""
    if not has_teacher:
        return "CE only (no teacher head) runs the chunked path"
    if options.divergence != "forward_kl":
        return (f"divergence {options.divergence!r}: the epilogue reduces the forward KL's "
                "statistics only")
    if plan.student_dtype not in SUPPORTED_DTYPES or plan.teacher_dtype != plan.student_dtype:
        return (f"matmul dtypes {plan.student_dtype} / {plan.teacher_dtype}: the epilogue runs "
                "bf16 or fp32 heads of one dtype")
    return None


def merge_statistics(partials: torch.Tensor, inv_t: float):
    """Per-row statistics from the kernel's [7, n_splits, N] partials (online-softmax merge):
    (m_s, log Z1, log ZsT, m_t, log Zt, KL(p || q), student label logit), each [N] fp32.

    Sums are rescaled to the row's global maxima; the cross term moves with both maxima
    (head_epilogue_triton.py). Splits that saw no valid column hold m = -1e30 and zero sums,
    which the rescaling turns into exact zeros (no inf is formed)."""
    m_s, sum_s1, sum_st, m_t, sum_tt, cross, s_label = partials.unbind(0)
    top_s, top_t = m_s.amax(0), m_t.amax(0)
    d_s, d_t = m_s - top_s, m_t - top_t
    z1 = (sum_s1 * d_s.exp()).sum(0)
    zs = (sum_st * (d_s * inv_t).exp()).sum(0)
    scale_t = (d_t * inv_t).exp()
    zt = (sum_tt * scale_t).sum(0)
    cross = (scale_t * (cross + sum_tt * (d_t - d_s) * inv_t)).sum(0)
    log_zt, log_zs = zt.log(), zs.log()
    kl = cross / zt - log_zt + log_zs
    return top_s, z1.log(), log_zs, top_t, log_zt, kl, s_label.sum(0)


def _row_losses(h_s, w_s, h_t, w_t, labels, options, plan):
    """(ce_sum, kd_sum, stats [5, N]) of the forward: the statistics kernel and the merge."""
    from engine.kernels.head_epilogue_triton import head_statistics

    inv_t = 1.0 / options.temperature
    partials = head_statistics(h_s, w_s, h_t, w_t, labels, valid_vocab=options.valid_vocab,
                               temperature=options.temperature)
    m_s, log_z1, log_zs, m_t, log_zt, kl, s_label = merge_statistics(partials, inv_t)
    valid = labels != options.ignore_index
    in_range = (labels >= 0) & (labels < options.valid_vocab)
    ce = torch.where(in_range, m_s + log_z1 - s_label, torch.nan)  # NaN: as the loss kernel
    ce_sum = torch.where(valid, ce, 0.0).sum()
    kd_scale = options.temperature**2 if options.t2_scale else 1.0
    kd_sum = torch.where(valid, kl, 0.0).sum() * kd_scale
    return ce_sum, kd_sum, torch.stack((m_s, log_z1, log_zs, m_t, log_zt))


def _gradients(ctx, grad_loss):
    """d hidden and d weight (as asked for) from one recompute of the logit tiles per chunk."""
    from engine.kernels.head_epilogue_triton import head_logit_grad

    h_s, w_s, h_t, w_t, labels, inv_norm, stats = ctx.saved_tensors
    options, plan = ctx.options, ctx.plan
    hs, ws = h_s.to(plan.student_dtype), w_s.to(plan.student_dtype)
    ht, wt = h_t.to(plan.teacher_dtype), w_t.to(plan.teacher_dtype)
    scale = (inv_norm.float() * grad_loss.float()).reshape(())
    kd_scale = options.temperature**2 if options.t2_scale else 1.0
    coefs = torch.stack((scale * ((1.0 - options.alpha) * kd_scale / options.temperature),
                         scale * options.alpha)).contiguous()
    n_tokens, vocab = hs.shape[0], ws.shape[0]
    chunk = head_chunk_tokens(n_tokens, vocab, False, hs.element_size(), hs.device,
                              ctx.requested_chunk)
    block = torch.empty(min(chunk, max(n_tokens, 1)), vocab, dtype=hs.dtype, device=hs.device)
    grad_h = torch.empty_like(h_s) if ctx.needs_input_grad[0] else None
    grad_w = (torch.zeros(w_s.shape, dtype=torch.float32, device=w_s.device)
              if ctx.needs_input_grad[1] else None)
    for start in range(0, n_tokens, chunk):
        g = block[: min(chunk, n_tokens - start)]
        head_logit_grad(hs, ws, ht, wt, labels, stats, coefs, g, start,
                        valid_vocab=options.valid_vocab, temperature=options.temperature,
                        ignore_index=options.ignore_index)
        if grad_h is not None:
            grad_h[start:start + g.shape[0]] = torch.mm(g, ws)
        if grad_w is not None:
            add_weight_grad(grad_w, g, hs[start:start + g.shape[0]])
    return grad_h, None if grad_w is None else grad_w.to(w_s.dtype)


class EpilogueHeadLoss(torch.autograd.Function):
    """Forward: statistics kernel + merge -> (loss, ce_sum, kd_sum); backward: one recompute
    of the logit tiles per chunk, gradients to the student's hidden states and weight only."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, labels, inv_norm, options, plan, requested_chunk):
        with torch.autocast(h_s.device.type, enabled=False):
            hs, ws = h_s.to(plan.student_dtype), w_s.to(plan.student_dtype)
            ht, wt = h_t.to(plan.teacher_dtype), w_t.to(plan.teacher_dtype)
            ce_sum, kd_sum, stats = _row_losses(hs, ws, ht, wt, labels, options, plan)
        loss = ((1.0 - options.alpha) * kd_sum + options.alpha * ce_sum) * inv_norm
        ctx.save_for_backward(h_s, w_s, h_t, w_t, labels, inv_norm, stats)
        ctx.options, ctx.plan, ctx.requested_chunk = options, plan, requested_chunk
        ctx.mark_non_differentiable(ce_sum, kd_sum)
        return loss, ce_sum, kd_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_ce, _grad_kd):
        with torch.autocast(grad_loss.device.type, enabled=False):
            grad_h, grad_w = _gradients(ctx, grad_loss)
        return grad_h, grad_w, None, None, None, None, None, None, None


def kd_head_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
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
    """`kd_loss(student_hidden @ student_weight.T, teacher_hidden @ teacher_weight.T, labels)`
    without ever forming either [tokens x vocab] logits tensor.

    student_hidden [..., Hs] and teacher_hidden [..., Ht] share labels' leading dims; the weights
    are [V, Hs] and [V, Ht] (no bias). Every keyword means what it means for kd_loss;
    chunk_tokens overrides the chunk rule of the module docstring. Returns (loss, stats) like
    kd_loss. Gradients flow to student_hidden and student_weight (in their own dtypes), never
    to the teacher. No host synchronisation on CUDA. backend="epilogue" (Triton; not the
    default until a GPU run shows it faster) runs the head that never writes logits
    (EpilogueHeadLoss) for the forward KL with bf16 / fp32 heads, and the chunked Triton
    path for any other call (epilogue_fallback_reason).
    """
    spec = LossSpec(alpha=alpha, temperature=temperature, divergence=divergence, beta=beta,
                    skew=skew, t2_scale=t2_scale, valid_vocab=valid_vocab,
                    ignore_index=ignore_index, backend=backend)
    return _head_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
                      spec, normalizer=normalizer, chunk_tokens=chunk_tokens)


def ce_head_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    valid_vocab: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    backend: str = "auto",
    chunk_tokens: int | None = None,
):
    """Summed token cross-entropy of `hidden @ weight.T` over the first `valid_vocab` columns,
    divided by `normalizer`, without forming the [tokens x vocab] logits: kd_head_loss with no
    teacher (alpha 1), for CE-only training and a model's own CE in evaluation. Returns
    (loss, stats) like kd_head_loss, with stats["kd_sum"] = 0.
    """
    spec = LossSpec(alpha=1.0, temperature=1.0, valid_vocab=valid_vocab,
                    ignore_index=ignore_index, backend=backend)
    return _head_loss(hidden, weight, None, None, labels, spec, normalizer=normalizer,
                      chunk_tokens=chunk_tokens)


def _head_loss(student_hidden, student_weight, teacher_hidden, teacher_weight, labels,
               spec: LossSpec, *, normalizer, chunk_tokens):
    """kd_head_loss and ce_head_loss (teacher None): check, plan, run the Function."""
    _check_head_inputs(student_hidden, student_weight, teacher_hidden, teacher_weight, labels)
    vocab = student_weight.shape[0]
    valid_vocab = vocab if spec.valid_vocab is None else int(spec.valid_vocab)
    if not 1 <= valid_vocab <= vocab:
        raise ValueError(f"valid_vocab={valid_vocab} must be in [1, {vocab}] (the weights' rows)")
    flat_labels = labels.reshape(-1)
    options, resolved, valid_count, inv_norm = prepare_loss(
        flat_labels, student_hidden.device, spec, valid_vocab=valid_vocab, normalizer=normalizer)
    plan = head_plan(student_hidden, student_weight, teacher_hidden, teacher_weight,
                     chunk_tokens)
    if teacher_hidden is not None:
        teacher_hidden = teacher_hidden.detach().reshape(-1, teacher_hidden.shape[-1])
        teacher_weight = teacher_weight.detach()
    if spec.backend == "epilogue" and epilogue_fallback_reason(
            options, plan, teacher_hidden is not None) is None:
        loss, ce_sum, kd_sum = EpilogueHeadLoss.apply(
            student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight,
            teacher_hidden, teacher_weight, flat_labels, inv_norm, options, plan, chunk_tokens)
        return loss, loss_stats(ce_sum, kd_sum, valid_count)
    chunks = functools.partial(_chunk_loop, h_t=teacher_hidden, w_t=teacher_weight,
                               labels=flat_labels, inv_norm=inv_norm, options=options,
                               backend=resolved, plan=plan)
    loss, ce_sum, kd_sum = HeadLossFunction.apply(
        student_hidden.reshape(-1, student_hidden.shape[-1]), student_weight, inv_norm,
        options.alpha, chunks)
    return loss, loss_stats(ce_sum, kd_sum, valid_count)


def kd_head_loss_reference(student_hidden, student_weight, teacher_hidden, teacher_weight,
                           labels, **kwargs):
    """The head matmuls followed by kd_loss_reference: the definition, float64-capable.

    Takes kd_head_loss's keywords except backend and chunk_tokens.
    """
    student_logits = student_hidden @ student_weight.t()
    teacher_logits = (teacher_hidden @ teacher_weight.t()).detach()
    return kd_loss_reference(student_logits, teacher_logits, labels, **kwargs)
