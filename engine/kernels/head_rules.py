"""Rules the fused heads share (engine/kernels/kd_head.py, head_epilogue.py) and the memory
plan (engine/memory.py) reads: how many tokens a chunk holds, and how a chunk's weight
gradient joins the fp32 accumulator. The chunk rule is explained in kd_head's docstring.
"""

from __future__ import annotations

import torch

# Both fp32 logit blocks of a chunk on the CPU: 100 MiB, i.e. 256 tokens at V = 50304: the
# largest chunk whose extra peak memory stays within 1/8 of the unfused head + loss in both of
# kd_loss's modes, at a few percent of time over larger chunks (benchmarks/README.md).
CPU_LOGIT_BLOCK_BYTES = 100 << 20
# CUDA: both logit blocks of a chunk (the matmul dtype) at most 256 MiB (kd_head's docstring).
GPU_LOGIT_BLOCK_BYTES = 256 << 20


def _round_down(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def head_chunk_tokens(n_tokens, vocab, with_teacher, element_size, device, requested=None):
    """Tokens per chunk by the rule of kd_head's docstring: the largest chunk the budget
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
