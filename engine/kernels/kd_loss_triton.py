"""The fused divergence + cross-entropy Triton kernel and its launcher.

A persistent grid: each program takes rows (tokens) pid, pid + programs, ... and streams each
row's vocabulary two or three times:

  pass 1  per-lane online max / sum-exp of the student at T = 1 and at T (one running max per
          lane for both, since max(s / T) = max(s) / T for T > 0) and of the teacher at T; for
          reverse_kl also the online cross term E_q[log q - log p] (around a pivot, below)
          that its gradient needs. Every lane keeps its own maxima and sums; they are merged
          once per row, after the loop, so the loop has no cross-warp reduction at all;
  pass 2  (jsd, skew_*, tvd only) the divergence and c = sum_k q_k g_k from exact
          log-probabilities, because their c depends on the final normalisers nonlinearly;
  last    with c known (forward_kl: c = -1), it writes the gradient of the loss with respect to
          the student logits, dD/dz_j = q_j (g_j - c) / T, and for the two plain KLs
          accumulates the divergence itself from exact log-probabilities.

A lane's online step costs one exponential per running sum: with d = x - m (m the lane's
running max), exp(-|d|) is the new term when d <= 0 and the old sum's rescale when d > 0 (the
new term is then exp(0) = 1). Exponentials are exp2 with log2(e) / T folded into one constant,
so log-probabilities are carried in base 2 and the divergences scaled by ln 2 once per row.
Logits are shifted by their maximum before any scaling: (s - m) is a difference of raw
logits, exact where it matters, while s * log2(e) / T rounded first would cost ~0.004 absolute
at |logit| 1e4.

Successive passes alternate direction (forward, backward, forward): each pass starts on the
columns its predecessor read last, which are the likeliest still in L2. Computing the divergence
from exact log-probabilities rather than a running cross term avoids subtracting two large
log-sum-exps (|logit| up to 1e4) from a large expectation, which loses fp32 digits. Traffic
per element with bf16 logits: two reads of student and teacher plus one gradient write, ~10
bytes (forward_kl, reverse_kl); one more read of both, ~14 bytes, for the others.

In place (grad aliasing the student logits): every store of a row comes after a
`tl.debug_barrier()` (a CTA-wide bar.sync), and every load of the row's student logits that a
store could overwrite -- the label's logit s[label], loaded at the start of the row, and all
of pass 1 and pass 2 -- comes before it, so no warp can overwrite a column (the label's
included) that another warp has yet to read. Inside the last pass each thread stores exactly
the columns it has just loaded (one offsets tensor, one layout), so that pass needs nothing
more. Without the barrier, one warp could store the label's column before another warp had
loaded s[label] (forward_kl and reverse_kl have no reduction between that load and the first
store), giving that row a wrong cross-entropy.

reverse_kl's gradient q_j (log q_j - log p_j - KL(q || p)) subtracts numbers that can be ~4e4
apart from the teacher's own maximum at |logit| 1e4, where fp32 keeps ~0.004; so its teacher
term is measured from the teacher's logit at the student's argmax (the pivot; each lane
tracks its own, merged with the maxima), where the values that matter are small differences
of raw logits (engine/kernels/divergences.py).

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
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# The kernel's DIVERGENCE constexpr: the index in DIVERGENCES.
FORWARD_KL = tl.constexpr(0)
REVERSE_KL = tl.constexpr(1)
JSD = tl.constexpr(2)
SKEW_FORWARD_KL = tl.constexpr(3)
SKEW_REVERSE_KL = tl.constexpr(4)
TVD = tl.constexpr(5)


@triton.jit
def _online_sum(total, scale, rises):
    """A lane's running sum after one column: scale = exp(-|x - m|) at its temperature; when
    x raises the lane's max (rises) the old sum shrinks by it and x adds exp(0) = 1."""
    return tl.where(rises, total * scale + 1.0, total + scale)


@triton.jit
def _row_statistics(student_row, teacher_row, stream_cols, c_t, PIVOT: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr):
    """Pass 1, per lane: (m_s, m_t, sum_s1, sum_st, sum_tt, cross, pivot) over columns <
    stream_cols; `_merge_statistics` combines the lanes once per row.

    c_t = log2(e) / T. m_s, m_t are raw logits; sum_s1 = sum exp(s - m_s),
    sum_st = sum exp((s - m_s) / T), sum_tt = sum exp((t - m_t) / T). With PIVOT, pivot is the
    teacher's logit at the lane's argmax and cross = sum_k exp(a_k) (a_k - b_k) in base-2 units,
    a = (s - m_s) c_t and b = (t - pivot) c_t, rescaled whenever the lane's max moves.
    Dead columns enter as d = -1e30: exp2 of it is 0 and they never raise a max.
    """
    offsets = tl.arange(0, BLOCK_SIZE)
    m_s = tl.full((BLOCK_SIZE,), NEG_LARGE, tl.float32)
    m_t = tl.full((BLOCK_SIZE,), NEG_LARGE, tl.float32)
    sum_s1 = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_st = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_tt = tl.zeros((BLOCK_SIZE,), tl.float32)
    cross = tl.zeros((BLOCK_SIZE,), tl.float32)
    pivot = tl.zeros((BLOCK_SIZE,), tl.float32)
    for start in range(0, stream_cols, BLOCK_SIZE):
        cols = start + offsets
        live = cols < stream_cols
        s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
        t = tl.load(teacher_row + cols, mask=live, other=0.0).to(tl.float32)
        d_s = tl.where(live, s - m_s, NEG_LARGE)
        rises = d_s > 0.0
        e_1 = tl.exp2(-tl.abs(d_s) * LOG2E)
        e_t = tl.exp2(-tl.abs(d_s) * c_t)
        if PIVOT:
            step = d_s * c_t
            move = (t - pivot) * c_t
            cross = tl.where(rises, (cross + (move - step) * sum_st) * e_t,
                             cross + e_t * (step - move))
            pivot = tl.where(rises, t, pivot)
        sum_s1 = _online_sum(sum_s1, e_1, rises)
        sum_st = _online_sum(sum_st, e_t, rises)
        m_s = tl.where(rises, s, m_s)
        d_t = tl.where(live, t - m_t, NEG_LARGE)
        sum_tt = _online_sum(sum_tt, tl.exp2(-tl.abs(d_t) * c_t), d_t > 0.0)
        m_t = tl.maximum(m_t, tl.where(live, t, NEG_LARGE))
    return m_s, m_t, sum_s1, sum_st, sum_tt, cross, pivot


@triton.jit
def _merge_statistics(m_s, m_t, sum_s1, sum_st, sum_tt, cross, pivot, c_t,
                      PIVOT: tl.constexpr):
    """The row's (m_s, m_t, sum_s1, sum_st, sum_tt, cross, t_pivot) from the lanes' values:
    the only cross-warp reductions of pass 1. cross is returned in natural units.

    Lanes that saw no column hold m = -1e30 and zero sums, so their rescale is exp2(-huge) = 0.
    With PIVOT, the row's pivot is the teacher logit at the lanes holding the row max (their
    mean, on a tie: any fixed choice works, as long as the last pass uses the same one), and
    each lane's cross moves to it like `_rescaled_cross` moves a block's.
    """
    top_s = tl.max(m_s, axis=0)
    top_t = tl.max(m_t, axis=0)
    shift = (top_s - m_s) * c_t
    weight = tl.exp2(-shift)
    total_s1 = tl.sum(sum_s1 * tl.exp2((m_s - top_s) * LOG2E), axis=0)
    total_st = tl.sum(sum_st * weight, axis=0)
    total_tt = tl.sum(sum_tt * tl.exp2((m_t - top_t) * c_t), axis=0)
    t_pivot = tl.zeros((), tl.float32)
    total_cross = tl.zeros((), tl.float32)
    if PIVOT:
        at_top = m_s == top_s
        t_pivot = tl.sum(tl.where(at_top, pivot, 0.0), axis=0) / tl.sum(
            at_top.to(tl.float32), axis=0)
        moved = tl.where(sum_st > 0.0, (cross + ((t_pivot - pivot) * c_t - shift) * sum_st)
                         * weight, 0.0)
        total_cross = tl.sum(moved, axis=0) * LN2
    return top_s, top_t, total_s1, total_st, total_tt, total_cross, t_pivot


@triton.jit
def _log2_add_exp2(a, b):
    top = tl.maximum(a, b)
    return top + tl.log2(1.0 + tl.exp2(tl.minimum(a, b) - top))


@triton.jit
def _divergence_terms(lp, lq, ratio, w_p, w_q, lw_p, lw_q, DIVERGENCE: tl.constexpr):
    """Per column: (the divergence's summand, q_k g_k, q_k); see
    engine/kernels/divergences.py.

    lp, lq: log2 of p and q; lw_p, lw_q: log2 of the mixture weights. The summand is in base-2
    log units (the caller scales the row's sum by ln 2, TVD's by 1); q_g is natural. m =
    w_p p + w_q q as a log-add-exp of the weighted log-probabilities; ratios such as q / m are
    exp2 of differences of logs taken first. g may drop constants (c moves with them), as in
    the PyTorch path, where keeping them would leave fp32 rounding of their size in a small
    gradient. ratio: reverse_kl's log q - log p (natural) up to the row's pivot constant.
    """
    p = tl.exp2(lp)
    q = tl.exp2(lq)
    if DIVERGENCE == FORWARD_KL:
        value = p * (lp - lq)
        q_g = -p
    elif DIVERGENCE == REVERSE_KL:
        value = q * (lq - lp)
        q_g = q * ratio
    elif DIVERGENCE == TVD:
        value = 0.5 * tl.abs(p - q)
        q_g = tl.where(q > p, 0.5 * q, tl.where(q < p, -0.5 * q, 0.0))
    else:
        lm = _log2_add_exp2(lp + lw_p, lq + lw_q)
        d_q = lq - lm
        log_u = lw_q + d_q  # log2(w_q q / m) <= 0
        if DIVERGENCE == JSD:
            value = w_p * p * (lp - lm) + w_q * q * d_q
            q_g = w_q * q * (log_u * LN2)  # g = (1 - beta) ln(q / m), constant ln w_q dropped
        elif DIVERGENCE == SKEW_FORWARD_KL:
            value = p * (lp - lm)
            q_g = -p * tl.exp2(log_u)  # -(1 - skew) p q / m
        else:  # SKEW_REVERSE_KL: g = ln(q / m) - skew q / m (+ 1), constants dropped
            value = q * d_q
            q_g = q * (log_u * LN2 - (tl.exp2(log_u) - 1.0))
    return value, q_g, q


@triton.jit
def _value_scale(DIVERGENCE: tl.constexpr):
    """What turns a row's summed base-2 summands into the divergence (TVD has no logarithm)."""
    if DIVERGENCE == TVD:
        return 1.0
    return LN2


@triton.jit
def _load_row_block(student_row, teacher_row, cols, live, m_s, m_t):
    """Student and teacher logits of one block; dead lanes hold the row maxima (finite math)."""
    s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
    t = tl.load(teacher_row + cols, mask=live, other=0.0).to(tl.float32)
    return tl.where(live, s, m_s), tl.where(live, t, m_t)


@triton.jit
def _value_pass(student_row, teacher_row, stream_cols, m_s, m_t, log2_st, log2_tt, c_t,
                w_p, w_q, lw_p, lw_q, DIVERGENCE: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Pass 2, backwards: (divergence, c = sum_k q_k g_k) of the row."""
    offsets = tl.arange(0, BLOCK_SIZE)
    value_acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    q_g_acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    n_blocks = tl.cdiv(stream_cols, BLOCK_SIZE)
    for i in range(0, n_blocks):
        cols = (n_blocks - 1 - i) * BLOCK_SIZE + offsets
        live = cols < stream_cols
        s, t = _load_row_block(student_row, teacher_row, cols, live, m_s, m_t)
        lq = (s - m_s) * c_t - log2_st
        lp = (t - m_t) * c_t - log2_tt
        value, q_g, _ = _divergence_terms(lp, lq, lq, w_p, w_q, lw_p, lw_q,
                                          DIVERGENCE)  # no ratio: never reverse_kl here
        value_acc += tl.where(live, value, 0.0)
        q_g_acc += tl.where(live, q_g, 0.0)
    return tl.sum(value_acc, axis=0) * _value_scale(DIVERGENCE), tl.sum(q_g_acc, axis=0)


@triton.jit
def _gradient_pass(student_row, teacher_row, grad_row, n_cols, stream_cols, label, m_s, m_t,
                   t_pivot, log2_s1, log2_st, log2_tt, c_t, inv_t, c, kd_coef, ce_coef,
                   w_p, w_q, lw_p, lw_q, DIVERGENCE: tl.constexpr,
                   BACKWARDS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """Last pass: writes the gradient of every column (zeros where excluded; nothing without
    WRITE_GRAD, the forward-only variant) and returns the row's divergence summed from exact
    log-probabilities (used by the two-pass divergences). Each thread stores only the columns
    it has just loaded."""
    offsets = tl.arange(0, BLOCK_SIZE)
    value_acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    n_blocks = tl.cdiv(n_cols, BLOCK_SIZE)
    for i in range(0, n_blocks):
        block = n_blocks - 1 - i if BACKWARDS else i
        cols = block * BLOCK_SIZE + offsets
        live = cols < stream_cols  # stream_cols is 0 for ignored rows
        s, t = _load_row_block(student_row, teacher_row, cols, live, m_s, m_t)
        s_shift = s - m_s
        lq = s_shift * c_t - log2_st
        lp = (t - m_t) * c_t - log2_tt
        ratio = (s_shift - (t - t_pivot)) * inv_t
        value, q_g, q = _divergence_terms(lp, lq, ratio, w_p, w_q, lw_p, lw_q, DIVERGENCE)
        value_acc += tl.where(live, value, 0.0)
        if WRITE_GRAD:
            onehot = tl.where(cols == label, 1.0, 0.0)
            softmax = tl.exp2(s_shift * LOG2E - log2_s1)
            grad = kd_coef * (q_g - q * c) + ce_coef * (softmax - onehot)
            grad = tl.where(live, grad, 0.0)
            tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=cols < n_cols)
    return tl.sum(value_acc, axis=0) * _value_scale(DIVERGENCE)


@triton.jit
def _kd_row(row, student_ptr, teacher_ptr, grad_ptr, labels_ptr, ce_row_ptr, kd_row_ptr,
            row_scale, student_row_stride, teacher_row_stride, grad_row_stride, n_cols,
            valid_vocab, ignore_index, alpha, temperature, kd_scale, w_p, w_q, lw_p, lw_q,
            DIVERGENCE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One row: its CE and divergence into ce_row_ptr / kd_row_ptr, its gradient into grad."""
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    label_ok = (label >= 0) & (label < valid_vocab)
    # s[label] is read first: the barrier before the last pass orders it before every store.
    s_label = tl.load(student_row + tl.where(valid & label_ok, label, 0),
                      mask=valid & label_ok, other=0.0).to(tl.float32)
    inv_t = 1.0 / temperature
    c_t = LOG2E * inv_t
    stream_cols = tl.where(valid, valid_vocab, 0)  # ignored rows stream nothing

    m_s, m_t, sum_s1, sum_st, sum_tt, cross, pivot = _row_statistics(
        student_row, teacher_row, stream_cols, c_t, DIVERGENCE == REVERSE_KL, BLOCK_SIZE)
    m_s, m_t, sum_s1, sum_st, sum_tt, cross, t_pivot = _merge_statistics(
        m_s, m_t, sum_s1, sum_st, sum_tt, cross, pivot, c_t, DIVERGENCE == REVERSE_KL)
    # Neutral, finite values for ignored rows so the later passes compute nothing undefined.
    m_s = tl.where(valid, m_s, 0.0)
    m_t = tl.where(valid, m_t, 0.0)
    log2_s1 = tl.log2(tl.where(valid, sum_s1, 1.0))
    log2_st = tl.log2(tl.where(valid, sum_st, 1.0))
    log2_tt = tl.log2(tl.where(valid, sum_tt, 1.0))
    ce = m_s + log2_s1 * LN2 - s_label
    ce = tl.where(valid & (~label_ok), float("nan"), ce)

    row_scale = tl.where(valid, row_scale, 0.0)
    kd_coef = (1.0 - alpha) * kd_scale * inv_t * row_scale
    if DIVERGENCE == FORWARD_KL:
        c = tl.full((), -1.0, tl.float32)
    elif DIVERGENCE == REVERSE_KL:
        c = cross / tl.where(valid, sum_st, 1.0)  # E_q[log q - log p] + the pivot's constant
    else:
        value, c = _value_pass(student_row, teacher_row, stream_cols, m_s, m_t, log2_st,
                               log2_tt, c_t, w_p, w_q, lw_p, lw_q, DIVERGENCE, BLOCK_SIZE)
    if WRITE_GRAD:
        tl.debug_barrier()  # every warp's loads above before any warp's store below
    last_value = _gradient_pass(
        student_row, teacher_row, grad_ptr + row * grad_row_stride, n_cols, stream_cols, label,
        m_s, m_t, t_pivot, log2_s1, log2_st, log2_tt, c_t, inv_t, c, kd_coef,
        alpha * row_scale, w_p, w_q, lw_p, lw_q, DIVERGENCE,
        DIVERGENCE <= REVERSE_KL, WRITE_GRAD, BLOCK_SIZE)
    if DIVERGENCE <= REVERSE_KL:
        value = last_value
    tl.store(ce_row_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(kd_row_ptr + row, tl.where(valid, kd_scale * value, 0.0))


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
    n_rows,
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
    """Persistent: program pid handles rows pid, pid + programs, ...; log_w_p, log_w_q are the
    mixture weights' base-2 logarithms."""
    row_scale = tl.load(inv_norm_ptr).to(tl.float32)
    first = tl.program_id(0).to(tl.int64)  # int64 row offsets: N x V may exceed 2^31
    for row in range(first, n_rows, tl.num_programs(0)):
        _kd_row(row, student_ptr, teacher_ptr, grad_ptr, labels_ptr, ce_row_ptr,
                kd_row_ptr, row_scale, student_row_stride, teacher_row_stride, grad_row_stride,
                n_cols, valid_vocab, ignore_index, alpha, temperature, kd_scale, w_p, w_q,
                log_w_p, log_w_q, DIVERGENCE, WRITE_GRAD, BLOCK_SIZE)


def launch_config(vocab: int, divergence: str = "forward_kl") -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a row of `vocab` columns: 1024 columns x 8 warps, 4
    contiguous columns (one 8-byte bf16 load per tensor) per thread; tvd 512 x 8.

    The best shape for forward_kl in the H200 launch sweep (benchmarks/README.md). Each lane
    keeps 5-7 running values per column it owns, so 4 columns per thread also keeps the
    three-pass divergences (jsd, skew_*, tvd) within registers: with 8 columns per thread
    (1024 x 4 warps) skew_reverse_kl and tvd spilled (Triton 3.9, sm_80 / sm_90). tvd alone
    takes 512 columns (2 per thread): at 1024 its fp32 build spilled 4 bytes on sm_86 once
    compiled with the launch's real divisibility specialisation. tools/compile_kernels.py
    checks that none spills. Not yet timed on a GPU with per-lane statistics:
    `benchmarks/kd_loss.py --sweep` measures the alternatives.
    """
    if divergence == "tvd":
        return min(512, triton.next_power_of_2(max(vocab, 16))), 8
    return min(1024, triton.next_power_of_2(max(vocab, 16))), 8


# Warps a persistent grid keeps resident per SM: half of an H100's 64, ~32 KB of 16-byte
# loads in flight per SM (more than its share of HBM bandwidth x latency), while fewer rows in
# flight leave more of each row in L2 for its next pass.
WARPS_PER_SM = 32


def grid_size(n_rows: int, device: torch.device, num_warps: int) -> int:
    """Programs of the persistent grid: enough to fill every SM with WARPS_PER_SM warps, never
    more than the rows (a non-CUDA device, i.e. the interpreter: one program per row)."""
    if device.type != "cuda":
        return n_rows
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_rows, sms * max(1, WARPS_PER_SM // num_warps)))


def _log2_weight(weight: float) -> float:
    """log2 of a mixture weight; -1e30 for 0, so its term vanishes with no inf in the kernel."""
    return math.log2(weight) if weight > 0.0 else -1.0e30


def kd_loss_forward_triton(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    grad_out: torch.Tensor,
    options,
    *,
    inv_norm: torch.Tensor,
    block_size: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    programs: int | None = None,
):
    """Launch the kernel over every row; return (ce_sum, kd_sum) as 0-dim fp32 tensors.

    s, t: [N, V] with unit column stride; grad_out: [N, V] (may alias s; t may alias s for a
    CE-only caller), or None for the forward-only variant, which writes nothing. `options`:
    the loss as the kernels run it (engine.kernels.loss_spec.LossOptions; its divergence a
    kernel divergence). programs: the persistent grid's size (default `grid_size`). No host
    sync.
    """
    divergence, temperature = options.divergence, options.temperature
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
    num_warps = num_warps or default_warps
    w_p, w_q = mixture_weights(divergence, options.beta, options.skew)
    if n_rows > 0:
        grid = (min(n_rows, programs or grid_size(n_rows, s.device, num_warps)),)
        kd_loss_fwd_bwd_kernel[grid](
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
            n_rows,
            vocab,
            options.valid_vocab,
            int(options.ignore_index),
            float(options.alpha),
            float(temperature),
            float(temperature) ** 2 if options.t2_scale else 1.0,
            w_p,
            w_q,
            _log2_weight(w_p),
            _log2_weight(w_q),
            DIVERGENCE=DIVERGENCES.index(divergence),
            WRITE_GRAD=write_grad,
            BLOCK_SIZE=block_size or default_block,
            num_warps=num_warps,
            **({"num_stages": num_stages} if num_stages else {}),
        )
    return ce_rows.sum(), kd_rows.sum()
