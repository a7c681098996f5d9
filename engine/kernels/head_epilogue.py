"""`kd_head_loss(..., backend="epilogue")`: the fused heads + loss with no logit written.

The forward runs one Triton matmul over both heads whose epilogue reduces every logit tile to
per-row statistics (engine/kernels/head_epilogue_triton.py), merges them per row here, and
returns the loss: no [tokens x vocab] tensor and no chunk block exists in the forward. The
backward recomputes the logit tiles once, chunk by chunk, writing d loss / d student logits
(with the incoming gradient folded in) into one [chunk x V] block, which two matmuls turn into
d hidden and d weight (fp32 accumulation across chunks, engine/kernels/head_rules.py). Unlike
the chunked path, the gradient is formed in the backward: under torch.no_grad nothing but the
statistics kernel runs, and a second backward through a retained graph simply runs it again.

Supported: the forward KL (the default divergence) with a teacher head, bf16 or fp32 matmuls
(fp16 and float64 are not). `epilogue_fallback_reason` names what is not; kd_head_loss then
runs the chunked path with the Triton loss kernel instead (docs/loss.md).
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from engine.kernels.head_rules import add_weight_grad, head_chunk_tokens

SUPPORTED_DTYPES = (torch.bfloat16, torch.float32)


def epilogue_fallback_reason(options, plan, has_teacher: bool) -> str | None:
    """Why backend="epilogue" cannot run this call (None: it can). plan: kd_head's HeadPlan
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
