"""One distillation micro-step, and the training step made of them.

`distill_micro_step`: teacher forward, student forward, KD + CE loss, backward. A plain
function, so the loop, the benchmarks and the GPU suite run exactly the same code. With
`fused_head` (loss.fused_head, the default) both models stop at their final hidden states and
engine.kernels.kd_head_loss runs both LM heads inside the loss, chunk by chunk, so neither model's
[tokens x vocab] logits ever exist; without it the models return full logits for kd_loss.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine import dist
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.kd_loss import ce_head_loss, kd_head_loss, kd_loss
from engine.model.network import model_device, unwrap_model
from engine.precision import autocast_context
from engine.train.fsdp import clip_grad_norm, gathered_root, through_head
from engine.train.teacher_source import CachedTeacher, cached_micro_loss


def teacher_logits(
    teacher: torch.nn.Module,
    input_ids: torch.Tensor,
    autocast_dtype: torch.dtype | None = None,
    *,
    return_hidden: bool = False,
) -> torch.Tensor:
    """Teacher logits (or final hidden states) with no autograd graph: nothing of the teacher
    is kept for backward.

    no_grad rather than inference_mode: the loss may save these tensors for its own backward,
    and inference tensors cannot be saved by autograd. A teacher already stored in the
    autocast dtype runs without autocast: the same bf16 matmuls with a third fewer kernels
    (see benchmarks/README.md, step profile).
    """
    if autocast_dtype is not None and next(teacher.parameters()).dtype == autocast_dtype:
        autocast_dtype = None
    with torch.no_grad(), autocast_context(input_ids.device.type, autocast_dtype):
        return teacher(input_ids, return_hidden=True) if return_hidden else teacher(input_ids)


def cross_entropy_sum(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    valid_vocab: int | None,
    ignore_index: int = IGNORE_INDEX,
) -> torch.Tensor:
    """Summed token cross-entropy in fp32 over the first `valid_vocab` logit columns."""
    vocab = logits.shape[-1]
    if valid_vocab is not None and valid_vocab < vocab:
        logits = logits[..., :valid_vocab]
    return F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(),
        labels.reshape(-1),
        ignore_index=ignore_index,
        reduction="sum",
    )


def distill_micro_step(
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    *,
    alpha: float,
    temperature: float,
    valid_vocab: int | None,
    normalizer: float | torch.Tensor | None,
    autocast_dtype: torch.dtype | None = None,
    backend: str = "auto",
    inplace_grad: bool = True,
    fused_head: bool = True,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    skew: float = 0.1,
    t2_scale: bool = True,
    chunk_tokens: int | None = None,
) -> dict[str, torch.Tensor]:
    """Forward both models on `batch`, backpropagate the student's loss, return detached stats.

    `batch` holds "input_ids" and "labels" ([B, T] int64, labels already shifted,
    IGNORE_INDEX = ignored). With `teacher=None` this is plain cross-entropy training with the
    same normaliser semantics; with a CachedTeacher (teacher.cache) no teacher runs and the
    batch carries the cached targets (engine/train/teacher_source.py), through the fused head
    or the logits as for a live teacher. Gradients accumulate into the student's .grad; under
    DDP wrap the call in `student.no_sync()` on all but the last micro-step of a window (the forward
    too). `student` may be a DDP / torch.compile wrapper of a GPTNeoX: the forward runs through
    it (`return_hidden=True` with the fused head); the head weight is the inner module's.

    `fused_head`: the loss runs both heads (engine.kernels.kd_head_loss, or ce_head_loss without a
    teacher; `chunk_tokens` overrides its chunk rule). Otherwise `inplace_grad` lets kd_loss
    write d loss / d logits into the student's logits buffer (nothing else here uses them:
    the head's backward needs its input and weight, not its output), saving one
    [tokens x vocab] buffer at the peak.

    Returns 0-dim fp32 tensors on the model's device, without a host sync: "loss" (this
    micro-batch's contribution to the window loss), "ce_sum", "kd_sum", "valid_tokens".
    """
    input_ids, labels = _batch_on_device(batch, model_device(student))
    loss_args = dict(alpha=alpha, temperature=temperature, valid_vocab=valid_vocab,
                     normalizer=normalizer, autocast_dtype=autocast_dtype, backend=backend,
                     divergence=divergence, beta=beta, skew=skew, t2_scale=t2_scale)
    if isinstance(teacher, CachedTeacher):  # no teacher runs: its targets come with the batch
        loss, stats = cached_micro_loss(student, batch, input_ids, labels, fused_head=fused_head,
                                        inplace_grad=inplace_grad, chunk_tokens=chunk_tokens,
                                        **loss_args)
    elif fused_head:
        loss, stats = _fused_head_loss(student, teacher, input_ids, labels,
                                       chunk_tokens=chunk_tokens, **loss_args)
    else:
        loss, stats = _logits_loss(student, teacher, input_ids, labels,
                                   inplace_grad=inplace_grad, **loss_args)
    loss.backward()
    return {**stats, "loss": loss.detach().float()}


def _logits_loss(student, teacher, input_ids, labels, *, autocast_dtype, valid_vocab,
                 normalizer, backend, inplace_grad, alpha, temperature, **divergence_args):
    """(loss, stats) of the micro-batch from both models' full logits (loss.fused_head false):
    kd_loss, or the cross-entropy alone without a teacher."""
    device = input_ids.device
    t_logits = None
    if teacher is not None:
        t_logits = teacher_logits(teacher, input_ids, autocast_dtype)
    with autocast_context(device.type, autocast_dtype):
        s_logits = student(input_ids)
    if t_logits is not None:
        t_logits = t_logits[..., : s_logits.shape[-1]]  # a padded teacher head: the shared rows
        loss, stats = kd_loss(s_logits, t_logits, labels, alpha=alpha, temperature=temperature,
                              valid_vocab=valid_vocab, normalizer=normalizer, backend=backend,
                              inplace_grad=inplace_grad, **divergence_args)
        return loss, dict(stats)
    ce_sum = cross_entropy_sum(s_logits, labels, valid_vocab=valid_vocab)
    valid = (labels != IGNORE_INDEX).sum().to(torch.float32)
    divisor = normalizer if normalizer is not None else valid.clamp(min=1.0)
    return ce_sum / divisor, {
        "ce_sum": ce_sum.detach().float(),
        "kd_sum": torch.zeros((), dtype=torch.float32, device=device),
        "valid_tokens": valid,
    }


def _fused_head_loss(student, teacher, input_ids, labels, *, autocast_dtype, valid_vocab,
                     normalizer, backend, chunk_tokens, alpha, temperature, **divergence_args):
    """(loss, stats) of the micro-batch with both heads inside the loss: no logits tensor.

    The loss runs under the student's autocast, so its head matmuls take the autocast dtype
    as F.linear would; the loss math itself is fp32 whatever the context."""
    t_hidden = None
    if teacher is not None:
        t_hidden = teacher_logits(teacher, input_ids, autocast_dtype, return_hidden=True)

    def head_loss(s_hidden, head):
        if t_hidden is None:
            return ce_head_loss(s_hidden, head, labels, valid_vocab=valid_vocab,
                                normalizer=normalizer, backend=backend, chunk_tokens=chunk_tokens)
        with gathered_root(teacher):  # a sharded teacher's head, whole for the loss
            # A teacher head padded to more rows than the student's teaches through the
            # shared rows (engine.train.setup.check_compatible).
            t_head = unwrap_model(teacher).embed_out.weight[: head.shape[0]]
            return kd_head_loss(
                s_hidden, head, t_hidden, t_head, labels,
                alpha=alpha, temperature=temperature, valid_vocab=valid_vocab,
                normalizer=normalizer, backend=backend, chunk_tokens=chunk_tokens,
                **divergence_args)

    with autocast_context(input_ids.device.type, autocast_dtype):
        return through_head(student, input_ids, head_loss)


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


def window_normalizer(window: list[dict[str, torch.Tensor]], device) -> torch.Tensor:
    """Valid label tokens of the whole accumulation window, summed over ranks (at least 1)."""
    local_valid = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window)
    total = torch.tensor(float(local_valid), dtype=torch.float32, device=device)
    return dist.all_reduce_sum(total).clamp(min=1.0)


def train_step(
    model: torch.nn.Module,
    student: torch.nn.Module,
    teacher: torch.nn.Module | None,
    optimizer: torch.optim.Optimizer,
    window: list[dict[str, torch.Tensor]],
    *,
    loss_settings: dict,
    max_grad_norm: float,
    lr: float,
    stop_requested: bool,
) -> StepResult:
    """Micro-steps over `window`, clip, one all-reduce, then the optimizer step at `lr`.

    `model` is what runs the forward (the student, or its DDP / compiled wrapper); `student`
    owns the parameters. `loss_settings` are distill_micro_step's keyword arguments (alpha,
    temperature, valid_vocab, autocast_dtype, backend, fused_head, divergence, beta, skew,
    t2_scale). The update is skipped, and the
    gradient dropped, when the loss or the gradient norm is not finite.
    """
    device = model_device(student)
    normalizer = window_normalizer(window, device)
    sums = torch.zeros(4, dtype=torch.float32, device=device)  # loss, ce, kd, valid
    for i, batch in enumerate(window):
        # DDP all-reduces gradients only on the window's last micro-batch.
        skip_sync = hasattr(model, "no_sync") and i < len(window) - 1
        with model.no_sync() if skip_sync else contextlib.nullcontext():
            stats = distill_micro_step(
                model, teacher, batch, normalizer=normalizer, **loss_settings
            )
        sums += torch.stack(
            [stats["loss"], stats["ce_sum"], stats["kd_sum"], stats["valid_tokens"]]
        )
    grad_norm = clip_grad_norm(student.parameters(), max_grad_norm)  # DTensors too (FSDP)
    flag = torch.tensor([1.0 if stop_requested else 0.0], device=device)
    totals = dist.all_reduce_sum(torch.cat([sums, flag]))
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
