"""One distillation micro-step: teacher forward, student forward, KD+CE loss, backward.

The optimizer step is not here: a training step is several of these (gradient accumulation)
followed by clip + AdamW in engine.train. Keeping the micro-step a plain function lets the
loop, the benchmarks and the GPU suite run exactly the same code.

The loss is a *sum* over valid tokens divided by `normalizer`, the valid-token count of the
whole accumulation window across ranks. Dividing each micro-batch by its own count instead
would weigh tokens of short micro-batches more (the 2024 gradient-accumulation bug).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from kernels.kd_loss import kd_loss


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """torch.autocast for `dtype`, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a module's parameters (where its inputs must go)."""
    return next(model.parameters()).device


def teacher_logits(
    teacher: torch.nn.Module, input_ids: torch.Tensor, autocast_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Teacher logits with no autograd graph: nothing of the teacher is kept for backward.

    no_grad rather than inference_mode: the loss may save these logits for its own backward,
    and inference tensors cannot be saved by autograd.

    A teacher already stored in the autocast dtype runs without autocast: its matmuls see the
    same bf16 operands either way (autocast would only round-trip LayerNorm outputs through
    fp32 before casting them back for the next matmul), and skipping it removes a third of the
    teacher's kernels and copies, which matters on a launch-bound step (H200 profile,
    benchmarks/step_profile.py).
    """
    if autocast_dtype is not None and next(teacher.parameters()).dtype == autocast_dtype:
        autocast_dtype = None
    with torch.no_grad(), autocast_context(input_ids.device.type, autocast_dtype):
        return teacher(input_ids)


def cross_entropy_sum(
    logits: torch.Tensor, labels: torch.Tensor, *, valid_vocab: int | None, ignore_index: int = -100
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
) -> dict[str, torch.Tensor]:
    """Forward both models on `batch`, backpropagate the student's loss, return detached stats.

    `batch` holds "input_ids" and "labels" ([B, T] int64, labels already shifted, -100 =
    ignored). With `teacher=None` this is plain cross-entropy training with the same
    normaliser semantics (alpha and temperature are then unused). Gradients accumulate into
    the student's .grad; under DDP wrap the call in `student.no_sync()` on all but the last
    micro-step of a window (the forward must be inside no_sync too).

    `inplace_grad` lets the loss write d loss / d logits into the student's logits buffer
    (they are used by nothing else here: the head's backward needs its input and weight, not
    its output), saving one [tokens x vocab] buffer at the peak.

    Returns 0-dim fp32 tensors on the model's device, without a host sync: "loss" (this
    micro-batch's contribution to the window loss), "ce_sum", "kd_sum", "valid_tokens".
    """
    if "input_ids" not in batch or "labels" not in batch:
        raise ValueError(f"batch needs 'input_ids' and 'labels', got keys {sorted(batch)}")
    device = model_device(student)
    input_ids = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(
            f"batch input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} "
            "must both be [B, T]"
        )

    t_logits = None
    if teacher is not None:
        t_logits = teacher_logits(teacher, input_ids, autocast_dtype)
    with autocast_context(device.type, autocast_dtype):
        s_logits = student(input_ids)

    if t_logits is not None:
        loss, stats = kd_loss(
            s_logits,
            t_logits,
            labels,
            alpha=alpha,
            temperature=temperature,
            valid_vocab=valid_vocab,
            normalizer=normalizer,
            backend=backend,
            inplace_grad=inplace_grad,
        )
        stats = dict(stats)
    else:
        ce_sum = cross_entropy_sum(s_logits, labels, valid_vocab=valid_vocab)
        valid = (labels != -100).sum().to(torch.float32)
        divisor = normalizer if normalizer is not None else valid.clamp(min=1.0)
        loss = ce_sum / divisor
        stats = {
            "ce_sum": ce_sum.detach().float(),
            "kd_sum": torch.zeros((), dtype=torch.float32, device=device),
            "valid_tokens": valid,
        }
    loss.backward()
    stats["loss"] = loss.detach().float()
    return stats
