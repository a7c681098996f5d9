"""The sparse-target distillation + cross-entropy Triton kernel and its launcher.

The loss is engine/kernels/sparse_kd_torch.py's (forward KL against SparseTargets: listed columns
with their masses, a tail bucket over the unlisted ones). A persistent grid like kd_loss's
(engine/kernels/kd_loss_triton.py); per row:

  pass 1  streams the student's row once: per-lane online max / sum-exp at T = 1 and at T
          (one running max per lane, merged once per row), two exponentials per column and
          nothing else: no column needs to know whether it is listed;
  listed  gathers the student's logits at the K listed ids: the cross-entropy
          -sum w_i log q_i, W = sum w_i + r, and the listed share of the student's mass at T,
          L / S (L = sum of the listed exp, S the row's); the logits are also saved in a
          [N, K] fp32 scratch for the last step;
  tail    log q_U of the unlisted columns: log(1 - L / S) while the share is at most
          EXACT_TAIL_ABOVE; above it (the listed columns hold nearly all the student's
          mass, and 1 - L / S would cancel) and only where the target has a tail, an exact
          log-sum-exp over the unlisted columns, in one more pass over the row that finds
          the listed columns of each block by walking the ascending ids;
  pass 2  after a barrier, streams the row again writing every column's gradient by the
          unlisted formula, W q_j - r q_j / q_U, plus the CE part;
  listed  after a second barrier, overwrites the listed columns with theirs, W q_i - w_i plus
          the CE part, from the saved logits.

No column block needs a membership mask except in the rare exact-tail pass, so the loops are
the dense kernel's: streaming loads, exponentials, per-lane sums. A mask for every block
would take a 1024-bin tl.histogram (ballots, popcounts, shared-memory atomics and barriers
per element).

In place (gradient over the logits): the first barrier orders every read of the row (pass 1,
the gathers, s[label], the exact pass) before pass 2's stores; the second orders pass 2's
stores to the listed columns before the listed step's stores to the same addresses, whose
values come from the scratch, not from the overwritten logits.

Why 1 - L / S is safe up to EXACT_TAIL_ABOVE = 0.9: S and L are fp32 sums whose rounding
differs by a few 1e-7 relative, so q_U = 1 - L / S carries ~3e-7 L / (S - L) relative error,
at most ~3e-6 at a share of 0.9, well inside the 1e-5 the loss is held to; the exact pass
costs one more read of the row (2 of ~6 bytes per column).

Listed ids must be unique and ascending (the CPU path refuses others; the teacher cache
writes them so): an id that is not greater than its predecessor, or outside [0, valid_vocab),
makes the row's KD NaN here (a host check would synchronise), never a silently double-counted
column. Traffic per element with bf16 logits: two reads and one write, ~6 bytes (kd_loss reads
the teacher's row too: ~10); the K ids, masses and scratch are noise beside a 50k-column row.
All math in fp32; a label out of range makes the row's CE NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.kd_loss_triton import LN2, LOG2E, NEG_LARGE, _online_sum, grid_size
from engine.kernels.kd_loss_triton import launch_config as kd_launch_config

EXACT_TAIL_ABOVE = tl.constexpr(0.9)
NO_ID = tl.constexpr(2147483647)  # past every column: the walk over the ids has ended


@triton.jit
def _merged_log_sum(m, total, c):
    """(row max, sum of exp((x - max) c / log2 e)) from per-lane maxima and sums at c."""
    top = tl.max(m, axis=0)
    return top, tl.sum(total * tl.exp2((m - top) * c), axis=0)


@triton.jit
def _student_statistics(student_row, stream_cols, c_t, BLOCK_SIZE: tl.constexpr):
    """Pass 1: (m_s, sum_s1, sum_st), the row's max and sums of exp at T = 1 and at T over
    the columns < stream_cols, from per-lane online sums merged once."""
    offsets = tl.arange(0, BLOCK_SIZE)
    m_s = tl.full((BLOCK_SIZE,), NEG_LARGE, tl.float32)
    sum_s1 = tl.zeros((BLOCK_SIZE,), tl.float32)
    sum_st = tl.zeros((BLOCK_SIZE,), tl.float32)
    for start in range(0, stream_cols, BLOCK_SIZE):
        cols = start + offsets
        live = cols < stream_cols
        s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
        d_s = tl.where(live, s - m_s, NEG_LARGE)
        rises = d_s > 0.0
        sum_s1 = _online_sum(sum_s1, tl.exp2(-tl.abs(d_s) * LOG2E), rises)
        sum_st = _online_sum(sum_st, tl.exp2(-tl.abs(d_s) * c_t), rises)
        m_s = tl.where(rises, s, m_s)
    top, total_1 = _merged_log_sum(m_s, sum_s1, LOG2E)
    _, total_t = _merged_log_sum(m_s, sum_st, c_t)
    return top, total_1, total_t


@triton.jit
def _listed_entries(ids_row, mass_row, entry, count, valid_vocab):
    """(ids, masses, usable) of a block of entries: usable = listed, inside [0, valid_vocab)
    and greater than the previous entry's id (so a duplicate is never counted twice)."""
    in_count = entry < count
    ids = tl.load(ids_row + entry, mask=in_count, other=0).to(tl.int32)
    before = tl.load(ids_row + entry - 1, mask=in_count & (entry > 0), other=-1).to(tl.int32)
    ok = in_count & (ids >= 0) & (ids < valid_vocab) & (ids > before)
    mass = tl.exp(tl.load(mass_row + entry, mask=ok, other=0.0).to(tl.float32))
    return ids, tl.where(ok, mass, 0.0), ok, in_count


@triton.jit
def _listed_sums(student_row, ids_row, mass_row, saved_row, count, valid_vocab, m_s, log2_st,
                 c_t, SAVE: tl.constexpr, LIST_BLOCK: tl.constexpr):
    """(-sum w_i log q_i, sum w_i, sum exp((s_i - m_s) / T), unusable entries) over the
    listed ids; with SAVE, each gathered logit is kept in saved_row for the listed step."""
    offsets = tl.arange(0, LIST_BLOCK)
    cross = tl.zeros((LIST_BLOCK,), tl.float32)
    total = tl.zeros((LIST_BLOCK,), tl.float32)
    listed_sum = tl.zeros((LIST_BLOCK,), tl.float32)
    bad = tl.zeros((LIST_BLOCK,), tl.int32)
    for start in range(0, count, LIST_BLOCK):
        entry = start + offsets
        ids, w, ok, in_count = _listed_entries(ids_row, mass_row, entry, count, valid_vocab)
        s = tl.load(student_row + ids, mask=ok, other=0.0).to(tl.float32)
        if SAVE:
            tl.store(saved_row + entry, s, mask=ok)
        shifted = (s - m_s) * c_t
        cross += tl.where(ok, -w * (shifted - log2_st) * LN2, 0.0)
        total += w
        listed_sum += tl.where(ok, tl.exp2(shifted), 0.0)
        bad += tl.where(in_count & (~ok), 1, 0)
    return tl.sum(cross, axis=0), tl.sum(total, axis=0), tl.sum(listed_sum, axis=0), \
        tl.sum(bad, axis=0)


@triton.jit
def _unlisted_log_sum(student_row, ids_row, count, stream_cols, c_t,
                      BLOCK_SIZE: tl.constexpr):
    """The exact-tail pass: (max, sum of exp((s - max) / T)) over the unlisted columns.

    The ids are ascending, so the walk keeps the next listed id and, per block, marks the
    ids below the block's end one by one (on average K / blocks of them: ~1 at K = 64 over a
    50k row), with no shared memory and no barrier."""
    offsets = tl.arange(0, BLOCK_SIZE)
    m_u = tl.full((BLOCK_SIZE,), NEG_LARGE, tl.float32)
    sum_u = tl.zeros((BLOCK_SIZE,), tl.float32)
    entry = tl.zeros((), tl.int32)
    next_id = tl.load(ids_row, mask=count > 0, other=NO_ID).to(tl.int32)
    for start in range(0, stream_cols, BLOCK_SIZE):
        cols = start + offsets
        listed = cols < 0
        while next_id < start + BLOCK_SIZE:
            listed = listed | (cols == next_id)
            entry += 1
            next_id = tl.load(ids_row + entry, mask=entry < count, other=NO_ID).to(tl.int32)
        unlisted = (cols < stream_cols) & (~listed)
        s = tl.load(student_row + cols, mask=unlisted, other=0.0).to(tl.float32)
        d_u = tl.where(unlisted, s - m_u, NEG_LARGE)
        rises = d_u > 0.0
        sum_u = _online_sum(sum_u, tl.exp2(-tl.abs(d_u) * c_t), rises)
        m_u = tl.where(rises, s, m_u)
    return _merged_log_sum(m_u, sum_u, c_t)


@triton.jit
def _log2_q_tail(student_row, ids_row, count, stream_cols, m_s, sum_st, listed_sum, needed,
                 c_t, BLOCK_SIZE: tl.constexpr):
    """(log2 q_U, whether any unlisted column holds mass) for a row whose target has a tail
    (needed); see the module docstring for when the exact pass runs."""
    share = listed_sum / sum_st
    log2_q_tail = tl.log2(tl.maximum(1.0 - share, 1.0 - EXACT_TAIL_ABOVE))
    has_unlisted = count < stream_cols
    if needed & (share > EXACT_TAIL_ABOVE):
        m_u, sum_u = _unlisted_log_sum(student_row, ids_row, count, stream_cols, c_t,
                                       BLOCK_SIZE)
        has_unlisted = sum_u > 0.0
        log2_q_tail = (m_u - m_s) * c_t + tl.log2(tl.where(has_unlisted, sum_u, 1.0)) \
            - tl.log2(sum_st)
    return log2_q_tail, has_unlisted


@triton.jit
def _gradient_pass(student_row, grad_row, n_cols, stream_cols, label, m_s, log2_s1, log2_st,
                   log2_q_tail, tail_mass, total, c_t, kd_coef, ce_coef,
                   BLOCK_SIZE: tl.constexpr):
    """Pass 2: every column's gradient by the unlisted formula (zeros where excluded); the
    listed step then overwrites the listed columns. The tail share r q_j / q_U is formed from
    log q_j - log q_U, at most 0 for an unlisted column (clamped, so a listed column's
    transient value stays finite)."""
    offsets = tl.arange(0, BLOCK_SIZE)
    for start in range(0, n_cols, BLOCK_SIZE):
        cols = start + offsets
        live = cols < stream_cols  # stream_cols is 0 for ignored rows
        s = tl.load(student_row + cols, mask=live, other=0.0).to(tl.float32)
        s_shift = tl.where(live, s, m_s) - m_s
        log2_q = s_shift * c_t - log2_st
        tail_share = tail_mass * tl.exp2(tl.minimum(log2_q - log2_q_tail, 1.0))
        onehot = tl.where(cols == label, 1.0, 0.0)
        grad = kd_coef * (total * tl.exp2(log2_q) - tail_share) + ce_coef * (
            tl.exp2(s_shift * LOG2E - log2_s1) - onehot)
        grad = tl.where(live, grad, 0.0)
        tl.store(grad_row + cols, grad.to(grad_row.dtype.element_ty), mask=cols < n_cols)


@triton.jit
def _listed_gradient(grad_row, ids_row, mass_row, saved_row, count, valid_vocab, label, m_s,
                     log2_s1, log2_st, total, c_t, kd_coef, ce_coef,
                     LIST_BLOCK: tl.constexpr):
    """The listed columns' gradient, W q_i - w_i plus the CE part, from the saved logits."""
    offsets = tl.arange(0, LIST_BLOCK)
    for start in range(0, count, LIST_BLOCK):
        entry = start + offsets
        ids, w, ok, _ = _listed_entries(ids_row, mass_row, entry, count, valid_vocab)
        s_shift = tl.load(saved_row + entry, mask=ok, other=0.0) - m_s
        onehot = tl.where(ids == label, 1.0, 0.0)
        grad = kd_coef * (total * tl.exp2(s_shift * c_t - log2_st) - w) + ce_coef * (
            tl.exp2(s_shift * LOG2E - log2_s1) - onehot)
        tl.store(grad_row + ids, grad.to(grad_row.dtype.element_ty), mask=ok)


@triton.jit
def _sparse_row(row, student_ptr, grad_ptr, labels_ptr, ids_ptr, mass_ptr, count_ptr,
                tail_ptr, entropy_ptr, saved_ptr, ce_row_ptr, kd_row_ptr, row_scale,
                student_row_stride, grad_row_stride, ids_row_stride, mass_row_stride,
                saved_row_stride, n_cols, valid_vocab, ignore_index, alpha, temperature,
                kd_scale, WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                LIST_BLOCK: tl.constexpr):
    """One row: its CE and KD into ce_row_ptr / kd_row_ptr, its gradient into grad."""
    student_row = student_ptr + row * student_row_stride
    ids_row = ids_ptr + row * ids_row_stride
    mass_row = mass_ptr + row * mass_row_stride
    saved_row = saved_ptr + row * saved_row_stride
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    label_ok = (label >= 0) & (label < valid_vocab)
    s_label = tl.load(student_row + tl.where(valid & label_ok, label, 0),
                      mask=valid & label_ok, other=0.0).to(tl.float32)
    c_t = LOG2E / temperature
    stream_cols = tl.where(valid, valid_vocab, 0)  # ignored rows stream nothing
    count = tl.where(valid, tl.load(count_ptr + row).to(tl.int32), 0)

    m_s, sum_s1, sum_st = _student_statistics(student_row, stream_cols, c_t, BLOCK_SIZE)
    m_s = tl.where(valid, m_s, 0.0)
    sum_s1 = tl.where(valid, sum_s1, 1.0)
    sum_st = tl.where(valid, sum_st, 1.0)
    log2_s1 = tl.log2(sum_s1)
    log2_st = tl.log2(sum_st)
    cross, total, listed_sum, bad = _listed_sums(student_row, ids_row, mass_row, saved_row,
                                                 count, valid_vocab, m_s, log2_st, c_t,
                                                 WRITE_GRAD, LIST_BLOCK)
    log_tail = tl.load(tail_ptr + row).to(tl.float32)
    tail_mass = tl.where(valid & (log_tail > NEG_LARGE), tl.exp(log_tail), 0.0)
    log2_q_tail, has_unlisted = _log2_q_tail(student_row, ids_row, count, stream_cols, m_s,
                                             sum_st, listed_sum, tail_mass > 0.0, c_t,
                                             BLOCK_SIZE)
    # A tail with no unlisted column to hold it is an infinite divergence (the CPU path
    # refuses such targets).
    cross += tl.where(tail_mass > 0.0, tl.where(has_unlisted, -tail_mass * log2_q_tail * LN2,
                                                float("inf")), 0.0)
    total += tail_mass
    kd = kd_scale * (cross - tl.load(entropy_ptr + row).to(tl.float32))
    kd = tl.where(bad > 0, float("nan"), kd)
    ce = tl.where(valid & (~label_ok), float("nan"), m_s + log2_s1 * LN2 - s_label)
    tl.store(ce_row_ptr + row, tl.where(valid, ce, 0.0))
    tl.store(kd_row_ptr + row, tl.where(valid, kd, 0.0))

    if WRITE_GRAD:
        row_scale = tl.where(valid, row_scale, 0.0)
        kd_coef = (1.0 - alpha) * kd_scale * row_scale / temperature
        grad_row = grad_ptr + row * grad_row_stride
        tl.debug_barrier()  # every read of the row above before any store below
        _gradient_pass(student_row, grad_row, n_cols, stream_cols, label, m_s, log2_s1,
                       log2_st, log2_q_tail, tail_mass, total, c_t, kd_coef,
                       alpha * row_scale, BLOCK_SIZE)
        tl.debug_barrier()  # pass 2's stores to the listed columns before the listed step's
        _listed_gradient(grad_row, ids_row, mass_row, saved_row, count, valid_vocab, label,
                         m_s, log2_s1, log2_st, total, c_t, kd_coef, alpha * row_scale,
                         LIST_BLOCK)


@triton.jit
def sparse_kd_fwd_bwd_kernel(
    student_ptr, grad_ptr, labels_ptr, ids_ptr, mass_ptr, count_ptr, tail_ptr, entropy_ptr,
    saved_ptr, ce_row_ptr, kd_row_ptr, inv_norm_ptr,
    student_row_stride, grad_row_stride, ids_row_stride, mass_row_stride, saved_row_stride,
    n_rows, n_cols, valid_vocab, ignore_index, alpha, temperature, kd_scale,
    WRITE_GRAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, LIST_BLOCK: tl.constexpr,
):
    """Persistent: program pid handles rows pid, pid + programs, ...; saved_ptr: the [N, K]
    fp32 scratch of the listed logits (read and written only with WRITE_GRAD)."""
    row_scale = tl.load(inv_norm_ptr).to(tl.float32)
    first = tl.program_id(0).to(tl.int64)  # int64 row offsets: N x V may exceed 2^31
    for row in range(first, n_rows, tl.num_programs(0)):
        _sparse_row(row, student_ptr, grad_ptr, labels_ptr, ids_ptr, mass_ptr, count_ptr,
                    tail_ptr, entropy_ptr, saved_ptr, ce_row_ptr, kd_row_ptr, row_scale,
                    student_row_stride, grad_row_stride, ids_row_stride, mass_row_stride,
                    saved_row_stride, n_cols, valid_vocab, ignore_index, alpha, temperature,
                    kd_scale, WRITE_GRAD, BLOCK_SIZE, LIST_BLOCK)


def launch_config(vocab: int) -> tuple[int, int]:
    """(BLOCK_SIZE, num_warps): kd_loss's launch, which streams the same rows with the same
    per-lane loop; not yet swept on a GPU for this kernel."""
    return kd_launch_config(vocab, "forward_kl")


def list_block(width: int) -> int:
    """LIST_BLOCK: the listed entries handled per step, the ids' width up to 1024."""
    return min(1024, triton.next_power_of_2(max(width, 16)))


def sparse_kd_forward_triton(s, targets, labels, grad_out, options, *, inv_norm, programs=None):
    """Launch the kernel over every row; return (ce_sum, kd_sum) as 0-dim fp32 tensors.

    `options`: the loss as the kernels run it (engine.kernels.loss_spec.LossOptions).
    s: [N, V] with unit column stride; targets: flat SparseTargets of N positions; grad_out:
    [N, V] (may alias s) or None (forward only, nothing written). programs: the persistent
    grid's size (default kd_loss's `grid_size`). No host sync.
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
    width = targets.ids.shape[-1]
    saved = torch.empty((n_rows if write_grad else 1, width), dtype=torch.float32,
                        device=s.device)
    block_size, num_warps = launch_config(vocab)
    if n_rows > 0:
        grid = (min(n_rows, programs or grid_size(n_rows, s.device, num_warps)),)
        sparse_kd_fwd_bwd_kernel[grid](
            s, grad_out, labels.contiguous(), targets.ids, targets.log_mass,
            targets.count.contiguous(), targets.log_tail.contiguous(),
            targets.entropy.contiguous(), saved, ce_rows, kd_rows, inv_norm,
            s.stride(0), grad_out.stride(0), targets.ids.stride(0), targets.log_mass.stride(0),
            saved.stride(0), n_rows, vocab, options.valid_vocab, int(options.ignore_index),
            float(options.alpha), float(options.temperature),
            float(options.temperature) ** 2 if options.t2_scale else 1.0,
            WRITE_GRAD=write_grad, BLOCK_SIZE=block_size, LIST_BLOCK=list_block(width),
            num_warps=num_warps,
        )
    return ce_rows.sum(), kd_rows.sum()
