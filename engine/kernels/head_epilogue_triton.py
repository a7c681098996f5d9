"""The head that never writes logits: Triton matmuls whose epilogues reduce the logit tiles.

Two kernels over tiles of [BLOCK_M tokens x BLOCK_N vocabulary columns]; each forms both models'
logit tiles in registers (student h_s @ W_s^T and teacher h_t @ W_t^T, fp32 accumulators over
the hidden dimension in BLOCK_K steps) and never stores them:

  head_stats_kernel  grid (token blocks, vocabulary splits). Each program walks its split's
                     vocabulary tiles and keeps, per row, the online statistics the forward KL
                     and the cross-entropy need: the student's running max m_s and sum-exp at
                     T = 1 and at T (one max serves both, since max(s / T) = max(s) / T), the
                     teacher's running max m_t and sum-exp at T, the cross term
                     sum_k e^{(t_k - m_t)/T} ((t_k - m_t) - (s_k - m_s)) / T, and the label's
                     logit. Each is rescaled whenever a running max moves (online softmax).
                     It writes the 7 statistics per (split, row): [7, n_splits, N] fp32.
                     The launcher's caller merges the splits per row the same way.
  head_grad_kernel   grid (token blocks, vocabulary tiles) over one chunk of tokens: recomputes
                     both logit tiles once and writes d loss / d student logits,
                     kd_coef (q - p) + ce_coef (softmax(s) - onehot(y)), from the merged
                     per-row statistics; the caller turns that block into d hidden and d weight
                     with two cuBLAS matmuls (fp32 accumulation of d weight).

Columns >= valid_vocab take part in no softmax and get gradient 0; columns >= V and rows >= N
are masked. All statistics math is fp32; masked entries become NEG_LARGE (finite), never -inf,
so no inf - inf appears. Row offsets are int64. See docs/loss.md ("The head that never writes
logits") for the traffic this saves and what a GPU run has to decide.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

NEG_LARGE = tl.constexpr(-1.0e30)
N_STATS = 7  # m_s, sum-exp at 1, sum-exp at T, m_t, teacher sum-exp at T, cross, label logit
# Programs the statistics kernel aims for: two per SM of an H100 (132 SMs).
TARGET_PROGRAMS = 264


@triton.jit
def _logit_tile(h_ptr, w_ptr, rows, cols, n_rows, vocab, dim, h_stride, w_stride,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """[BLOCK_M, BLOCK_N] fp32 tile of h[rows] @ w[cols]^T; masked rows / columns read 0."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < n_rows
    col_ok = cols < vocab
    for k0 in range(0, dim, BLOCK_K):
        k = k0 + ks
        k_ok = k < dim
        a = tl.load(h_ptr + rows[:, None] * h_stride + k[None, :],
                    mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(w_ptr + cols[None, :] * w_stride + k[:, None],
                    mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        if DOT_PRECISION == "interpret":  # the interpreter's bf16 tl.dot is wrong (3.9)
            a = a.to(tl.float32)
            b = b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return acc


@triton.jit
def head_stats_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, labels_ptr, out_ptr,
    n_rows, vocab, valid_vocab, hs_dim, ht_dim,
    hs_stride, ws_stride, ht_stride, wt_stride,
    inv_t, tiles_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    split = tl.program_id(1)
    n_splits = tl.num_programs(1)
    rows = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    labels = tl.load(labels_ptr + rows, mask=rows < n_rows, other=-1).to(tl.int64)
    m_s = tl.full((BLOCK_M,), NEG_LARGE, tl.float32)
    m_t = tl.full((BLOCK_M,), NEG_LARGE, tl.float32)
    sum_s1 = tl.zeros((BLOCK_M,), tl.float32)
    sum_st = tl.zeros((BLOCK_M,), tl.float32)
    sum_tt = tl.zeros((BLOCK_M,), tl.float32)
    cross = tl.zeros((BLOCK_M,), tl.float32)
    s_label = tl.zeros((BLOCK_M,), tl.float32)
    for i in range(0, tiles_per_split):
        cols = (split * tiles_per_split + i).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        live = (cols < valid_vocab)[None, :]
        s = _logit_tile(hs_ptr, ws_ptr, rows, cols, n_rows, vocab, hs_dim, hs_stride,
                        ws_stride, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        t = _logit_tile(ht_ptr, wt_ptr, rows, cols, n_rows, vocab, ht_dim, ht_stride,
                        wt_stride, BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
        s_label += tl.sum(tl.where(live & (cols[None, :] == labels[:, None]), s, 0.0), axis=1)
        s = tl.where(live, s, NEG_LARGE)
        t = tl.where(live, t, NEG_LARGE)
        new_m_s = tl.maximum(m_s, tl.max(s, axis=1))
        new_m_t = tl.maximum(m_t, tl.max(t, axis=1))
        s_shift = s - new_m_s[:, None]
        t_shift = t - new_m_t[:, None]
        e_t = tl.where(live, tl.exp(t_shift * inv_t), 0.0)
        # The cross term of the rows so far, moved to the new maxima, plus this tile's.
        d_t = m_t - new_m_t  # <= 0; about -1e30 before the first live column (sum_tt is 0)
        scale_t = tl.exp(d_t * inv_t)
        cross = scale_t * (cross + sum_tt * (d_t - (m_s - new_m_s)) * inv_t)
        cross += tl.sum(tl.where(live, e_t * (t_shift - s_shift) * inv_t, 0.0), axis=1)
        sum_s1 = sum_s1 * tl.exp(m_s - new_m_s) + tl.sum(
            tl.where(live, tl.exp(s_shift), 0.0), axis=1)
        sum_st = sum_st * tl.exp((m_s - new_m_s) * inv_t) + tl.sum(
            tl.where(live, tl.exp(s_shift * inv_t), 0.0), axis=1)
        sum_tt = sum_tt * scale_t + tl.sum(e_t, axis=1)
        m_s = new_m_s
        m_t = new_m_t
    out = out_ptr + split * n_rows + rows
    stride = n_splits * n_rows
    keep = rows < n_rows
    tl.store(out, m_s, mask=keep)
    tl.store(out + stride, sum_s1, mask=keep)
    tl.store(out + 2 * stride, sum_st, mask=keep)
    tl.store(out + 3 * stride, m_t, mask=keep)
    tl.store(out + 4 * stride, sum_tt, mask=keep)
    tl.store(out + 5 * stride, cross, mask=keep)
    tl.store(out + 6 * stride, s_label, mask=keep)


@triton.jit
def head_grad_kernel(
    hs_ptr, ws_ptr, ht_ptr, wt_ptr, labels_ptr, stats_ptr, coef_ptr, grad_ptr,
    row_start, n_rows, vocab, valid_vocab, hs_dim, ht_dim,
    hs_stride, ws_stride, ht_stride, wt_stride, grad_stride, stats_stride,
    ignore_index, inv_t,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Rows [row_start, n_rows) of d loss / d student logits into grad_ptr (row 0 = row_start).

    stats_ptr: [5, stats_stride] fp32 per row: m_s, log sum-exp at 1, log sum-exp at T (both
    relative to m_s), m_t, the teacher's log sum-exp at T; coef_ptr: [kd_coef, ce_coef]."""
    rows = row_start + tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    in_rows = rows < n_rows
    labels = tl.load(labels_ptr + rows, mask=in_rows, other=ignore_index).to(tl.int64)
    m_s = tl.load(stats_ptr + rows, mask=in_rows, other=0.0)
    log_z1 = tl.load(stats_ptr + stats_stride + rows, mask=in_rows, other=0.0)
    log_zs = tl.load(stats_ptr + 2 * stats_stride + rows, mask=in_rows, other=0.0)
    m_t = tl.load(stats_ptr + 3 * stats_stride + rows, mask=in_rows, other=0.0)
    log_zt = tl.load(stats_ptr + 4 * stats_stride + rows, mask=in_rows, other=0.0)
    kd_coef = tl.load(coef_ptr)
    ce_coef = tl.load(coef_ptr + 1)
    s = _logit_tile(hs_ptr, ws_ptr, rows, cols, n_rows, vocab, hs_dim, hs_stride, ws_stride,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    t = _logit_tile(ht_ptr, wt_ptr, rows, cols, n_rows, vocab, ht_dim, ht_stride, wt_stride,
                    BLOCK_M, BLOCK_N, BLOCK_K, DOT_PRECISION)
    live = (cols < valid_vocab)[None, :] & (in_rows & (labels != ignore_index))[:, None]
    s_shift = tl.where(live, s - m_s[:, None], 0.0)
    q = tl.exp(s_shift * inv_t - log_zs[:, None])
    p = tl.exp(tl.where(live, (t - m_t[:, None]) * inv_t - log_zt[:, None], 0.0))
    softmax = tl.exp(s_shift - log_z1[:, None])
    onehot = tl.where(cols[None, :] == labels[:, None], 1.0, 0.0)
    grad = tl.where(live, kd_coef * (q - p) + ce_coef * (softmax - onehot), 0.0)
    tl.store(grad_ptr + (rows - row_start)[:, None] * grad_stride + cols[None, :],
             grad.to(grad_ptr.dtype.element_ty),
             mask=in_rows[:, None] & (cols < vocab)[None, :])


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs multiply in full fp32, as torch.mm does by default (no TF32); bf16 on the
    tensor cores. Under TRITON_INTERPRET=1 both operands go to fp32 first ("interpret"): the
    interpreter's tl.dot returns garbage for bf16 operands (Triton 3.9, checked by hand),
    and fp32 products of bf16 values are what the tensor cores' fp32 accumulation gives."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return "interpret"
    return "ieee" if dtype == torch.float32 else "tf32"


def launch_config(n_rows: int, vocab: int, dim: int, element_size: int = 2):
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps), shrunk to the problem (16, tl.dot's smallest).

    bf16: 64 x 128 tiles in 32-deep K steps, 8 warps; fp32 (twice the operand registers):
    64 x 64 tiles in 16-deep steps. Both models' fp32 accumulator tiles live at once, which
    is what limits the tile: these are the largest that compile for sm_90 without spills
    (tests/kernels/test_head_epilogue_compile.py; 64 x 128 x 64 spilled with either dtype).
    Designed, not yet measured: the GPU suite's `head` rows decide.
    """
    def fit(size: int, most: int) -> int:
        return max(16, min(most, triton.next_power_of_2(max(size, 1))))

    if element_size >= 4:
        return fit(n_rows, 64), fit(vocab, 64), fit(dim, 16), 8
    return fit(n_rows, 64), fit(vocab, 128), fit(dim, 32), 8


def head_statistics(hs, ws, ht, wt, labels, *, valid_vocab: int, temperature: float,
                    block=None, n_splits: int | None = None) -> torch.Tensor:
    """The statistics kernel over every row: [7, n_splits, N] fp32 (the module docstring).

    hs [N, Hs], ws [V, Hs], ht [N, Ht], wt [V, Ht] in one matmul dtype (bf16 or fp32), unit
    column stride; labels [N] int. `block` = (BLOCK_M, BLOCK_N, BLOCK_K, num_warps) overrides
    launch_config; n_splits overrides the vocabulary split (tests use both). No host sync.
    """
    n_rows, vocab = hs.shape[0], ws.shape[0]
    block_m, block_n, block_k, warps = block or launch_config(
        n_rows, vocab, max(hs.shape[1], ht.shape[1]), hs.element_size())
    tiles = triton.cdiv(valid_vocab, block_n)  # tiles past valid_vocab hold nothing
    m_blocks = triton.cdiv(max(n_rows, 1), block_m)
    if n_splits is None:
        n_splits = min(tiles, triton.cdiv(TARGET_PROGRAMS, m_blocks))
    tiles_per_split = triton.cdiv(tiles, n_splits)
    n_splits = triton.cdiv(tiles, tiles_per_split)
    out = torch.empty(N_STATS, n_splits, n_rows, dtype=torch.float32, device=hs.device)
    if n_rows > 0:
        head_stats_kernel[(m_blocks, n_splits)](
            hs, ws, ht, wt, labels.contiguous(), out, n_rows, vocab, valid_vocab,
            hs.shape[1], ht.shape[1], hs.stride(0), ws.stride(0), ht.stride(0), wt.stride(0),
            1.0 / float(temperature), tiles_per_split, BLOCK_M=block_m, BLOCK_N=block_n,
            BLOCK_K=block_k, DOT_PRECISION=_dot_precision(hs.dtype), num_warps=warps)
    return out


def head_logit_grad(hs, ws, ht, wt, labels, stats, coefs, grad_out, row_start: int, *,
                    valid_vocab: int, temperature: float, ignore_index: int, block=None):
    """Write d loss / d student logits of rows [row_start, row_start + len(grad_out)) into
    grad_out [rows, V] (the student's matmul dtype). stats: [5, N] fp32 merged per row
    (m_s, log Z1, log ZsT, m_t, log Zt); coefs: [2] fp32 on the device (kd_coef, ce_coef,
    the loss's 1/N and incoming gradient folded in). No host sync."""
    n_chunk, vocab = grad_out.shape
    block_m, block_n, block_k, warps = block or launch_config(
        n_chunk, vocab, max(hs.shape[1], ht.shape[1]), hs.element_size())
    if n_chunk == 0:
        return
    grid = (triton.cdiv(n_chunk, block_m), triton.cdiv(vocab, block_n))
    head_grad_kernel[grid](
        hs, ws, ht, wt, labels.contiguous(), stats, coefs, grad_out, row_start,
        row_start + n_chunk, vocab, valid_vocab, hs.shape[1], ht.shape[1], hs.stride(0),
        ws.stride(0), ht.stride(0), wt.stride(0), grad_out.stride(0), stats.stride(0),
        int(ignore_index), 1.0 / float(temperature), BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_K=block_k, DOT_PRECISION=_dot_precision(hs.dtype), num_warps=warps)
