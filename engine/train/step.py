"""One distillation micro-step, and the training step made of them.

`distill_micro_step`: the teacher's side of the micro-batch, the student's forward, the loss
the LossSpec describes, backward. One path whatever the teacher: the teacher signal
(engine/train/teacher_signal.py: none, a live model, a cache) computes its side and the loss.
A plain function, so the loop, the benchmarks and the GPU suite run exactly the same code.
With `fused_head` (loss.fused_head, the default) the student stops at its final hidden states
and the loss runs the LM heads chunk by chunk (engine.kernels.kd_head_loss), so no
[tokens x vocab] logits ever exist; without it the student returns full logits.

`train_step`: one optimizer step = one accumulation window of micro-batches per rank. The
loss of every micro-batch is a *sum* over valid tokens divided by one normaliser, the valid
tokens of the whole window across ranks, so the accumulated gradient equals that of one big
batch (dividing each micro-batch by its own count would weigh tokens of short micro-batches
more: the 2024 gradient-accumulation bug). Then clip, one all-reduce of the step's numbers,
and the optimizer step unless something is non-finite. The definitions are in docs/loss.md.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.model.network import autocast_context, model_device, unwrap_model

if TYPE_CHECKING:  # annotations only: the step runs whatever signal and spec it is given
    from engine.kernels.loss_spec import LossSpec
    from engine.train.teacher_signal import TeacherSignal


def plain_head_loss(model: torch.nn.Module, input_ids: torch.Tensor, loss_fn):
    """loss_fn(final hidden states, head weight): the forward (through its DDP / compile
    wrapper) stops at the hidden states, then the loss runs the head: one graph for
    torch.compile, no new function per call to guard on. (FSDP's: fsdp.head_loss.)"""
    return loss_fn(model(input_ids, return_hidden=True), unwrap_model(model).embed_out.weight)


def plain_clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_; with max_norm inf (optim.grad_clip 0) only the norm, no pass
    over the gradients. (FSDP's: fsdp.clip_grad_norm.)"""
    parameters = list(parameters)
    if math.isfinite(max_norm):
        return torch.nn.utils.clip_grad_norm_(parameters, max_norm)
    return torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])


def one_process_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of one process: the tensor itself."""
    return tensor


@dataclass(frozen=True)
class StepHooks:
    """Where a step meets the run's parallelism (engine/train/strategy.py gives them): the
    head loss through the wrapped student, gradient clipping, and the sum over ranks. The
    defaults are one process's, so the step itself never asks how the run is spread."""

    head_loss: Callable = plain_head_loss
    clip_grad_norm: Callable = plain_clip_grad_norm
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] = one_process_sum


ONE_PROCESS = StepHooks()


def distill_micro_step(
    student: torch.nn.Module,
    teacher: TeacherSignal,
    batch: dict[str, torch.Tensor],
    spec: LossSpec,
    *,
    normalizer: float | torch.Tensor | None,
    autocast_dtype: torch.dtype | None = None,
    inplace_grad: bool = True,
    chunk_tokens: int | None = None,
    head_loss=plain_head_loss,
) -> dict[str, torch.Tensor]:
    """Forward both models on `batch`, backpropagate the student's loss, return detached stats.

    `batch` holds "input_ids" and "labels" ([B, T] int64, labels already shifted,
    IGNORE_INDEX = ignored). `teacher` is the micro-step's teacher signal
    (engine/train/teacher_signal.py: NoTeacher for cross-entropy alone, a LiveTeacher, a
    CachedTeacher whose targets ride in the batch, ...); `spec` (engine.kernels.LossSpec)
    says what the loss computes. Gradients accumulate into the
    student's .grad; under DDP wrap the call in `student.no_sync()` on all but the last
    micro-step of a window (the forward too). `student` may be a DDP / torch.compile wrapper
    of a GPTNeoX: the forward runs through it; the head weight is the inner module's.
    `head_loss(student, input_ids, loss_fn)` runs the fused head + loss through the student
    (the run's strategy gives it: plain_head_loss, or under FSDP fsdp.head_loss).

    With spec.fused_head the student stops at its final hidden states and the signal's
    head_loss runs the head inside the loss (`chunk_tokens` overrides its chunk rule), under
    the student's autocast, so the head matmuls take the autocast dtype as F.linear would.
    Otherwise the signal's logits_loss gets the student's full logits; `inplace_grad` lets it
    write d loss / d logits into them (nothing else here uses them: the head's backward needs
    its input and weight, not its output), saving one [tokens x vocab] buffer at the peak.

    Returns 0-dim fp32 tensors on the model's device, without a host sync: "loss" (this
    micro-batch's contribution to the window loss), "ce_sum", "kd_sum", "valid_tokens".
    """
    input_ids, labels = _batch_on_device(batch, model_device(student))
    side = teacher.teacher_side(batch, input_ids, spec, autocast_dtype)
    autocast = autocast_context(input_ids.device.type, autocast_dtype)
    if spec.fused_head:
        with autocast:
            loss, stats = head_loss(student, input_ids, lambda hidden, head: teacher.head_loss(
                side, hidden, head, labels, spec, normalizer=normalizer,
                chunk_tokens=chunk_tokens))
    else:
        with autocast:
            s_logits = student(input_ids)
        loss, stats = teacher.logits_loss(side, s_logits, labels, spec, normalizer=normalizer,
                                         inplace_grad=inplace_grad)
    loss.backward()
    return {**stats, "loss": loss.detach().float()}


def _batch_on_device(batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(f"batch needs 'input_ids' and 'labels', got keys {sorted(batch)}")
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(
            f"batch input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} "
            "must both be [B, T]"
        )
    return input_ids, labels


# --------------------------------------------------------------------------------------
# The training step
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepResult:
    """One optimizer step's numbers, summed over the window and over ranks."""

    loss: float
    ce_sum: float
    kd_sum: float
    valid_tokens: float
    grad_norm: float
    stop_votes: float  # ranks that received SIGTERM/SIGINT during the step
    applied: bool  # False when the loss or gradient was non-finite and the update skipped


def window_normalizer(window: list[dict[str, torch.Tensor]], device, ignore_index: int,
                      all_reduce_sum=one_process_sum) -> torch.Tensor:
    """Valid label tokens of the whole accumulation window, summed over ranks (at least 1)."""
    local_valid = sum(int((b["labels"] != ignore_index).sum()) for b in window)
    total = torch.tensor(float(local_valid), dtype=torch.float32, device=device)
    return all_reduce_sum(total).clamp(min=1.0)


def train_step(
    model: torch.nn.Module,
    student: torch.nn.Module,
    teacher: TeacherSignal,
    optimizer: torch.optim.Optimizer,
    window: list[dict[str, torch.Tensor]],
    *,
    spec: LossSpec,
    autocast_dtype: torch.dtype | None,
    max_grad_norm: float,
    lr: float,
    stop_requested: bool,
    hooks: StepHooks = ONE_PROCESS,
) -> StepResult:
    """Micro-steps over `window`, clip, one all-reduce, then the optimizer step at `lr`.

    `model` is what runs the forward (the student, or its DDP / compiled wrapper); `student`
    owns the parameters; `teacher` and `spec` as for distill_micro_step; `hooks` come from
    the run's strategy (one process's by default). The update is skipped, and the gradient
    dropped, when the loss or the gradient norm is not finite.
    """
    device = model_device(student)
    normalizer = window_normalizer(window, device, spec.ignore_index, hooks.all_reduce_sum)
    sums = torch.zeros(4, dtype=torch.float32, device=device)  # loss, ce, kd, valid
    for i, batch in enumerate(window):
        # DDP all-reduces gradients only on the window's last micro-batch.
        skip_sync = hasattr(model, "no_sync") and i < len(window) - 1
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            stats = distill_micro_step(model, teacher, batch, spec, normalizer=normalizer,
                                       autocast_dtype=autocast_dtype,
                                       head_loss=hooks.head_loss)
        sums += torch.stack(
            [stats["loss"], stats["ce_sum"], stats["kd_sum"], stats["valid_tokens"]]
        )
    grad_norm = hooks.clip_grad_norm(student.parameters(), max_grad_norm)
    flag = torch.tensor([1.0 if stop_requested else 0.0], device=device)
    totals = hooks.all_reduce_sum(torch.cat([sums, flag]))
    # One host sync per step: the grad norm (already global after DDP's all-reduce) rides
    # along with the summed stats instead of taking a sync of its own.
    loss, ce_sum, kd_sum, valid, stop_votes, norm = torch.cat(
        [totals, grad_norm.reshape(1).to(totals)]
    ).tolist()
    applied = math.isfinite(loss) and math.isfinite(norm)
    if applied:
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, ce_sum, kd_sum, valid, norm, stop_votes, applied)
