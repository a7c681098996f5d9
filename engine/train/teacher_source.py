"""Opening a run's teacher cache: the CachedTeacher signal (engine/train/teacher_signal.py).

`teacher.path` loads the teacher (engine/train/setup.build_teacher) and every micro-step runs
it (a LiveTeacher). `teacher.cache` (a folder written by `neox-distill cache-teacher`) loads no
model: the dataset is wrapped so every batch carries the cached sparse targets
(engine.data.teacher_cache.CachedTargets) and the micro-step computes the sparse loss
(engine.kernels.sparse_kd, engine.kernels.sparse_kd_head) from the student alone. With both
set, the cache trains and the live teacher only scores the held-out KD (after its fingerprint
is checked against the cache's).

Opening a cache verifies every file of it against the sha256 its manifest recorded (as a
checkpoint is verified before a resume) and checks it against the run: the same token shards
(their content, hashed), data mode, seq_len and pad_id, the same temperature
(loss.temperature), scored vocabulary (data.valid_vocab), tokenizer (run.tokenizer) and
teacher (teacher.path); a mismatch or a damaged file is a ConfigError naming it. Every batch's
records are checked as they are read (engine.data.teacher_cache.record_problem).
"""

from __future__ import annotations

from engine.data.teacher_cache import (
    CachedTargets,
    CacheError,
    TeacherCache,
    check_cache_matches,
    model_fingerprint,
)
from engine.data.tokenizer_file import read_tokenizer_file
from engine.kernels.sparse_kd import SUPPORTED_DIVERGENCES
from engine.train.config import ConfigError
from engine.train.teacher_signal import CachedTeacher


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
