"""The sparse-target distillation + cross-entropy Triton kernel and its launcher.

The loss is engine/kernels/sparse_kd_torch.py's (forward KL against SparseTargets: listed columns
with their masses, a tail bucket over the unlisted ones). One program handles one row:

  pass 1  streams the student's row once: online max / sum-exp at T = 1 and at T (one shared
          running max, as in engine/kernels/kd_loss_triton.py) and, over the *unlisted* columns
          only,
          a second online log-sum-exp at T with its own running max: log q_U exact, never
          1 - (sum of the listed q), which cancels when the listed columns hold nearly all
          the mass;
  listed  gathers the student's logits at the listed ids (K loads): the cross-entropy
          -sum w_i log q_i and W = sum w_i + r;
  pass 2  streams the row again writing the gradient of every unlisted column,
          W q_j - r q_j / q_U, plus the CE part; listed columns are skipped;
  listed  writes the listed columns' gradient, W q_i - w_i, plus the CE part.
Listed and unlisted columns never share an address, so the in-place variant (gradient over
the logits) reads each listed logit before anything writes it, and no barrier is needed.

Which columns of a block are listed: the listed ids of a row are ascending, so a pointer into
them only moves forward; at each column block the next BLOCK_SIZE ids are loaded, those
inside the block are counted into a histogram of the block's columns (a membership mask) and
the pointer moves past them. One pass over the K ids per pass over the row, whatever K.

Traffic per element with bf16 logits: two reads and one write, ~6 bytes (kd_loss reads the
teacher's row too: ~10); the K ids and masses are noise beside a 50k-column row. All math in
fp32; a listed id outside [0, valid_vocab) or a label out of range cannot raise here without a
host synchronisation, so that row's loss becomes NaN (the CPU path raises instead).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.kd_loss_triton import NEG_LARGE
from engine.kernels.kd_loss_triton import launch_config as kd_launch_config


@triton.jit
def _listed_in_block(ids_row, count, pointer, start, BLOCK_SIZE: tl.constexpr):
    """(mask of the listed columns among start .. start + BLOCK_SIZE - 1, moved pointer)."""
    entry = pointer + tl.arange(0, BLOCK_SIZE)
    in_count = entry < count
    ids = tl.load(ids_row + entry, mask=in_count, other=0).to(tl.int32)
    inside = in_count & (ids < start + BLOCK_SIZE)
    hits = tl.histogram(ids - start, BLOCK_SIZE, mask=inside)
    return hits > 0, pointer + tl.sum(inside.to(tl.int32), axis=0)


@triton.jit
def _row_statistics(student_row, ids_row, count, stream_cols, inv_t,
                    BLOCK_SIZE: tl.constexpr):
    """Pass 1: (m_s, sum_s1, sum_st, m_u, sum_u): the student's max and sums of exp at T = 1
    and T over every column < stream_cols, and max / sum of exp at T over the unlisted ones."""
    offsets = tl.arange(0, BLOCK_SIZE)
    m_s = tl.full((), NEG_LARGE, tl.float32)
    m_u = tl.full((), NEG_LARGE, tl.float32)
    sum_s1 = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_st = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_u = tl.zeros((BLOCK_SIZE,), tl.float32)
    pointer = tl.zeros((), tl.int32)
    for start in range(0, stream_cols, BLOCK_SIZE):
        cols = start + offsets
        live = cols < stream_cols
        s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
        s = tl.where(live, s, NEG_LARGE)
        listed, pointer = _listed_in_block(ids_row, count, pointer, start, BLOCK_SIZE)
        unlisted = live & (~listed)
        new_m_s = tl.maximum(m_s, tl.max(s, axis=0))
        new_m_u = tl.maximum(m_u, tl.max(tl.where(unlisted, s, NEG_LARGE), axis=0))
        sum_s1 = sum_s1 * tl.exp(m_s - new_m_s) + tl.where(live, tl.exp(s - new_m_s), 0.0)
        sum_st = sum_st * tl.exp((m_s - new_m_s) * inv_t) + tl.where(
            live, tl.exp((s - new_m_s) * inv_t), 0.0)
        sum_u = sum_u * tl.exp((m_u - new_m_u) * inv_t) + tl.exp(
            tl.where(unlisted, s - new_m_u, NEG_LARGE) * inv_t)
        m_s = new_m_s
        m_u = new_m_u
    return m_s, tl.sum(sum_s1, axis=0), tl.sum(sum_st, axis=0), m_u, tl.sum(sum_u, axis=0)


@triton.jit
def _listed_sums(student_row, ids_row, mass_row, count, valid_vocab, m_s, log_sum_st, inv_t,
                 BLOCK_SIZE: tl.constexpr):
    """(-sum w_i log q_i, sum w_i, listed ids outside [0, valid_vocab)) over the listed ids."""
    offsets = tl.arange(0, BLOCK_SIZE)
    cross = tl.zeros((BLOCK_SIZE,), tl.float32)
    total = tl.zeros((BLOCK_SIZE,), tl.float32)
    bad = tl.zeros((BLOCK_SIZE,), tl.int32)
    for start in range(0, count, BLOCK_SIZE):
        entry = start + offsets
        in_count = entry < count
        ids = tl.load(ids_row + entry, mask=in_count, other=0).to(tl.int32)
        ok = in_count & (ids >= 0) & (ids < valid_vocab)
        s = tl.load(student_row + ids, mask=ok, other=0.0).to(tl.float32)
        w = tl.exp(tl.load(mass_row + entry, mask=ok, other=0.0).to(tl.float32))
        log_q = (s - m_s) * inv_t - log_sum_st
        cross += tl.where(ok, -w * log_q, 0.0)
        total += tl.where(ok, w, 0.0)
        bad += tl.where(in_count & (~ok), 1, 0)
    return tl.sum(cross, axis=0), tl.sum(total, axis=0), tl.sum(bad, axis=0)


@triton.jit
def _unlisted_gradient_pass(student_row, grad_row, ids_row, count, n_cols, stream_cols, label,
                            m_s, log_sum_s1, log_sum_st, log_q_tail, tail_mass, total, inv_t,
                            kd_coef, ce_coef, BLOCK_SIZE: tl.constexpr):
    """Pass 2: the gradient of every column that is not listed (zeros where excluded)."""
    offsets = tl.arange(0, BLOCK_SIZE)
    pointer = tl.zeros((), tl.int32)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offsets
        live = cols < stream_cols  # stream_cols is 0 for ignored rows
        s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
        s_shift = tl.where(live, s, m_s) - m_s
        listed, pointer = _listed_in_block(ids_row, count, pointer, start, BLOCK_SIZE)
        log_q = s_shift * inv_t - log_sum_st
        tail_share = tl.where(tail_mass > 0.0, tail_mass * tl.exp(log_q - log_q_tail), 0.0)
        onehot = tl.where(cols == label, 1.0, 0.0)
        grad = kd_coef * (total * tl.exp(log_q) - tail_share) + ce_coef * (
            tl.exp(s_shift - log_sum_s1) - onehot)
        grad = tl.where(live, grad, 0.0)
        tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty),
                 mask=(cols < n_cols) & (~listed))


@triton.jit
def _listed_gradient(student_row, grad_row, ids_row, mass_row, count, valid_vocab, label, m_s,
                     log_sum_s1, log_sum_st, total, inv_t, kd_coef, ce_coef,
                     BLOCK_SIZE: tl.constexpr):
    """The gradient of the listed columns: W q_i - w_i, plus the CE part."""
    offsets = tl.arange(0, BLOCK_SIZE)
    for start in range(0, count, BLOCK_SIZE):
        entry = start + offsets
        ids = tl.load(ids_row + entry, mask=entry < count, other=0).to(tl.int32)
        ok = (entry < count) & (ids >= 0) & (ids < valid_vocab)
        s_shift = tl.load(student_row + ids, mask=ok, other=0.0).to(tl.float32) - m_s
        w = tl.exp(tl.load(mass_row + entry, mask=ok, other=0.0).to(tl.float32))
        onehot = tl.where(ids == label, 1.0, 0.0)
        grad = kd_coef * (total * tl.exp(s_shift * inv_t - log_sum_st) - w) + ce_coef * (
            tl.exp(s_shift - log_sum_s1) - onehot)
        tl.store(grad_row + ids, grad.to(grad_row.dtype.element_ty), mask=ok)


@triton.jit
def sparse_kd_fwd_bwd_kernel(
    student_ptr, grad_ptr, labels_ptr, ids_ptr, mass_ptr, count_ptr, tail_ptr, entropy_ptr,
    ce_row_ptr, kd_row_ptr, inv_norm_ptr,
    student_row_stride, grad_row_stride, ids_row_stride, mass_row_stride,
    n_cols, valid_vocab, ignore_index, alpha, temperature, kd_scale,
    WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    student_row = student_ptr + row * student_row_stride
    ids_row = ids_ptr + row * ids_row_stride
    mass_row = mass_ptr + row * mass_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    inv_t = 1.0 / temperature
    stream_cols = tl.where(valid, valid_vocab, 0)  # ignored rows stream nothing
    count = tl.where(valid, tl.load(count_ptr + row).to(tl.int32), 0)

    m_s, sum_s1, sum_st, m_u, sum_u = _row_statistics(student_row, ids_row, count,
                                                      stream_cols, inv_t, BLOCK_SIZE)
    m_s = tl.where(valid, m_s, 0.0)
    log_sum_s1 = tl.log(tl.where(valid, sum_s1, 1.0))
    log_sum_st = tl.log(tl.where(valid, sum_st, 1.0))
    cross, total, bad = _listed_sums(student_row, ids_row, mass_row, count, valid_vocab, m_s,
                                     log_sum_st, inv_t, BLOCK_SIZE)
    log_tail = tl.load(tail_ptr + row).to(tl.float32)
    tail_mass = tl.where(valid & (log_tail > NEG_LARGE), tl.exp(log_tail), 0.0)
    has_unlisted = sum_u > 0.0
    log_q_tail = tl.where(has_unlisted, (m_u - m_s) * inv_t - log_sum_st, 0.0) + tl.log(
        tl.where(has_unlisted, sum_u, 1.0))
    # A tail with no unlisted column to hold it is an infinite divergence (the CPU path
    # refuses such targets).
    cross += tl.where(tail_mass > 0.0,
                      tl.where(has_unlisted, -tail_mass * log_q_tail, float("inf")), 0.0)
    total += tail_mass
    kd = kd_scale * (cross - tl.load(entropy_ptr + row).to(tl.float32))
    kd = tl.where(bad > 0, float("nan"), kd)

    label_ok = (label >= 0) & (label < valid_vocab)
    s_label = tl.load(student_row + tl.where(valid & label_ok, label, 0),
                      mask=valid & label_ok, other=0.0).to(tl.float32)
    ce = tl.where(valid & (~label_ok), float("nan"), m_s + log_sum_s1 - s_label)
    tl.store(ce_row_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(kd_row_ptr + row, tl.where(valid, kd, 0.0))

    if WRITE_GRAD:
        row_scale = tl.where(valid, tl.load(inv_norm_ptr).to(tl.float32), 0.0)
        kd_coef = (1.0 - alpha) * kd_scale * inv_t * row_scale
        grad_row = grad_ptr + row * grad_row_stride
        _unlisted_gradient_pass(student_row, grad_row, ids_row, count, n_cols, stream_cols,
                                label, m_s, log_sum_s1, log_sum_st, log_q_tail, tail_mass,
                                total, inv_t, kd_coef, alpha * row_scale, BLOCK_SIZE)
        _listed_gradient(student_row, grad_row, ids_row, mass_row, count, valid_vocab, label,
                         m_s, log_sum_s1, log_sum_st, total, inv_t, kd_coef, alpha * row_scale,
                         BLOCK_SIZE)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps): kd_loss's forward_kl launch, which streams the same rows; not
    yet swept on a GPU for this kernel."""
    return kd_launch_config(vocab, "forward_kl")


def sparse_kd_forward_triton(s, targets, labels, grad_out, *, alpha, temperature, ignore_index,
                             valid_vocab, inv_norm, t2_scale=True):
    """Launch the kernel over every row; return (ce_sum, kd_sum) as 0-dim fp32 tensors.

    s: [N, V] with unit column stride; targets: flat SparseTargets of N positions; grad_out:
    [N, V] (may alias s) or None (forward only, nothing written). No host sync.
    """
    n_rows, vocab = s.shape
    write_grad = grad_out is not None
    grad_out = s if grad_out is None else grad_out  # a pointer the forward-only kernel ignores
    for name, tensor in (("student_logits", s), ("grad", grad_out), ("targets.ids", targets.ids),
                         ("targets.log_mass", targets.log_mass)):
        if tensor.stride(-1) != 1:
            raise ValueError(f"{name} must have unit stride along its last dimension")
    ce_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    kd_rows = torch.empty(n_rows, dtype=torch.float32, device=s.device)
    inv_norm = inv_norm.reshape(1).to(device=s.device, dtype=torch.float32).contiguous()
    block_size, num_warps = launch_config(vocab)
    if n_rows > 0:
        sparse_kd_fwd_bwd_kernel[(n_rows,)](
            s, grad_out, labels.contiguous(), targets.ids, targets.log_mass,
            targets.count.contiguous(), targets.log_tail.contiguous(),
            targets.entropy.contiguous(), ce_rows, kd_rows, inv_norm,
            s.stride(0), grad_out.stride(0), targets.ids.stride(0), targets.log_mass.stride(0),
            vocab, valid_vocab, int(ignore_index), float(alpha), float(temperature),
            float(temperature) ** 2 if t2_scale else 1.0,
            WRITE_GRAD=write_grad, BLOCK_SIZE=block_size, num_warps=num_warps,
        )
    return ce_rows.sum(), kd_rows.sum()
