"""The fused KL + cross-entropy Triton kernel and its launcher.

One program handles one row (token) and streams its vocabulary twice:

  pass 1  online max / sum-exp of the student at T = 1 and at T (sharing one running max, since
          max(s / T) = max(s) / T for T > 0) and of the teacher at T;
  pass 2  with the final log-normalisers known, it writes the gradient of the loss with respect
          to the student logits and accumulates KL(p_t || p_s) from exact log-probabilities.

Computing KL in pass 2 rather than from a running cross term avoids subtracting two large
log-sum-exps (|logit| up to 1e4) from a large expectation, which loses fp32 digits. Traffic per
element with bf16 logits: two reads of student and teacher plus one gradient write, ~10 bytes.

All math is fp32 whatever the input dtype; masked columns are loaded as 0 and replaced with a
large finite negative or excluded with `tl.where` before any `exp`, so no inf/NaN is ever formed
(except the deliberate NaN that flags an out-of-range label, see below). Row offsets are int64.

An out-of-range label (not ignore_index, outside [0, valid_vocab)) cannot raise here without a
host synchronisation, so that token's CE becomes NaN: the training loop stops on a non-finite
loss and the CPU path raises a ValueError naming the position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

NEG_LARGE = tl.constexpr(-1.0e30)


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
    BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    teacher_row = teacher_ptr + row * teacher_row_stride
    grad_row = grad_ptr + row * grad_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    inv_t = 1.0 / temperature
    offsets = tl.arange(0, BLOCK_SIZE)

    # Pass 1: online normalisers. Ignored rows stream nothing. The running maxima are scalars
    # (one cross-lane max per chunk), but the sums stay per lane and are reduced once after
    # the loop: three cross-warp reductions per chunk fewer, measured faster on an H200.
    stream_cols = tl.where(valid, valid_vocab, 0)
    m_s = tl.full((), NEG_LARGE, tl.float32)
    m_t = tl.full((), NEG_LARGE, tl.float32)
    sum_s1 = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_st = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_tt = tl.zeros((BLOCK_SIZE,), tl.float32)
    for start in range(0, stream_cols, BLOCK_SIZE):
        cols = start + offsets
        mask = cols < valid_vocab
        s = tl.load(student_row + cols, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(teacher_row + cols, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(mask, s, NEG_LARGE)
        t = tl.where(mask, t, NEG_LARGE)
        new_m_s = tl.maximum(m_s, tl.max(s, axis=0))
        new_m_t = tl.maximum(m_t, tl.max(t, axis=0))
        s_shift = s - new_m_s
        e_s1 = tl.where(mask, tl.exp(s_shift), 0.0)
        e_st = tl.where(mask, tl.exp(s_shift * inv_t), 0.0)
        e_tt = tl.where(mask, tl.exp((t - new_m_t) * inv_t), 0.0)
        sum_s1 = sum_s1 * tl.exp(m_s - new_m_s) + e_s1
        sum_st = sum_st * tl.exp((m_s - new_m_s) * inv_t) + e_st
        sum_tt = sum_tt * tl.exp((m_t - new_m_t) * inv_t) + e_tt
        m_s = new_m_s
        m_t = new_m_t
    # Neutral, finite values for ignored rows so pass 2 computes nothing undefined.
    m_s = tl.where(valid, m_s, 0.0)
    m_t = tl.where(valid, m_t, 0.0)
    log_sum_s1 = tl.log(tl.where(valid, tl.sum(sum_s1, axis=0), 1.0))
    log_sum_st = tl.log(tl.where(valid, tl.sum(sum_st, axis=0), 1.0))
    log_sum_tt = tl.log(tl.where(valid, tl.sum(sum_tt, axis=0), 1.0))

    label_ok = (label >= 0) & (label < valid_vocab)
    safe_label = tl.where(valid & label_ok, label, 0)
    s_label = tl.load(student_row + safe_label, mask=valid & label_ok, other=0.0).to(tl.float32)
    ce = m_s + log_sum_s1 - s_label
    ce = tl.where(valid & (~label_ok), float("nan"), ce)
    ce = tl.where(valid, ce, 0.0)

    inv_norm = tl.load(inv_norm_ptr).to(tl.float32)
    row_scale = tl.where(valid, inv_norm, 0.0)
    kd_coef = (1.0 - alpha) * temperature * row_scale
    ce_coef = alpha * row_scale

    # Pass 2: gradient (every column, zeros where excluded) and KL from exact log-probabilities.
    kl_acc = tl.zeros((BLOCK_SIZE,), tl.float32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offsets
        in_row = cols < n_cols
        live = cols < stream_cols  # stream_cols is 0 for ignored rows
        s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
        t = tl.load(teacher_row + cols, mask=live, other=0.0).to(tl.float32)
        s_shift = s - m_s
        log_ps_t = s_shift * inv_t - log_sum_st
        log_pt_t = (t - m_t) * inv_t - log_sum_tt
        ps_t = tl.exp(log_ps_t)
        pt_t = tl.exp(log_pt_t)
        ps_1 = tl.exp(s_shift - log_sum_s1)
        kl_acc += tl.where(live, pt_t * (log_pt_t - log_ps_t), 0.0)
        onehot = tl.where(cols == label, 1.0, 0.0)
        grad = kd_coef * (ps_t - pt_t) + ce_coef * (ps_1 - onehot)
        grad = tl.where(live, grad, 0.0)
        tl.store(grad_row + cols, grad.to(grad_ptr.dtype.element_ty), mask=in_row)
    kd = tl.where(valid, temperature * temperature * tl.sum(kl_acc, axis=0), 0.0)
    tl.store(ce_row_ptr + row, ce)
    tl.store(kd_row_ptr + row, kd)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps) for a row of `vocab` columns.

    Chosen by measurement (kernel_sweep in benchmarks/kd_loss.py, 4096 x 50304 bf16, H200,
    results in benchmarks/results/kd_loss_sweep_h200.json): blocks of 512-1024 columns with 4-8
    warps are within 5% of each other (0.96-1.05 ms); 2048 and 4096 columns are slower (up to
    3x with few warps), and num_stages changes nothing. Small blocks keep many rows resident
    per SM, which hides the latency of the per-chunk max reductions. tools/compile_kernels.py
    checks that this configuration does not spill.
    """
    block = min(1024, triton.next_power_of_2(max(vocab, 16)))
    return block, 4


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
    block_size: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
):
    """Launch the kernel over every row; return (ce_sum, kd_sum) as 0-dim fp32 tensors.

    s, t: [N, V] with unit column stride; grad_out: [N, V] (may alias s). No host sync.
    """
    n_rows, vocab = s.shape
    for name, tensor in (("student_logits", s), ("teacher_logits", t), ("grad", grad_out)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along the vocabulary")
    labels = labels.contiguous()
    ce_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    kd_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    inv_norm = inv_norm.reshape(1).to(device=s.device, dtype=torch.float32).contiguous()
    default_block, default_warps = launch_config(vocab)
    block_size = block_size or default_block
    num_warps = num_warps or default_warps
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
            BLOCK_SIZE=block_size,
            num_warps=num_warps,
            **({"num_stages": num_stages} if num_stages else {}),
        )
    return ce_rows.sum(), kd_rows.sum()
