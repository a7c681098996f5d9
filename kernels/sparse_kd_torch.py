"""Sparse-target distillation loss in plain PyTorch: the float64 reference and the CPU path.

The loss against `SparseTargets` (kernels/sparse_targets.py) for one position with student
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

from kernels.constants import IGNORE_INDEX
from kernels.kd_loss_torch import (
    CHUNK_ELEMENTS,
    check_hyperparameters,
    check_labels_in_range,
    inverse_normalizer,
)
from kernels.sparse_targets import SparseTargets, check_target_values, check_targets


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
    kernels.sparse_kd.sparse_kd_loss.
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


def _block_cross_entropy(log_q, targets: SparseTargets, compute):
    """For one row block: (X per row, W per row, ids, listed masses, log q_U, member mask)
    from the student's log-probabilities at T [rows, V] (not modified)."""
    ids = _padded_ids(targets)
    mass = torch.where(listed_mask(targets), targets.log_mass.to(compute).exp(), 0.0)
    member = torch.zeros_like(log_q, dtype=torch.bool).scatter_(
        1, ids, (targets.count > 0)[:, None].expand_as(ids))
    log_q_tail = torch.logsumexp(log_q.masked_fill(member, float("-inf")), dim=-1)
    log_tail = targets.log_tail.to(compute)
    cross = -torch.linalg.vecdot(mass, log_q.gather(1, ids)) + _tail_term(log_tail, log_q_tail)
    total = mass.sum(-1) + log_tail.exp()
    return cross, total, ids, mass, log_q_tail, member


@torch.no_grad()
def sparse_kd_forward_chunked(
    s: torch.Tensor,
    targets: SparseTargets,
    labels: torch.Tensor,
    grad_out: torch.Tensor | None,
    *,
    alpha: float,
    temperature: float,
    ignore_index: int,
    valid_vocab: int,
    inv_norm: torch.Tensor,
    t2_scale: bool = True,
):
    """Per-position CE and KD sums, and the loss's gradient written into `grad_out`.

    s: [N, V] logits (fp32 math; float64 stays float64); targets: flat, N positions;
    grad_out: [N, V] of s's dtype, may be `s` itself (each row block is read completely into
    fp32 scratch before its gradient is written back), or None (forward only). Returns
    (ce_sum, kd_sum) as 0-dim tensors of the compute dtype.
    """
    n_rows, vocab = s.shape
    compute = torch.float64 if s.dtype == torch.float64 else torch.float32
    inv_t = 1.0 / temperature
    kd_scale = temperature * temperature if t2_scale else 1.0
    sums = torch.zeros(2, dtype=compute, device=s.device)
    inv_norm = inv_norm.to(compute)
    zero = torch.zeros((), dtype=compute, device=s.device)
    step = max(1, CHUNK_ELEMENTS // max(1, vocab))
    for start in range(0, n_rows, step):
        stop = min(start + step, n_rows)
        block_targets = targets.rows(start, stop)
        valid = labels[start:stop] != ignore_index
        safe_labels = torch.where(valid, labels[start:stop], 0)[:, None]

        s_block = s[start:stop, :valid_vocab].to(compute, copy=True)  # scratch 1
        s_block.sub_(s_block.amax(dim=-1, keepdim=True))
        log_sum_s1 = torch.logsumexp(s_block, dim=-1, keepdim=True)
        ce_row = (log_sum_s1 - s_block.gather(1, safe_labels)).squeeze(1)
        log_q = s_block.mul(inv_t)  # scratch 2
        log_q.sub_(torch.logsumexp(log_q, dim=-1, keepdim=True))
        cross, total, ids, mass, log_q_tail, member = _block_cross_entropy(
            log_q, block_targets, compute)
        sums[0] += torch.where(valid, ce_row, zero).sum()
        sums[1] += torch.where(valid, kd_scale * (cross - block_targets.entropy.to(compute)),
                               zero).sum()
        if grad_out is None:
            continue
        # T dX/ds = W q - (r q / q_U on unlisted columns) - (w on listed ones), in scratch 2.
        has_tail = (block_targets.log_tail > float("-inf"))[:, None]
        tail_share = log_q.sub(log_q_tail[:, None]).exp_().mul_(
            block_targets.log_tail.to(compute).exp()[:, None])
        tail_share.masked_fill_(member | ~has_tail, 0.0)
        dz = log_q.exp_().mul_(total[:, None]).sub_(tail_share)
        dz.scatter_add_(1, ids, -mass)
        grad = s_block.sub_(log_sum_s1).exp_().mul_(alpha)  # alpha * softmax(s), scratch 1
        grad.scatter_add_(1, safe_labels, torch.full_like(safe_labels, -alpha, dtype=compute))
        grad.add_(dz, alpha=(1.0 - alpha) * kd_scale * inv_t)
        grad.mul_(torch.where(valid, inv_norm, zero)[:, None])
        grad_out[start:stop, :valid_vocab] = grad
        if valid_vocab < vocab:
            grad_out[start:stop, valid_vocab:] = 0
    return sums[0], sums[1]
