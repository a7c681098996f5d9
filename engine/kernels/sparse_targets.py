"""The teacher's distribution at a few columns per position: what the sparse KD loss reads.

A teacher cache (engine/data/teacher_cache.py) cannot hold the teacher's whole distribution (50304
columns per token), so it keeps a few columns per position and describes the rest by one
number. `SparseTargets` is that description, as the loss kernels read it, for N positions:

    ids       [N, K] int32/int64  listed columns; the first count[n] of row n are used, and
                                  they must be unique and ascending (the Triton kernel
                                  finds the listed columns of a column block with a pointer
                                  that only moves forward); the rest are padding, never read
    log_mass  [N, K] float        log of the target probability on each listed column
    count     [N]    int          listed columns of the position (0: no teacher target there)
    log_tail  [N]    float        log of the target mass on all the columns *not* listed,
                                  spread over them in proportion to the student's own
                                  probabilities (the "tail bucket"); -inf: no tail
    entropy   [N]    float        the target's entropy, subtracted from the cross-entropy so
                                  that the KD term is a divergence (0 for a perfect student)

Two kinds of cache fill it (docs/loss.md, "Sparse targets"):
  * top-k: the teacher's k most likely columns with their log-probabilities, the tail mass
    1 - sum of them, renormalised so everything sums to 1 exactly; the entropy is that of the
    k + 1 buckets, so the KD is exactly KL between the bucketed teacher and the bucketed
    student, and with k = vocabulary it is the full KL;
  * sampled: S draws from the teacher with replacement; each drawn column's mass is its count
    / S (an unbiased estimate of its probability), no tail, and the entropy is the teacher's
    own, so the KD is an unbiased estimate of KL(teacher || student) and its gradient an
    unbiased estimate of the dense gradient.

Why the tail is spread like the student's distribution: the coarse-grained teacher says only
how much mass lies outside the listed columns, so comparing bucket with bucket is the
KL of the (k + 1)-bucket distributions, whose gradient moves the student's tail mass as a
whole towards the teacher's without inventing a shape for it.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SparseTargets:
    """Per-position sparse teacher targets (module docstring); tensors on one device."""

    ids: torch.Tensor
    log_mass: torch.Tensor
    count: torch.Tensor
    log_tail: torch.Tensor
    entropy: torch.Tensor

    def flat(self) -> SparseTargets:
        """The same targets with the position dimensions ([B, T] or [N]) flattened to [N]."""
        k = self.ids.shape[-1]
        return SparseTargets(self.ids.reshape(-1, k), self.log_mass.reshape(-1, k),
                             self.count.reshape(-1), self.log_tail.reshape(-1),
                             self.entropy.reshape(-1))

    def rows(self, start: int, stop: int) -> SparseTargets:
        """Positions [start, stop) of flat targets (views, no copy)."""
        return SparseTargets(self.ids[start:stop], self.log_mass[start:stop],
                             self.count[start:stop], self.log_tail[start:stop],
                             self.entropy[start:stop])

    def select(self, index: torch.Tensor) -> SparseTargets:
        """The positions `index` (a 1-D index tensor) of flat targets, in that order."""
        return SparseTargets(*(t.index_select(0, index) for t in dataclasses.astuple(self)))

    def to(self, device) -> SparseTargets:
        return SparseTargets(*(t.to(device, non_blocking=True) for t in dataclasses.astuple(self)))


def check_targets(targets: SparseTargets, position_shape: torch.Size, device) -> SparseTargets:
    """Shapes, dtypes and device of `targets` for positions of `position_shape`; flattened.

    ValueError naming the field. Values are checked by `check_target_values` (CPU only).
    """
    fields = {f.name: getattr(targets, f.name) for f in dataclasses.fields(SparseTargets)}
    for name, tensor in fields.items():
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"targets.{name} must be a tensor, got {type(tensor).__name__}")
        if tensor.device != torch.device(device):
            raise ValueError(f"targets.{name} is on {tensor.device}, the logits on {device}")
    k_shape = targets.ids.shape
    if k_shape[:-1] != position_shape or targets.log_mass.shape != k_shape:
        raise ValueError(f"targets.ids {tuple(k_shape)} and targets.log_mass "
                         f"{tuple(targets.log_mass.shape)} must both be the positions' shape "
                         f"{tuple(position_shape)} plus one listed-column dimension")
    for name in ("count", "log_tail", "entropy"):
        if fields[name].shape != position_shape:
            raise ValueError(f"targets.{name} {tuple(fields[name].shape)} must have the "
                             f"positions' shape {tuple(position_shape)}")
    for name in ("ids", "count"):
        if fields[name].dtype not in (torch.int32, torch.int64):
            raise ValueError(f"targets.{name} must be int32 or int64, got {fields[name].dtype}")
    for name in ("log_mass", "log_tail", "entropy"):
        if not fields[name].dtype.is_floating_point:
            raise ValueError(f"targets.{name} must be floating point, got {fields[name].dtype}")
    return targets.flat()


def check_target_values(targets: SparseTargets, valid_vocab: int) -> None:
    """Values the kernels rely on, for flat CPU targets: counts within [0, K], listed ids in
    [0, valid_vocab), unique and ascending; a tail only where some column is unlisted.

    Only called on CPU tensors (on a GPU each check would synchronise with the host).
    """
    k = targets.ids.shape[-1]
    count = targets.count
    bad = (count < 0) | (count > k)
    if bool(bad.any()):
        row = int(bad.nonzero()[0, 0])
        raise ValueError(f"targets.count[{row}] = {int(count[row])} is outside [0, {k}]")
    listed = torch.arange(k, device=count.device) < count[:, None]
    ids = targets.ids
    out_of_range = listed & ((ids < 0) | (ids >= valid_vocab))
    if bool(out_of_range.any()):
        row, col = (int(v) for v in out_of_range.nonzero()[0])
        raise ValueError(f"targets.ids[{row}, {col}] = {int(ids[row, col])} is outside "
                         f"[0, {valid_vocab}) (valid_vocab)")
    not_ascending = listed[:, 1:] & (ids[:, 1:] <= ids[:, :-1])
    if bool(not_ascending.any()):
        row, col = (int(v) for v in not_ascending.nonzero()[0])
        raise ValueError(f"targets.ids[{row}]: listed ids must be unique and ascending, but "
                         f"entry {col + 1} ({int(ids[row, col + 1])}) follows "
                         f"{int(ids[row, col])}")
    stranded = (count >= valid_vocab) & (targets.log_tail > float("-inf"))
    if bool(stranded.any()):
        row = int(stranded.nonzero()[0, 0])
        raise ValueError(f"targets.log_tail[{row}] puts mass on unlisted columns, but all "
                         f"{valid_vocab} columns are listed")
