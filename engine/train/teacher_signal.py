"""Where a micro-step's teacher signal comes from: one protocol, three sources.

The training step (engine/train/step.py) has one path whatever the source: it asks the signal
for the teacher's side of the micro-batch (`teacher_side`, before the student's forward), runs
the student, and hands the student's final hidden states and head weight (`head_loss`, with
loss.fused_head) or its logits (`logits_loss`) back to the signal, which computes the loss
described by the LossSpec:

- `NoTeacher`: plain cross-entropy (no teacher.path, no teacher.cache);
- `LiveTeacher`: a teacher model runs on the micro-batch (no autograd graph) and
  engine.kernels.kd_head_loss / kd_loss compare it with the student;
- `CachedTeacher` (teacher.cache): no model runs; every batch carries the teacher's sparse
  targets (engine.data.teacher_cache.CachedTargets) and sparse_kd_head_loss / sparse_kd_loss
  compare them with the student.

Before a window's normaliser is counted, the loop hands the window to `prepare_window`, which
may replace micro-batches (on-policy distillation, engine/train/on_policy_signal.py: the
student writes them, the live teacher grades them); `window_metrics` adds the source's own
fields to the step's record, and `state_dict` / `load_state_dict` carry its random state in
checkpoints. The three sources above take the window as it is (`OffPolicy`).
"""

from __future__ import annotations

import contextlib
from typing import Any, Protocol

import torch
import torch.nn.functional as F

from engine.data.teacher_cache import TeacherCache, targets_of_batch
from engine.kernels import (
    ce_head_loss,
    kd_head_loss,
    kd_loss,
    sparse_kd_head_loss,
    sparse_kd_loss,
)
from engine.kernels.loss_spec import LossSpec
from engine.model.network import autocast_context, unwrap_model

LossAndStats = tuple[torch.Tensor, dict[str, torch.Tensor]]


class TeacherSignal(Protocol):
    """The teacher's part of a distillation micro-step (module docstring).

    `teaches`: False when there is no KD term (the step's "kd" is then not reported);
    `from_cache`: the batches carry the teacher's targets (held-out KD can read them there);
    `describe()`: one line for the run's log.
    `teacher_side` returns what the loss needs of the teacher for this micro-batch (hidden
    states, logits, targets or None); it runs before the student's forward and keeps no
    autograd graph. The two loss methods return (loss, stats) as the kernels do: the loss
    divided by `normalizer`, stats the detached fp32 sums "ce_sum", "kd_sum", "valid_tokens".
    `head_loss` runs inside the student's forward under FSDP (engine.train.fsdp.head_loss).
    """

    teaches: bool
    from_cache: bool

    def describe(self) -> str: ...

    def teacher_side(self, batch: dict, input_ids: torch.Tensor, spec: LossSpec,
                     autocast_dtype: torch.dtype | None) -> Any: ...

    def head_loss(self, side: Any, hidden: torch.Tensor, head: torch.Tensor,
                  labels: torch.Tensor, spec: LossSpec, *, normalizer,
                  chunk_tokens: int | None) -> LossAndStats: ...

    def logits_loss(self, side: Any, logits: torch.Tensor, labels: torch.Tensor,
                    spec: LossSpec, *, normalizer, inplace_grad: bool) -> LossAndStats: ...

    def prepare_window(self, window: list[dict], student: torch.nn.Module,
                       step: int) -> list[dict]: ...

    def window_metrics(self, step_seconds: float) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


class OffPolicy:
    """The window as the loader gave it: no fields of its own, no state to checkpoint."""

    def prepare_window(self, window, student, step):
        return window

    def window_metrics(self, step_seconds):
        return {}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, spec: LossSpec) -> torch.Tensor:
    """Summed token cross-entropy in fp32 over the first `spec.valid_vocab` logit columns."""
    valid_vocab = spec.valid_vocab
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        logits = logits[..., :valid_vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                           ignore_index=spec.ignore_index, reduction="sum")


class NoTeacher(OffPolicy):
    """Cross-entropy training: no teacher, the same normaliser semantics."""

    teaches = False
    from_cache = False

    def describe(self) -> str:
        return "no teacher (cross-entropy only)"

    def teacher_side(self, batch, input_ids, spec, autocast_dtype) -> None:
        return None

    def head_loss(self, side, hidden, head, labels, spec, *, normalizer, chunk_tokens):
        return ce_head_loss(hidden, head, labels, valid_vocab=spec.valid_vocab,
                            ignore_index=spec.ignore_index, normalizer=normalizer,
                            backend=spec.backend, chunk_tokens=chunk_tokens)

    def logits_loss(self, side, logits, labels, spec, *, normalizer, inplace_grad):
        ce_sum = cross_entropy_sum(logits, labels, spec)
        valid = (labels != spec.ignore_index).sum().to(torch.float32)
        divisor = normalizer if normalizer is not None else valid.clamp(min=1.0)
        return ce_sum / divisor, {
            "ce_sum": ce_sum.detach().float(),
            "kd_sum": torch.zeros((), dtype=torch.float32, device=logits.device),
            "valid_tokens": valid,
        }


def teacher_logits(teacher: torch.nn.Module, input_ids: torch.Tensor,
                   autocast_dtype: torch.dtype | None = None, *,
                   return_hidden: bool = False) -> torch.Tensor:
    """Teacher logits (or final hidden states) with no autograd graph: nothing of the teacher
    is kept for backward.

    no_grad rather than inference_mode: the loss may save these tensors for its own backward,
    and inference tensors cannot be saved by autograd. A teacher already stored in the
    autocast dtype runs without autocast: the same bf16 matmuls with fewer kernels.
    """
    if autocast_dtype is not None and next(teacher.parameters()).dtype == autocast_dtype:
        autocast_dtype = None
    with torch.no_grad(), autocast_context(input_ids.device.type, autocast_dtype):
        return teacher(input_ids, return_hidden=True) if return_hidden else teacher(input_ids)


class LiveTeacher(OffPolicy):
    """A teacher model run on every micro-batch. `model` may be a DDP / torch.compile / FSDP
    form of a GPTNeoX; a teacher head padded to more rows than the student's teaches through
    the shared rows (engine.train.setup.check_compatible). `gathered(model)` is a context that
    makes a sharded model's head whole (the strategy's head_gathered; None unsharded)."""

    teaches = True
    from_cache = False

    def __init__(self, model: torch.nn.Module, gathered=None):
        self.model, self.gathered = model, gathered or contextlib.nullcontext

    def describe(self) -> str:
        return "a live teacher model run on every micro-batch"

    def teacher_side(self, batch, input_ids, spec, autocast_dtype) -> torch.Tensor:
        """The teacher's final hidden states (spec.fused_head) or its logits."""
        return teacher_logits(self.model, input_ids, autocast_dtype,
                              return_hidden=spec.fused_head)

    def head_loss(self, side, hidden, head, labels, spec, *, normalizer, chunk_tokens):
        with self.gathered(self.model):  # a sharded teacher's head, whole for the loss
            t_head = unwrap_model(self.model).embed_out.weight[: head.shape[0]]
            return kd_head_loss(hidden, head, side, t_head, labels, normalizer=normalizer,
                                chunk_tokens=chunk_tokens, **spec.keywords())

    def logits_loss(self, side, logits, labels, spec, *, normalizer, inplace_grad):
        side = side[..., : logits.shape[-1]]  # a padded teacher head: the shared rows
        loss, stats = kd_loss(logits, side, labels, normalizer=normalizer,
                              inplace_grad=inplace_grad, **spec.keywords())
        return loss, dict(stats)


class CachedTeacher(OffPolicy):
    """The teacher of a run trained from a cache: no model, targets in every batch."""

    teaches = True
    from_cache = True

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

    def teacher_side(self, batch, input_ids, spec, autocast_dtype):
        return self.targets(batch, input_ids.device)

    def head_loss(self, side, hidden, head, labels, spec, *, normalizer, chunk_tokens):
        return sparse_kd_head_loss(hidden, head, side, labels, normalizer=normalizer,
                                   chunk_tokens=chunk_tokens, **spec.keywords())

    def logits_loss(self, side, logits, labels, spec, *, normalizer, inplace_grad):
        return sparse_kd_loss(logits, side, labels, normalizer=normalizer,
                              inplace_grad=inplace_grad, **spec.keywords())
