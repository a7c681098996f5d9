"""Sparse-target distillation loss in plain PyTorch: the float64 reference and the CPU path.

The loss against `SparseTargets` (engine/kernels/sparse_targets.py) for one position with student
logits s over the first valid_vocab columns, label y, listed columns L with target masses w_i,
tail mass r on the unlisted columns U and target entropy H:

    q        = softmax(s / T)
    q_U      = sum_{j in U} q_j                       the student's tail bucket
    X        = - sum_{i in L} w_i log q_i - r log q_U  cross-entropy against the target
    KD       = (T^2 if t2_scale else 1) * (X - H)
    CE       = -log softmax(s)_y
    token    = (1 - alpha) * KD + alpha * CE
    d X / d (s_j / T) = W q_j - w_j            (j in L),    W = sum_i w_i + r
                      = W q_j - r q_j / q_U    (j in U)

r log q_U counts only where r > 0 (0 log 0 = 0). Everything else is as in kd_loss
(docs/loss.md): ignored labels count nowhere, columns >= valid_vocab get zero gradient, the
sum over positions is divided by one normaliser.

* `sparse_kd_reference`: that definition with dense masks and autograd (float64-capable);
  every faster path is tested against it.
* `sparse_kd_forward_chunked`: loss and gradient by hand, a block of rows at a time, with no
  [tokens x vocab] tensor beyond the gradient it writes (the CPU backend).
"""

from __future__ import annotations

import torch

from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.divergences import rows_per_chunk
from engine.kernels.loss_spec import (
    check_hyperparameters,
    check_labels_in_range,
    inverse_normalizer,
)
from engine.kernels.sparse_targets import SparseTargets, check_target_values, check_targets


def listed_mask(targets: SparseTargets) -> torch.Tensor:
    """[N, K] bool: which entries of each row are used (the first count[n])."""
    k = targets.ids.shape[-1]
    return torch.arange(k, device=targets.ids.device) < targets.count[:, None]


def _tail_term(log_tail: torch.Tensor, log_q_tail: torch.Tensor) -> torch.Tensor:
    """-r log q_U per row, 0 where r = 0 (written so that neither value nor gradient is NaN)."""
    has_tail = log_tail > float("-inf")
    safe_log_q = torch.where(has_tail, log_q_tail, torch.zeros_like(log_q_tail))
    return torch.where(has_tail, -log_tail.exp() * safe_log_q, torch.zeros_like(log_q_tail))


def sparse_kd_reference(
    student_logits: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    *,
    alpha: float = 0.5,
    temperature: float = 2.0,
    ignore_index: int = IGNORE_INDEX,
    valid_vocab: int | None = None,
    normalizer: float | torch.Tensor | None = None,
    t2_scale: bool = True,
):
    """The definition of the module docstring, dense and differentiable by autograd.

    Math in float64 for float64 logits, fp32 otherwise. Returns (loss, stats) like
    engine.kernels.sparse_kd.sparse_kd_loss.
    """
    check_hyperparameters(alpha, temperature)
    vocab = student_logits.shape[-1]
    valid_vocab = vocab if valid_vocab is None else int(valid_vocab)
    targets = check_targets(targets, labels.shape, student_logits.device)
    compute = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.reshape(-1, vocab)[:, :valid_vocab].to(compute)
    labels = labels.reshape(-1)
    if s.device.type == "cpu":
        check_labels_in_range(labels, ignore_index, valid_vocab)
        check_target_values(targets, valid_vocab)
    listed = listed_mask(targets)
    ids = torch.where(listed, targets.ids, 0).long()  # padding entries point at column 0 ...
    mass = torch.where(listed, targets.log_mass.to(compute).exp(), 0.0)  # ... with zero mass

    log_q = torch.log_softmax(s / temperature, dim=-1)
    dense_mass = torch.zeros_like(log_q).scatter_add(1, ids, mass)
    unlisted = torch.zeros_like(log_q).scatter_add(1, ids, listed.to(compute)) == 0
    log_q_tail = torch.logsumexp(torch.where(unlisted, log_q, float("-inf")), dim=-1)
    cross = -(dense_mass * log_q).sum(-1) + _tail_term(targets.log_tail.to(compute), log_q_tail)
    kd_scale = temperature**2 if t2_scale else 1.0
    kd_token = kd_scale * (cross - targets.entropy.to(compute))

    valid = labels != ignore_index
    safe_labels = torch.where(valid, labels, torch.zeros_like(labels))
    ce_token = -torch.log_softmax(s, dim=-1).gather(1, safe_labels[:, None]).squeeze(1)
    zero = torch.zeros((), dtype=compute, device=s.device)
    kd_sum = torch.where(valid, kd_token, zero).sum()
    ce_sum = torch.where(valid, ce_token, zero).sum()
    valid_count = valid.sum()
    inv_norm = inverse_normalizer(normalizer, valid_count).to(compute)
    loss = ((1.0 - alpha) * kd_sum + alpha * ce_sum) * inv_norm
    stats = {"ce_sum": ce_sum.detach().float(), "kd_sum": kd_sum.detach().float(),
             "valid_tokens": valid_count.detach().float()}
    return loss, stats


def _padded_ids(targets: SparseTargets) -> torch.Tensor:
    """int64 ids whose padding entries repeat the row's last listed id (0 for an empty row),
    so that scattering a per-row constant over them is deterministic."""
    last = (targets.count - 1).clamp_min(0).long()[:, None]
    fill = targets.ids.gather(1, last) * (targets.count > 0).to(targets.ids.dtype)[:, None]
    return torch.where(listed_mask(targets), targets.ids, fill).long()


# Above this share of the student's mass (at T) on the listed columns, log q_U is taken from
# a log-sum-exp over the unlisted columns themselves instead of log1p(-share), whose relative
# error is ~1e-7 / (1 - share); such rows also get their gradient by the exact masked form.
EXACT_TAIL_ABOVE = 0.99


def _listed_log_q(s_shift, targets: SparseTargets, log_sum_t, inv_t, compute):
    """(padded ids, listed masses w, log q at the ids, q at the listed ids (0 elsewhere))."""
    listed = listed_mask(targets)
    ids = _padded_ids(targets)
    mass = torch.where(listed, targets.log_mass.to(compute).exp(), 0.0)
    log_q = s_shift.gather(1, ids).mul_(inv_t).sub_(log_sum_t[:, None])
    return ids, mass, log_q, torch.where(listed, log_q.exp(), 0.0)


def _log_q_tail(s_shift, ids, targets: SparseTargets, q_listed, log_sum_t, inv_t):
    """(log q_U per row, the rows computed exactly): log1p(-share), or for rows with a tail
    whose listed share exceeds EXACT_TAIL_ABOVE a log-sum-exp over their unlisted columns."""
    share = q_listed.sum(-1)
    log_q_tail = torch.log1p(-share.clamp_max(EXACT_TAIL_ABOVE))
    hard = ((share > EXACT_TAIL_ABOVE) & (targets.log_tail > float("-inf"))).nonzero()[:, 0]
    if hard.numel():
        rows = s_shift.index_select(0, hard).mul_(inv_t)
        rows.scatter_(1, ids.index_select(0, hard), float("-inf"))
        log_q_tail[hard] = torch.logsumexp(rows, dim=-1) - log_sum_t.index_select(0, hard)
    return log_q_tail, hard


def _exact_gradient(s_shift, ids, mass, targets, log_q_tail, coefs, inv_t, log_sums):
    """Gradient rows by the masked definition (for the hard rows of _log_q_tail):
    row_ce (softmax(s) - onehot) + row_kd (W q - r q / q_U on unlisted, - w on listed)."""
    row_ce, row_kd, safe_labels = coefs
    log_sum_1, log_sum_t = log_sums
    log_q = s_shift.mul(inv_t).sub_(log_sum_t[:, None])
    member = torch.zeros_like(log_q, dtype=torch.bool).scatter_(
        1, ids, (targets.count > 0)[:, None].expand_as(ids))
    tail = targets.log_tail.to(log_q.dtype)
    share = log_q.sub(log_q_tail[:, None]).exp_().mul_(tail.exp()[:, None]).masked_fill_(
        member, 0.0)
    dz = log_q.exp_().mul_((mass.sum(-1) + tail.exp())[:, None]).sub_(share)
    dz.scatter_add_(1, ids, -mass)
    grad = s_shift.sub(log_sum_1[:, None]).exp_().mul_(row_ce[:, None])
    grad.scatter_add_(1, safe_labels, -row_ce[:, None])
    return grad.addcmul_(dz, row_kd[:, None])


@torch.no_grad()
def sparse_kd_forward_chunked(
    s: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    grad_out: torch.Tensor | None,
    options,
    *,
    inv_norm: torch.Tensor,
):
    """Per-position CE and KD sums, and the loss's gradient written into `grad_out`.

    `options`: the loss as the kernels run it (engine.kernels.loss_spec.LossOptions; alpha,
    temperature, t2_scale, ignore_index and valid_vocab are read).

    s: [N, V] logits (fp32 math; float64 stays float64); targets: flat, N positions;
    grad_out: [N, V] of s's dtype, may be `s` itself (each row block is read completely into
    fp32 scratch before its gradient is written back), or None (forward only). Returns
    (ce_sum, kd_sum) as 0-dim tensors of the compute dtype.
    """
    ignore_index, valid_vocab = options.ignore_index, options.valid_vocab
    compute = torch.float64 if s.dtype == torch.float64 else torch.float32
    sums = torch.zeros(2, dtype=compute, device=s.device)
    step = rows_per_chunk(s.shape[1])
    inv_norm = inv_norm.to(compute)
    for start in range(0, s.shape[0], step):
        stop = min(start + step, s.shape[0])
        valid = labels[start:stop] != ignore_index
        s_shift = s[start:stop, :valid_vocab].to(compute, copy=True)
        s_shift.sub_(s_shift.amax(dim=-1, keepdim=True))
        rows = None if grad_out is None else grad_out[start:stop, :valid_vocab]
        direct = rows is not None and rows.dtype == compute and rows.is_contiguous()
        ce, kd, grad = _block(s_shift, targets.rows(start, stop), labels[start:stop], valid,
                              options, inv_norm=inv_norm, want_grad=grad_out is not None,
                              out=rows if direct else None)
        sums += torch.stack([ce, kd])
        if grad is not None:
            if not direct:
                rows.copy_(grad)
            if valid_vocab < s.shape[1]:
                grad_out[start:stop, valid_vocab:] = 0
    return sums[0], sums[1]


def _exp_at_one(s_shift, e_t, temperature, out):
    """exp(s_shift) (into `out` when given): from exp(s_shift / T) by a square at T = 2 (the
    seed recipe's) or a copy at T = 1, one exponential pass fewer than computing it."""
    if temperature == 2.0:
        return torch.mul(e_t, e_t, out=out)
    if temperature == 1.0:
        return out.copy_(e_t) if out is not None else e_t.clone()
    return torch.exp(s_shift, out=out)


def _block(s_shift, targets, labels, valid, options, *, inv_norm, want_grad, out=None):
    """(ce_sum, kd_sum, gradient or None) of one row block of max-shifted logits (fp32 scratch
    this function may overwrite). The gradient is row_ce e1 / sum1 + row_kd (W - r / q_U)
    eT / sumT plus a correction at the K listed ids (module docstring's formula); it is formed
    in `out` when given (the caller's fp32 gradient rows; s_shift is already a copy)."""
    alpha, temperature = options.alpha, options.temperature
    inv_t = 1.0 / temperature
    kd_scale = temperature * temperature if options.t2_scale else 1.0
    safe_labels = torch.where(valid, labels, 0)[:, None]
    e_t = s_shift.mul(inv_t).exp_()
    e1 = _exp_at_one(s_shift, e_t, temperature, out)
    log_sum_1, log_sum_t = e1.sum(-1).log_(), e_t.sum(-1).log_()
    ce_row = log_sum_1 - s_shift.gather(1, safe_labels).squeeze(1)
    ids, mass, log_q, q_listed = _listed_log_q(s_shift, targets, log_sum_t, inv_t, s_shift.dtype)
    log_q_tail, hard = _log_q_tail(s_shift, ids, targets, q_listed, log_sum_t, inv_t)
    log_tail = targets.log_tail.to(s_shift.dtype)
    cross = -torch.linalg.vecdot(mass, log_q) + _tail_term(log_tail, log_q_tail)
    kd_row = kd_scale * (cross - targets.entropy.to(s_shift.dtype))
    ce_sum = torch.where(valid, ce_row, 0.0).sum()
    kd_sum = torch.where(valid, kd_row, 0.0).sum()
    if not want_grad:
        return ce_sum, kd_sum, None
    row_scale = torch.where(valid, inv_norm, 0.0)
    row_ce, row_kd = alpha * row_scale, (1.0 - alpha) * kd_scale * inv_t * row_scale
    tail_ratio = torch.where(log_tail > float("-inf"), log_tail.sub(log_q_tail).exp(), 0.0)
    grad = e1.mul_((row_ce / log_sum_1.exp())[:, None])
    grad.addcmul_(e_t, (row_kd * (mass.sum(-1) + log_tail.exp() - tail_ratio)
                        / log_sum_t.exp())[:, None])
    grad.scatter_add_(1, ids, row_kd[:, None] * (tail_ratio[:, None] * q_listed - mass))
    grad.scatter_add_(1, safe_labels, -row_ce[:, None])
    if hard.numel():
        pick = lambda t: t.index_select(0, hard)
        grad[hard] = _exact_gradient(
            pick(s_shift), pick(ids), pick(mass), targets.select(hard), pick(log_q_tail),
            (pick(row_ce), pick(row_kd), pick(safe_labels)), inv_t,
            (pick(log_sum_1), pick(log_sum_t)))
    return ce_sum, kd_sum, grad
