"""The divergences the KD term can use, and the PyTorch path that computes them by hand.

Three layers of one piece of math: the names, argument checks and float64 definitions
(`divergence_reference`, for autograd); each divergence's value and gradient on one block of
rows, derived by hand (`divergence_block`); and the chunked PyTorch backend of the loss
(`kd_loss_forward_chunked`), which runs those blocks with the cross-entropy a row block at a
time: the CPU backend and the fallback when Triton is absent.

With p = softmax(teacher / T) and q = softmax(student / T) over the columns < valid_vocab:

    forward_kl       KL(p || q)                          (Hinton; the default)
    reverse_kl       KL(q || p)                          (MiniLLM)
    jsd              beta * KL(p || m) + (1 - beta) * KL(q || m),  m = beta * p + (1 - beta) * q
                     (GKD). beta = 0 means forward_kl and beta = 1 means reverse_kl: the general
                     formula tends to 0 at both ends, so, as in TRL and Liger-Kernel, the ends are
                     the plain KLs instead.
    skew_forward_kl  KL(p || skew * p + (1 - skew) * q)  (DistiLLM; skew = 0 is forward_kl)
    skew_reverse_kl  KL(q || skew * q + (1 - skew) * p)  (DistiLLM; skew = 0 is reverse_kl)
    tvd              0.5 * sum |p - q|                   (total variation distance)

`beta` is read only by jsd and `skew` only by the two skew KLs; the others ignore them, but
both are range-checked whatever the divergence, so a typo never passes silently.

0 * log 0: every path computes log-probabilities from the logits (log-softmax, and log m as a
log-add-exp of the two weighted log-probabilities), so a log-probability is always finite, even
where its probability underflows to 0. A term p * (log p - log m) with p == 0 is then exactly
0 * finite = 0, the limit of x log x at 0, and its gradient is finite too. Nothing ever takes
the log of a sum that can underflow.

By hand, per row block. For a divergence D(q) with partial derivatives g_k = dD/dq_k and
q = softmax(z / T):

    dD/dz_j = (1 / T) * q_j * (g_j - c),   c = sum_k q_k g_k

so every block function returns the per-row value D and T * dD/dz = q_j g_j - q_j c, the latter
as (dz, scale) with T * dD/dz = scale * dz: a constant factor is left to the caller, which
multiplies by its own coefficient anyway (one pass fewer per row block). The g of each
divergence (m the mixture):

    forward_kl       -p / q                         c = -1, dz = q - p
    reverse_kl       log q - log p (+1, cancels)    c = KL(q || p), around a pivot (below)
    jsd              (1 - beta) (log q - log m)
    skew_forward_kl  -(1 - skew) p / m
    skew_reverse_kl  log q - log m - skew q / m (+1, cancels)
    tvd              0.5 sign(q - p)

Adding a constant to g changes nothing (c moves with it), so each g below drops its constants
before the subtraction: where g is nearly constant over the columns that carry q's mass, the
gradient is a small difference, and an O(1) constant kept in both terms would leave fp32
rounding of that constant's size in it.

Ratios such as q / m are formed from differences of log-probabilities taken first: log q and
log m may both be ~-4e4 (|logit| 1e4 at T = 0.5), where one fp32 ulp is 0.004, so any sum of
such logs formed before the subtraction would cost percent-level errors.

The block functions take log_p and log_q as [rows, V] fp32/fp64 scratch that they overwrite.
The loss they serve (per token, D one of the divergences above) is defined in kd_loss.py's
docstring; its gradient with respect to the student logits is
(1 - alpha) * (T^2 or 1) * dD/ds + alpha * (softmax(s) - onehot(label)).
"""

from __future__ import annotations

import math

import torch

DIVERGENCES = (
    "forward_kl",
    "reverse_kl",
    "jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
)


def resolve_divergence(choice) -> str:
    """Check `choice`'s divergence, beta and skew (a LossSpec) and return the divergence the
    definition computes.

    jsd at beta = 0 / 1 becomes forward_kl / reverse_kl (the convention above). Raises
    ValueError naming the bad argument.
    """
    divergence, beta, skew = choice.divergence, choice.beta, choice.skew
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence={divergence!r} must be one of {DIVERGENCES}")
    for name, value in (("beta", beta), ("skew", skew)):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name}={value!r} must be a number in [0, 1]")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ValueError(f"{name}={value} must be in [0, 1]")
    if divergence == "jsd" and float(beta) == 0.0:
        return "forward_kl"
    if divergence == "jsd" and float(beta) == 1.0:
        return "reverse_kl"
    return divergence


def kernel_divergence(divergence: str, skew: float) -> str:
    """The resolved divergence the kernels run: the skew KLs at skew = 0 are the plain KLs.

    Identical values by definition (m = q, resp. m = p), and the plain paths are both cheaper
    and, for reverse_kl, more precise at extreme logits (see the block functions below).
    The float64 reference keeps the general formula, so tests still check that identity.
    """
    if float(skew) == 0.0 and divergence in ("skew_forward_kl", "skew_reverse_kl"):
        return divergence.removeprefix("skew_")
    return divergence


def mixture_weights(divergence: str, beta: float, skew: float) -> tuple[float, float]:
    """(w_p, w_q) with m = w_p * p + w_q * q for the divergences that use a mixture, else (0, 0).

    One convention for every path, so the kernels need a single log-add-exp of
    log p + log w_p and log q + log w_q.
    """
    if divergence == "jsd":
        return float(beta), 1.0 - float(beta)
    if divergence == "skew_forward_kl":
        return float(skew), 1.0 - float(skew)
    if divergence == "skew_reverse_kl":
        return 1.0 - float(skew), float(skew)
    return 0.0, 0.0


def log_mixture(log_p: torch.Tensor, log_q: torch.Tensor, w_p: float, w_q: float):
    """log(w_p * p + w_q * q) from log-probabilities, as a log-add-exp (never log of a sum).

    A weight of 0 drops its term exactly (log 0 = -inf inside logaddexp contributes nothing and
    passes no gradient), so skew = 0 gives log m = log q (or log p) to the last bit.
    """
    if w_p == 0.0:
        return log_q
    if w_q == 0.0:
        return log_p
    return torch.logaddexp(log_p + math.log(w_p), log_q + math.log(w_q))


def divergence_reference(
    divergence: str, log_p: torch.Tensor, log_q: torch.Tensor, *, beta: float, skew: float
) -> torch.Tensor:
    """Per-row divergence from row log-probabilities [rows, V]; the definitions, for autograd.

    `divergence` must already be resolved (resolve_divergence). Written as plainly as the
    definitions allow; the float64 reference every other path is checked against.
    """
    p, q = log_p.exp(), log_q.exp()
    if divergence == "forward_kl":
        return (p * (log_p - log_q)).sum(-1)
    if divergence == "reverse_kl":
        return (q * (log_q - log_p)).sum(-1)
    if divergence == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    w_p, w_q = mixture_weights(divergence, beta, skew)
    log_m = log_mixture(log_p, log_q, w_p, w_q)
    kl_p_m = (p * (log_p - log_m)).sum(-1)
    kl_q_m = (q * (log_q - log_m)).sum(-1)
    if divergence == "jsd":
        return w_p * kl_p_m + w_q * kl_q_m
    if divergence == "skew_forward_kl":
        return kl_p_m
    if divergence == "skew_reverse_kl":
        return kl_q_m
    raise ValueError(f"divergence={divergence!r} must be one of {DIVERGENCES}")


# --------------------------------------------------------------------------------------
# Value and gradient by hand, per row block (module docstring)
# --------------------------------------------------------------------------------------


def _rows_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vecdot(a, b)


def _forward_kl(log_p, log_q, w_p, w_q, log_ratio):
    p = log_p.exp()
    value = _rows_dot(log_p.sub_(log_q), p)
    return value, log_q.exp_().sub_(p), 1.0


def _reverse_kl(log_p, log_q, w_p, w_q, log_ratio):
    q = log_q.exp()
    value = _rows_dot(log_q.sub_(log_p), q)
    # c = KL(q || p) + const with the same const as log_ratio, which cancels in the gradient.
    c = _rows_dot(log_ratio, q)
    return value, log_ratio.sub_(c[:, None]).mul_(q), 1.0


def _subtract_q_times_sum(q_g: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """q_j g_j - q_j * sum_k q_k g_k, in place in q_g (linear: any constant factor may wait)."""
    c = q_g.sum(-1, keepdim=True)
    return q_g.addcmul_(q, c, value=-1.0)


def _mixture_terms(log_p, log_q, w_p, w_q):
    """(x, softplus(x)) for x = log(w_p p / (w_q q)), both weights > 0.

    With m = w_p p + w_q q: log(q / m) = -softplus(x) - log w_q, log(p / m) = x - softplus(x)
    - log w_p, and w_q q / m = exp(-softplus(x)). This is the log-add-exp of the two weighted
    log-probabilities, rearranged so each quantity costs one pass instead of the three of
    forming log m and subtracting it (the chunked path's cost budget is 1.3x forward_kl).
    """
    x = torch.sub(log_p, log_q).add_(math.log(w_p / w_q))
    return x, torch.nn.functional.softplus(x)


def _zero_divergence(log_p):
    """A skew KL at skew = 1 compares a distribution with itself: 0, gradient 0."""
    return torch.zeros(log_p.shape[0], dtype=log_p.dtype, device=log_p.device), log_p, 0.0


def _jsd(log_p, log_q, w_p, w_q, log_ratio):
    x, sp = _mixture_terms(log_p, log_q, w_p, w_q)
    p, q = log_p.exp_(), log_q.exp_()
    kl_p_m = _rows_dot(x.sub_(sp), p) - math.log(w_p)
    kl_q_m = -_rows_dot(sp, q) - math.log(w_q)
    # g = (1 - beta) log(q / m) = -(1 - beta) (softplus(x) + log w_q); constant dropped
    q_g = sp.mul_(q)
    return w_p * kl_p_m + w_q * kl_q_m, _subtract_q_times_sum(q_g, q), -w_q


def _skew_forward_kl(log_p, log_q, w_p, w_q, log_ratio):
    if w_q == 0.0:
        return _zero_divergence(log_p)
    x, sp = _mixture_terms(log_p, log_q, w_p, w_q)
    p, q = log_p.exp_(), log_q.exp_()
    value = _rows_dot(x.sub_(sp), p) - math.log(w_p)  # KL(p || m)
    # q g = -(1 - skew) p q / m = -p exp(-softplus(x)). g is exactly 0 where p underflows (a
    # one-hot teacher) and -(1 - skew) / skew where q does; no constant is worth dropping.
    q_g = torch.neg(sp).exp_().mul_(p)
    return value, _subtract_q_times_sum(q_g, q), -1.0


def _skew_reverse_kl(log_p, log_q, w_p, w_q, log_ratio):
    if w_p == 0.0:
        return _zero_divergence(log_p)
    _, sp = _mixture_terms(log_p, log_q, w_p, w_q)
    q = log_q.exp_()
    value = -_rows_dot(sp, q) - math.log(w_q)  # KL(q || m)
    # g = log(q / m) - skew q / m (+ 1) = -softplus(x) - log skew - exp(-softplus(x)) (+ 1);
    # constants dropped: g = -(softplus(x) + expm1(-softplus(x))), ~ -softplus(x)^2 / 2 near
    # q >> p, where keeping them would leave the gradient a difference of O(1) numbers.
    q_g = torch.neg(sp).expm1_().add_(sp).mul_(q)
    return value, _subtract_q_times_sum(q_g, q), -1.0


def _tvd(log_p, log_q, w_p, w_q, log_ratio):
    p, q = log_p.exp_(), log_q.exp_()
    diff = p.neg_().add_(q)  # q - p, in p's storage
    value = 0.5 * diff.abs().sum(-1)
    q_g = diff.sign_().mul_(q)  # q g = 0.5 q sign(q - p)
    return value, _subtract_q_times_sum(q_g, q), 0.5


_BLOCKS = {
    "forward_kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "skew_forward_kl": _skew_forward_kl,
    "skew_reverse_kl": _skew_reverse_kl,
    "tvd": _tvd,
}


def divergence_block(divergence: str, log_p, log_q, w_p: float, w_q: float, log_ratio=None):
    """(per-row value [rows], dz [rows, V], scale) with T * dD/dz = scale * dz.

    `divergence` is a kernel divergence (kernel_divergence). log_ratio:
    reverse_kl only, log q - log p up to a per-row constant, computed from the raw logits
    around a pivot (`pivot_log_ratio`); the others ignore it.
    """
    return _BLOCKS[divergence](log_p, log_q, w_p, w_q, log_ratio)


def pivot_log_ratio(s_shifted: torch.Tensor, t: torch.Tensor, inv_t: float) -> torch.Tensor:
    """(s - max s) / T - (t - t[argmax s]) / T per row: log q - log p up to a row constant.

    reverse_kl's gradient q_j (log q_j - log p_j - KL) subtracts numbers that can be ~4e4 apart
    from the teacher's own maximum at |logit| 1e4, where fp32 keeps only ~0.004. Measured
    from the teacher's logit at the student's most likely column instead, the values where q
    has mass are small differences of raw logits, exact to fp32 rounding of their own size.
    s_shifted: student logits minus their row max; t: raw teacher logits (same dtype).
    """
    pivot = s_shifted.argmax(dim=-1, keepdim=True)
    t_rel = t - t.gather(1, pivot)
    return s_shifted.sub(t_rel).mul_(inv_t)


# --------------------------------------------------------------------------------------
# The chunked PyTorch backend: CE + KD and the student logits' gradient, a row block at a time
# --------------------------------------------------------------------------------------

# Elements of fp32 scratch per row block: 1 MiB per temporary (5 rows of a 50k vocabulary), so
# the handful of temporaries a block needs stay in cache between the passes over it. Measured on
# the CPU at 256 x 50304 fp32 (1 thread), fwd+bwd: 2^16 1.49 s, 2^18 1.33 s, 2^20 1.84 s,
# 2^22 1.77 s; the naive composite 3.88 s.
CHUNK_ELEMENTS = 1 << 18


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

    `options`: the loss as the kernels run it (engine.kernels.loss_spec.LossOptions).

    s, t: [N, V] logits (any float dtype; fp32 math, float64 stays float64). grad_out: [N, V] of
    s's dtype; it may be `s` itself (the caller's in-place opt-in): each row block is read
    completely into fp32 scratch before its gradient is written back, so aliasing is safe.
    `t` may be `s` too (a CE-only caller with alpha = 1). grad_out=None: forward only, no
    gradient is formed (evaluation).
    `divergence` must be a kernel divergence (kernel_divergence).
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
