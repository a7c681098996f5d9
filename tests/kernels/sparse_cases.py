"""Sparse teacher targets for the kernel tests, built exactly (float64) from teacher logits."""

from __future__ import annotations

import torch

from engine.data.teacher_cache_encode import (
    sampled_entries,
    sampled_targets,
    teacher_log_probs,
    top_k_entries,
    top_k_targets,
)
from engine.kernels.sparse_kd import sparse_kd_loss, sparse_kd_reference
from tests.kernels import kd_cases


def top_k_case(teacher, k, temperature, valid_vocab, *, ragged=True):
    """Top-k targets of `teacher` logits [N, V]; ragged: some rows keep fewer entries (their
    tail padding entries hold stale ids) and one keeps none."""
    log_p = teacher_log_probs(teacher.double(), temperature, valid_vocab)
    ids, values, log_tail = top_k_entries(log_p, k)
    count = torch.full((teacher.shape[0],), k, dtype=torch.int32)
    if ragged and teacher.shape[0] > 3:
        count[1::4] = max(1, k // 2)
        count[2] = 0
    return top_k_targets(ids.int(), values, count, log_tail)


def sampled_case(teacher, samples, temperature, valid_vocab, *, seed=0):
    log_p = teacher_log_probs(teacher.double(), temperature, valid_vocab)
    gen = torch.Generator().manual_seed(seed)
    ids, draws, count, entropy = sampled_entries(log_p, samples, gen)
    return sampled_targets(ids.int(), draws.double(), count.int(), entropy)


def as_float32(targets):
    """The targets as the cache reader hands them over (float32 masses)."""
    return type(targets)(targets.ids, targets.log_mass.float(), targets.count,
                         targets.log_tail.float(), targets.entropy.float())


def reference_loss_and_grad(student, targets, labels, **kwargs):
    return kd_cases.reference_loss_and_grad(student, targets, labels,
                                            loss_fn=sparse_kd_reference, **kwargs)


def ours_loss_and_grad(student, targets, labels, **kwargs):
    return kd_cases.ours_loss_and_grad(student, targets, labels, loss_fn=sparse_kd_loss,
                                       **kwargs)
