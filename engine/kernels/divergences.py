"""The divergences the KD term can use: names, argument checks and their float64 definitions.

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
    and, for reverse_kl, more precise at extreme logits (see engine/kernels/divergence_blocks.py).
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
