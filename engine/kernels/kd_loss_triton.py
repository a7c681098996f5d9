"""The fused divergence + cross-entropy Triton kernel and its launcher.

One program handles one row (token) and streams its vocabulary two or three times:

  pass 1  online max / sum-exp of the student at T = 1 and at T (sharing one running max, since
          max(s / T) = max(s) / T for T > 0) and of the teacher at T; for reverse_kl also the
          online cross term E_q[log q - log p] (around a pivot, below) that its gradient needs;
  pass 2  (jsd, skew_*, tvd only) the divergence and c = sum_k q_k g_k from exact
          log-probabilities, because their c depends on the final normalisers nonlinearly;
  last    with c known (forward_kl: c = -1), it writes the gradient of the loss with respect to
          the student logits, dD/dz_j = q_j (g_j - c) / T, and for the two plain KLs
          accumulates the divergence itself from exact log-probabilities.

Successive passes alternate direction (forward, backward, forward): each pass starts on the
columns its predecessor read last, which are the likeliest still in L2. Computing the divergence
from exact log-probabilities rather than a running cross term avoids subtracting two large
log-sum-exps (|logit| up to 1e4) from a large expectation, which loses fp32 digits. Traffic
per element with bf16 logits: two reads of student and teacher plus one gradient write, ~10
bytes (forward_kl, reverse_kl); one more read of both, ~14 bytes, for the others.

reverse_kl's gradient q_j (log q_j - log p_j - KL(q || p)) subtracts numbers that can be ~4e4
apart from the teacher's own maximum at |logit| 1e4, where fp32 keeps ~0.004; so its teacher
term is measured from the teacher's logit at the student's running argmax (the pivot), where
the values that matter are small differences of raw logits (engine/kernels/divergence_blocks.py).

All math is fp32 whatever the input dtype; masked columns are loaded as 0 and replaced with a
large finite negative or the row maximum, or excluded with `tl.where`, before any `exp`; zero
mixture weights enter as a log weight of -1e30. Row offsets are int64. An out-of-range label
(not ignore_index, outside [0, valid_vocab)) cannot raise here without a host synchronisation,
so that token's CE becomes NaN: the training loop stops on a non-finite loss and the CPU path
raises a ValueError naming the position.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from engine.kernels.divergences import DIVERGENCES, mixture_weights

NEG_LARGE = tl.constexpr(-1.0e30)
# The kernel's DIVERGENCE constexpr: the index in DIVERGENCES.
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_FORWARD_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)


@triton.jit
def _row_statistics(student_row, teacher_row, stream_cols, valid_vocab, inv_t,
                    PIVOT: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Pass 1: (m_s, m_t, sum_s1, sum_st, sum_tt, cross, t_pivot) over columns < stream_cols.

    The running maxima are scalars (one cross-lane max per chunk), the sums stay per lane and
    are reduced once after the loop (fewer cross-warp reductions, measured faster on an H200).
    With PIVOT, cross = sum_k exp(a_k) (a_k - b_k) with a = (s - m_s) / T and
    b = (t - t_pivot) / T, rescaled like the sums whenever m_s or the pivot moves.
    """
    offsets = tl.arange(0, BLOCK_SIZE)
    m_s = tl.full((), NEG_LARGE, tl.float32)
    m_t = tl.full((), NEG_LARGE, tl.float32)
    t_pivot = tl.zeros((), tl.float32)
    sum_s1 = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_st = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_tt = tl.zeros((BLOCK_SIZE,), tl.float32)
    cross = tl.zeros((BLOCK_SIZE,), tl.float32)
    for start in range(0, stream_cols, BLOCK_SIZE):
        cols = start + offsets
        mask = cols < valid_vocab
        s = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(mask, s, NEG_LARGE)
        t = tl.where(mask, t, NEG_LARGE)
        block_max = tl.max(s, axis=0)
        new_m_s = tl.maximum(m_s, block_max)
        new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
        s_shift = s - new_m_s
        e_st = tl.where(mask, tl.exp(s_shift * inv_t), 0.0)
        if PIVOT:
            # The teacher's logit at the block's argmax, taken when the running max moves.
            at_max = tl.sum(tl.where(s == block_max, 1.0, 0.0), axis=0)
            t_at_max = tl.sum(tl.where(s == block_max, t, 0.0), axis=0) / at_max
            new_pivot = tl.where(block_max > m_s, t_at_max, t_pivot)
            cross = _rescaled_cross(cross, sum_st, (new_m_s - m_s) * inv_t,
                                    (new_pivot - t_pivot) * inv_t)
            ratio = (s_shift - (t - new_pivot)) * inv_t
            cross += tl.where(mask, e_st * ratio, 0.0)
            t_pivot = new_pivot
        sum_s1 = sum_s1 * tl.exp(m_s - new_m_s) + tl.where(mask, tl.exp(s_shift), 0.0)
        sum_st = sum_st * tl.exp((m_s - new_m_s) * inv_t) + e_st
        sum_tt = sum_tt * tl.exp((m_t - new_m_t) * inv_t) + tl.where(
            mask, tl.exp((t - new_m_t) * inv_t), 0.0)
        m_s = new_m_s
        m_t = new_m_t
    return m_s, m_t, tl.sum(sum_s1, axis=0), tl.sum(sum_st, axis=0), tl.sum(sum_tt, axis=0), \
        tl.sum(cross, axis=0), t_pivot


@triton.jit
def _rescaled_cross(cross, sum_st, d_s, d_pivot):
    """cross after the student max moves by d_s and the pivot by d_pivot (both already / T).

    Each old term's a - b becomes a - b - d_s + d_pivot, and its weight exp(a) shrinks by
    exp(-d_s). Lanes with no mass yet are left at 0 (their d_s may be ~1e30, from NEG_LARGE).
    """
    moved = tl.where(sum_st > 0.0, cross + (d_pivot - d_s) * sum_st, 0.0)
    return moved * tl.exp(-d_s)


@triton.jit
def _log_add_exp(a, b):
    top = tl.maximum(a, b)
    return top + tl.log(1.0 + tl.exp(tl.minimum(a, b) - top))


@triton.jit
def _divergence_terms(log_p, log_q, ratio, w_p, w_q, log_w_p, log_w_q,
                      DIVERGENCE: tl.constexpr):
    """Per column: (the divergence's summand, q_k g_k, q_k); see
    engine/kernels/divergence_blocks.py.

    m = w_p p + w_q q as a log-add-exp of the weighted log-probabilities; ratios such as q / m
    are exp of differences of logs taken first. g may drop constants (c moves with them), as
    in the PyTorch path, where keeping them would leave fp32 rounding of their size in a small
    gradient. ratio: reverse_kl's log q - log p up to the row's pivot constant.
    """
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    if DIVERGENCE == FORWARD_KL:
        value = p * (log_p - log_q)
        q_g = -p
    elif DIVERGENCE == REVERSE_KL:
        value = q * (log_q - log_p)
        q_g = q * ratio
    elif DIVERGENCE == TVD:
        value = 0.5 * tl.abs(p - q)
        q_g = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))
    else:
        log_m = _log_add_exp(log_p + log_w_p, log_q + log_w_q)
        d_q = log_q - log_m
        log_u = log_w_q + d_q  # log(w_q q / m) <= 0
        if DIVERGENCE == JSD:
            value = w_p * p * (log_p - log_m) + w_q * q * d_q
            q_g = w_q * q * log_u  # g = (1 - beta) log(q / m), constant log w_q dropped
        elif DIVERGENCE == SKEW_FORWARD_KL:
            value = p * (log_p - log_m)
            q_g = -p * tl.exp(log_u)  # -(1 - skew) p q / m
        else:  # SKEW_REVERSE_KL: g = log(q / m) - skew q / m (+ 1), constants dropped
            value = q * d_q
            q_g = q * (log_u - (tl.exp(log_u) - 1.0))
    return value, q_g, q


@triton.jit
def _load_row_block(student_row, teacher_row, cols, live, m_s, m_t):
    """Student and teacher logits of one block; dead lanes hold the row maxima (finite math)."""
    s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
    t = tl.load(teacher_row + cols, mask=live, other=0.0).to(tl.float32)
    return tl.where(live, s, m_s), tl.where(live, t, m_t)


@triton.jit
def _value_pass(student_row, teacher_row, stream_cols, m_s, m_t, log_sum_st, log_sum_tt,
                inv_t, w_p, w_q, log_w_p, log_w_q, DIVERGENCE: tl.constexpr,
                BLOCK_SIZE: tl.constexpr):
    """Pass 2, backwards: (divergence, c = sum_k q_k g_k) of the row."""
    offsets = tl.arange(0, BLOCK_SIZE)
    value_acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    q_g_acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    n_blocks = tl.cdiv(stream_cols, BLOCK_SIZE)
    for i in range(0, n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_SIZE + offsets
        live = cols < stream_cols
        s, t = _load_row_block(student_row, teacher_row, cols, live, m_s, m_t)
        log_q = (s - m_s) * inv_t - log_sum_st
        log_p = (t - m_t) * inv_t - log_sum_tt
        value, q_g, _ = _divergence_terms(log_p, log_q, log_q, w_p, w_q, log_w_p, log_w_q,
                                          DIVERGENCE)  # no ratio: never reverse_kl here
        value_acc += tl.where(live, value, 0.0)
        q_g_acc += tl.where(live, q_g, 0.0)
    return tl.sum(value_acc, axis=0), tl.sum(q_g_acc, axis=0)


@triton.jit
def _gradient_pass(student_row, teacher_row, grad_row, n_cols, stream_cols, label, m_s, m_t,
                   t_pivot, log_sum_s1, log_sum_st, log_sum_tt, inv_t, c, kd_coef, ce_coef,
                   w_p, w_q, log_w_p, log_w_q, DIVERGENCE: tl.constexpr,
                   BACKWARDS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Last pass: writes the gradient of every column (zeros where excluded; nothing without
    WRITE_GRAD, the forward-only variant) and returns the row's divergence summed from exact
    log-probabilities (used by the two-pass divergences)."""
    offsets = tl.arange(0, BLOCK_SIZE)
    value_acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    n_blocks = tl.cdiv(n_cols, BLOCK_SIZE)
    for i in range(0, n_blocks):
        block = n_blocks - 1 - i if BACKWARDS else i
        cols = block * BLOCK_SIZE + offsets
        live = cols < stream_cols  # stream_cols is 0 for ignored rows
        s, t = _load_row_block(student_row, teacher_row, cols, live, m_s, m_t)
        s_shift = s - m_s
        log_q = s_shift * inv_t - log_sum_st
        log_p = (t - m_t) * inv_t - log_sum_tt
        ratio = (s_shift - (t - t_pivot)) * inv_t
        value, q_g, q = _divergence_terms(log_p, log_q, ratio, w_p, w_q, log_w_p, log_w_q,
                                          DIVERGENCE)
        value_acc += tl.where(live, value, 0.0)
        if WRITE_GRAD:
            onehot = tl.where(cols == label, 1.0, 0.0)
            grad = kd_coef * (q_g - q * c) + ce_coef * (tl.exp(s_shift - log_sum_s1) - onehot)
            grad = tl.where(live, grad, 0.0)
            tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=cols < n_cols)
    return tl.sum(value_acc, axis=0)


@triton.jit
def kd_loss_fwd_bwd_kernel(
    student_ptr,
    teacher_ptr,
    grad_ptr,
    labels_ptr,
    ce_row_ptr,
    kd_row_ptr,
    inv_norm_ptr,
    student_row_stride,
    teacher_row_stride,
    grad_row_stride,
    n_cols,
    valid_vocab,
    ignore_index,
    alpha,
    temperature,
    kd_scale,
    w_p,
    w_q,
    log_w_p,
    log_w_q,
    DIVERGENCE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    inv_t = 1.0 / temperature
    stream_cols = tl.where(valid, valid_vocab, 0)  # ignored rows stream nothing

    m_s, m_t, sum_s1, sum_st, sum_tt, cross, t_pivot = _row_statistics(
        student_row, teacher_row, stream_cols, valid_vocab, inv_t,
        DIVERGENCE == REVERSE_KL, BLOCK_SIZE)
    # Neutral, finite values for ignored rows so the later passes compute nothing undefined.
    m_s = tl.where(valid, m_s, 0.0)
    m_t = tl.where(valid, m_t, 0.0)
    log_sum_s1 = tl.log(tl.where(valid, sum_s1, 1.0))
    log_sum_st = tl.log(tl.where(valid, sum_st, 1.0))
    log_sum_tt = tl.log(tl.where(valid, sum_tt, 1.0))

    label_ok = (label >= 0) & (label < valid_vocab)
    safe_label = tl.where(valid & label_ok, label, 0)
    s_label = tl.load(student_row + safe_label, mask=valid & label_ok, other=0.0).to(tl.float32)
    ce = m_s + log_sum_s1 - s_label
    ce = tl.where(valid & (~label_ok), float("nan"), ce)
    ce = tl.where(valid, ce, 0.0)

    row_scale = tl.where(valid, tl.load(inv_norm_ptr).to(tl.float32), 0.0)
    kd_coef = (1.0 - alpha) * kd_scale * inv_t * row_scale
    if DIVERGENCE == FORWARD_KL:
        c = tl.full((), -1.0, tl.float32)
    elif DIVERGENCE == REVERSE_KL:
        c = cross / tl.where(valid, sum_st, 1.0)  # E_q[log q - log p] + the pivot's constant
    else:
        value, c = _value_pass(student_row, teacher_row, stream_cols, m_s, m_t, log_sum_st,
                               log_sum_tt, inv_t, w_p, w_q, log_w_p, log_w_q, DIVERGENCE,
                               BLOCK_SIZE)
    last_value = _gradient_pass(
        student_row, teacher_row, grad_ptr + row * grad_row_stride, n_cols, stream_cols, label,
        m_s, m_t, t_pivot, log_sum_s1, log_sum_st, log_sum_tt, inv_t, c, kd_coef,
        alpha * row_scale, w_p, w_q, log_w_p, log_w_q, DIVERGENCE,
        DIVERGENCE <= REVERSE_KL, WRITE_GRAD, BLOCK_SIZE)
    if DIVERGENCE <= REVERSE_KL:
        value = last_value
    tl.store(ce_row_ptr + row, ce)
    tl.store(kd_row_ptr + row, tl.where(valid, kd_scale * value, 0.0))


def launch_config(vocab: int, divergence: str = "forward_kl") -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a row of `vocab` columns.

    Chosen by measurement (kernel_sweep in benchmarks/kd_loss.py, 4096 x 50304 bf16, H200,
    results in benchmarks/results/kd_loss_sweep_h200.json): blocks of 512-1024 columns with 4-8
    warps are within 5% of each other (0.96-1.05 ms); 2048 and 4096 columns are slower (up to
    3x with few warps), and num_stages changes nothing. Small blocks keep many rows resident
    per SM, which hides the latency of the per-chunk max reductions. The three-pass
    divergences (jsd, skew_*, tvd) hold more values per column and spilled a few bytes with
    1024 x 4 warps (Triton 3.9, sm_80 / sm_90) and with 1024 x 8 (Triton 3.6, sm_80), so they
    use 512 columns x 8 warps: inside the measured band, 2 columns per thread, and fewer rows
    resident per SM than with 4 warps, which keeps more of each row in L2 for its next pass
    (not yet timed on a GPU). tools/compile_kernels.py checks that no configuration spills.
    """
    if divergence not in ("forward_kl", "reverse_kl"):
        return min(512, triton.next_power_of_2(max(vocab, 16))), 8
    return min(1024, triton.next_power_of_2(max(vocab, 16))), 4


def _log_weight(weight: float) -> float:
    """log of a mixture weight; -1e30 for 0, so its term vanishes with no inf in the kernel."""
    return math.log(weight) if weight > 0.0 else -1.0e30


def kd_loss_forward_triton(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    alpha: float,
    temperature: float,
    ignore_index: int,
    valid_vocab: int,
    inv_norm: torch.Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    t2_scale: bool = True,
    block_size: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Launch the kernel over every row; return (ce_sum, kd_sum) as 0-dim fp32 tensors.

    s, t: [N, V] with unit column stride; grad_out: [N, V] (may alias s; t may alias s for a
    CE-only caller), or None for the forward-only variant, which writes nothing. `divergence`
    must be a kernel divergence (engine.kernels.divergences.kernel_divergence). No host sync.
    """
    n_rows, vocab = s.shape
    write_grad = grad_out is not None
    grad_out = s if grad_out is None else grad_out  # a pointer the forward-only kernel ignores
    for name, tensor in (("student_logits", s), ("teacher_logits", t), ("grad", grad_out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the vocabulary")
    labels = labels.contiguous()
    ce_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    kd_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    inv_norm = inv_norm.reshape(1).to(device=s.device, dtype=torch.float32).contiguous()
    default_block, default_warps = launch_config(vocab, divergence)
    w_p, w_q = mixture_weights(divergence, beta, skew)
    if n_rows > 0:
        kd_loss_fwd_bwd_kernel[(n_rows,)](
            s,
            t,
            grad_out,
            labels,
            ce_rows,
            kd_rows,
            inv_norm,
            s.stride(0),
            t.stride(0),
            grad_out.stride(0),
            vocab,
            valid_vocab,
            int(ignore_index),
            float(alpha),
            float(temperature),
            float(temperature) ** 2 if t2_scale else 1.0,
            w_p,
            w_q,
            _log_weight(w_p),
            _log_weight(w_q),
            DIVERGENCE=DIVERGENCES.index(divergence),
            WRITE_GRAD=write_grad,
            BLOCK_SIZE=block_size or default_block,
            num_warps=num_warps or default_warps,
            **({"num_stages": num_stages} if num_stages else {}),
        )
    return ce_rows.sum(), kd_rows.sum()
