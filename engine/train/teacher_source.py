"""Where a distillation run's teacher signal comes from: a live model, or a teacher cache.

`teacher.path` loads the teacher (engine/train/setup.build_teacher) and every micro-step runs
it. `teacher.cache` (a folder written by `neox-distill cache-teacher`) loads no model: the
dataset is wrapped so every batch carries the cached sparse targets
(engine.data.teacher_cache.CachedTargets) and the micro-step computes the sparse loss
(engine.kernels.sparse_kd, engine.kernels.sparse_kd_head) from the student alone. With both set,
the cache
trains and the live teacher only scores the held-out KD (after its fingerprint is checked
against the cache's).

Opening a cache verifies every file of it against the sha256 its manifest recorded (as a
checkpoint is verified before a resume) and checks it against the run: the same token shards
(their content, hashed), data mode, seq_len and pad_id, the same temperature
(loss.temperature), scored vocabulary (data.valid_vocab), tokenizer (run.tokenizer) and
teacher (teacher.path); a mismatch or a damaged file is a ConfigError naming it. Every batch's
records are checked as they are read (engine.data.teacher_cache.record_problem).
"""

from __future__ import annotations

import torch

from engine.data.teacher_cache import (
    CachedTargets,
    CacheError,
    TeacherCache,
    check_cache_matches,
    model_fingerprint,
    targets_of_batch,
)
from engine.data.tokenizer_file import read_tokenizer_file
from engine.kernels.sparse_kd import SUPPORTED_DIVERGENCES, sparse_kd_loss
from engine.kernels.sparse_kd_head import sparse_kd_head_loss
from engine.precision import autocast_context
from engine.train.config import ConfigError
from engine.train.fsdp import through_head


class CachedTeacher:
    """The teacher of a run trained from a cache: no model, targets in every batch."""

    def __init__(self, cache: TeacherCache):
        self.cache = cache

    @property
    def manifest(self) -> dict:
        return self.cache.manifest

    def describe(self) -> str:
        m = self.manifest
        size = f"top-{m['width']}" if m["kind"] == "top_k" else f"{m['width']} samples"
        return (f"teacher cache {self.cache.folder} ({size} per position, T {m['temperature']}, "
                f"{m['record']['bytes']} B/token; no teacher model loaded)")

    @staticmethod
    def targets(batch: dict, device: torch.device):
        """The batch's SparseTargets on `device` (the loader may already have moved them)."""
        try:
            return targets_of_batch(batch).to(device)
        except KeyError:
            raise ValueError("training from a teacher cache needs batches from "
                             "engine.data.teacher_cache.CachedTargets (they carry "
                             "teacher_ids, ...); "
                             f"this batch has keys {sorted(batch)}") from None


def open_teacher_cache(config, dataset, teacher_model, valid_vocab: int):
    """(CachedTeacher, the dataset wrapped to carry its targets) for `config.teacher.cache`,
    checked against the run (module docstring; valid_vocab: the columns training scores);
    a mismatch is a ConfigError naming it."""
    loss = config.loss
    divergence = loss.divergence
    if divergence not in SUPPORTED_DIVERGENCES:
        raise ConfigError(f"loss.divergence={divergence!r} cannot be trained from a teacher "
                         f"cache (teacher.cache): it supports {SUPPORTED_DIVERGENCES} only, see "
                         "docs/loss.md")
    try:
        cache = TeacherCache(config.teacher.cache, verify=True)
        check_cache_matches(
            cache, dataset, temperature=loss.temperature, valid_vocab=valid_vocab,
            tokenizer_fingerprint=read_tokenizer_file(config.run.tokenizer).fingerprint
            if config.run.tokenizer else None,
            teacher_fingerprint=model_fingerprint(config.teacher.path)
            if teacher_model is not None else None)
    except CacheError as exc:
        raise ConfigError(f"teacher.cache={config.teacher.cache}: {exc}") from None
    return CachedTeacher(cache), CachedTargets(dataset, cache)


def cached_micro_loss(student, batch, input_ids, labels, *, fused_head, inplace_grad,
                      autocast_dtype=None, chunk_tokens=None, **loss_args):
    """(loss, stats) of one micro-batch against the batch's cached targets.

    fused_head: the student stops at its final hidden states and the sparse loss runs its head
    chunk by chunk (engine.kernels.sparse_kd_head, as kd_head_loss does online); otherwise the
    student's logits get the loss's gradient written over them (inplace_grad). `loss_args`:
    alpha, temperature, valid_vocab, normalizer, backend, divergence, beta, skew, t2_scale.
    The head and the loss run under the student's autocast, as on the online path."""
    targets = CachedTeacher.targets(batch, input_ids.device)
    with autocast_context(input_ids.device.type, autocast_dtype):
        if fused_head:
            return through_head(student, input_ids, lambda hidden, head: sparse_kd_head_loss(
                hidden, head, targets, labels, chunk_tokens=chunk_tokens, **loss_args))
        s_logits = student(input_ids)
    return sparse_kd_loss(s_logits, targets, labels, inplace_grad=inplace_grad, **loss_args)
