"""Each divergence's value and gradient for one row block, by hand (the chunked PyTorch path).

For a divergence D(q) with partial derivatives g_k = dD/dq_k and q = softmax(z / T):

    dD/dz_j = (1 / T) * q_j * (g_j - c),   c = sum_k q_k g_k

so every function here returns the per-row value D and T * dD/dz = q_j g_j - q_j c, the latter
as (dz, scale) with T * dD/dz = scale * dz: a constant factor is left to the caller, which
multiplies by its own coefficient anyway (one pass fewer per row block). The g of each
divergence (m the mixture, see engine/kernels/divergences.py):

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

log_p and log_q are [rows, V] fp32/fp64 scratch that these functions overwrite.
"""

from __future__ import annotations

import math

import torch


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

    `divergence` is a kernel divergence (engine.kernels.divergences.kernel_divergence). log_ratio:
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
