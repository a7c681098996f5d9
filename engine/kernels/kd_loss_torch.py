"""Distillation loss in plain PyTorch: the float64 reference and the bounded-memory CPU path.

Two implementations live here on purpose:

* `kd_loss_reference` is the definition written as directly as PyTorch allows (log_softmax,
  KL, cross entropy, autograd). It is what every other path is checked against, and it is
  float64-capable so tests can compare against a result whose own rounding is negligible.
* `kd_loss_forward_chunked` computes the same per-token losses *and* the gradient with respect to
  the student logits by hand, a block of rows at a time. The naive composite keeps several
  fp32 [tokens x vocab] tensors alive for autograd (~0.8 GB each at 4096 x 50304); here only one
  row block of fp32 temporaries exists at any moment, and the gradient is written straight
  into a buffer of the input dtype. It is the CPU backend and the fallback when Triton is absent.

Definitions shared by both (per token whose label is not ignore_index, over the columns
< valid_vocab only; D one of the divergences of engine/kernels/divergences.py, default forward KL):
    KD  = (T^2 if t2_scale else 1) * D(softmax(t / T), softmax(s / T))
    CE  = -log softmax(s)[label]
    loss_token = (1 - alpha) * KD + alpha * CE
    d loss_token / d s = (1 - alpha) * (T^2 or 1) * dD/ds + alpha * (softmax(s) - onehot(label))
    (dD/ds for each divergence: engine/kernels/divergence_blocks.py)
"""

from __future__ import annotations

import torch

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.divergence_blocks import divergence_block, pivot_log_ratio
from engine.kernels.divergences import divergence_reference, mixture_weights, resolve_divergence
from engine.kernels.loss_spec import LossSpec

# Elements of fp32 scratch per row block: 1 MiB per temporary (5 rows of a 50k vocabulary), so
# the handful of temporaries a block needs stay in cache between the passes over it. Measured on
# the CPU at 256 x 50304 fp32 (1 thread), fwd+bwd: 2^16 1.49 s, 2^18 1.33 s, 2^20 1.84 s,
# 2^22 1.77 s; the naive composite 3.88 s.
CHUNK_ELEMENTS = 1 << 18


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


def check_labels_in_range(labels, ignore_index, valid_vocab):
    """Raise if a non-ignored label falls outside [0, valid_vocab).

    Only called for CPU tensors: on a GPU the check would force a host synchronisation, so the
    Triton path instead turns an out-of-range label into a NaN loss the training loop stops on.
    """
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= valid_vocab))
    if bool(bad.any()):
        position = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{position}] = {int(labels[position])} is outside [0, {valid_vocab}) "
            f"and is not ignore_index={ignore_index}"
        )


def inverse_normalizer(normalizer, valid_count: torch.Tensor) -> torch.Tensor:
    """1 / normalizer as a 0-dim fp32 tensor on the labels' device, with no host sync.

    The default divisor is the local valid-token count, clamped to 1 so a micro-batch with every
    token ignored gives a loss of exactly 0 instead of 0 / 0.
    """
    device = valid_count.device
    if normalizer is None:
        return 1.0 / valid_count.to(torch.float32).clamp_min(1.0)
    if isinstance(normalizer, torch.Tensor):
        if normalizer.numel() != 1:
            raise ValueError(f"normalizer tensor must hold one value, got shape {normalizer.shape}")
        return 1.0 / normalizer.detach().reshape(()).to(device=device, dtype=torch.float32)
    value = float(normalizer)
    if not value > 0.0:
        raise ValueError(f"normalizer={normalizer} must be > 0")
    # torch.full launches a fill; torch.tensor(..., device="cuda") would copy from host memory
    # and synchronise.
    return torch.full((), 1.0 / value, dtype=torch.float32, device=device)


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


def rows_per_chunk(vocab: int) -> int:
    return max(1, CHUNK_ELEMENTS // max(1, vocab))


@torch.no_grad()
def kd_loss_forward_chunked(
    s: torch.Tensor,
    t: torch.Tensor,
    labels: torch.Tensor,
    grad_out: torch.Tensor,
    options,
    *,
    inv_norm: torch.Tensor,
):
    """Per-token CE and KD sums, and the gradient of the loss written into `grad_out`.

    `options`: the loss as the kernels run it (engine.kernels.dispatch.LossOptions).

    s, t: [N, V] logits (any float dtype; fp32 math, float64 stays float64). grad_out: [N, V] of
    s's dtype; it may be `s` itself (the caller's in-place opt-in): each row block is read
    completely into fp32 scratch before its gradient is written back, so aliasing is safe.
    `t` may be `s` too (a CE-only caller with alpha = 1). grad_out=None: forward only, no
    gradient is formed (evaluation).
    `divergence` must be a kernel divergence (engine.kernels.divergences.kernel_divergence).
    Returns (ce_sum, kd_sum) as 0-dim tensors of the compute dtype (fp32; float64 for float64
    logits, so the float64 loss can be gradchecked).
    """
    alpha, temperature, divergence = options.alpha, options.temperature, options.divergence
    ignore_index, valid_vocab = options.ignore_index, options.valid_vocab
    n_rows, vocab = s.shape
    compute = torch.float64 if s.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / temperature
    kd_scale = temperature * temperature if options.t2_scale else 1.0
    w_p, w_q = mixture_weights(divergence, options.beta, options.skew)
    ce_sum = torch.zeros((), dtype=compute, device=s.device)
    kd_sum = torch.zeros((), dtype=compute, device=s.device)
    inv_norm = inv_norm.to(compute)
    zero = torch.zeros((), dtype=compute, device=s.device)
    step = rows_per_chunk(vocab)
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        rows_labels = labels[start:stop]
        valid = rows_labels != ignore_index
        safe_labels = torch.where(valid, rows_labels, torch.zeros_like(rows_labels))[:, None]

        # Shift by the row max before scaling by 1/T: the subtraction is exact near the max, so
        # the probabilities that matter keep full fp32 precision even for |logits| ~ 1e4.
        # copy=True: for fp32 inputs .to() would return a view, and scratch 1 is modified in place.
        s_block = s[start:stop, :valid_vocab].to(compute, copy=True)  # scratch 1
        s_block.sub_(s_block.amax(dim=-1, keepdim=True))
        log_sum_s1 = torch.logsumexp(s_block, dim=-1, keepdim=True)
        ce_row = (log_sum_s1 - s_block.gather(1, safe_labels)).squeeze(1)  # CE at T = 1

        log_q = s_block.mul(inv_t)  # scratch 2: student log-probabilities at T
        log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
        log_p = t[start:stop, :valid_vocab].to(compute, copy=True)  # scratch 3: teacher at T
        log_ratio = pivot_log_ratio(s_block, log_p, inv_t) if divergence == "reverse_kl" else None
        log_p.sub_(log_p.amax(dim=-1, keepdim=True)).mul_(inv_t)
        log_p.sub_(torch.logsumexp(log_p, dim=-1, keepdim=True))
        kd_row, dz, dz_scale = divergence_block(divergence, log_p, log_q, w_p, w_q, log_ratio)
        if grad_out is not None:
            # Gradient, built in scratch 1 (the shifted logits are not needed any more).
            grad = s_block.sub_(log_sum_s1).exp_().mul_(alpha)  # alpha * softmax(s)
            grad.scatter_add_(1, safe_labels, torch.full_like(safe_labels, -alpha, dtype=compute))
            grad.add_(dz, alpha=(1.0 - alpha) * kd_scale * inv_t * dz_scale)  # = T dD/dz
            grad.mul_(torch.where(valid, inv_norm, zero)[:, None])
            grad_out[start:stop, :valid_vocab] = grad
            if valid_vocab < vocab:
                grad_out[start:stop, valid_vocab:] = 0

        ce_sum += torch.where(valid, ce_row, zero).sum()
        kd_sum += torch.where(valid, kd_scale * kd_row, zero).sum()
    return ce_sum, kd_sum
