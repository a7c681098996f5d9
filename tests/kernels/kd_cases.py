"""Random inputs and error measures shared by the kd_loss tests (never zeros, odd shapes)."""

from __future__ import annotations

import torch

from kernels.kd_loss import kd_loss, kd_loss_reference

IGNORE = -100


def make_inputs(n, vocab, *, valid_vocab=None, dtype=torch.float32, kind="random", seed=0):
    """Student logits, teacher logits and labels for one test case.

    kind: "random" (N(0, 2^2) logits, ~20% ignored labels), "extreme" (uniform in +-1e4),
    "onehot_teacher" (teacher puts +60 on one column: p_t is one-hot to fp32 precision),
    "all_ignored" (every label is ignore_index).
    """
    gen = torch.Generator().manual_seed(seed)
    vv = valid_vocab or vocab
    if kind == "extreme":
        student = (torch.rand(n, vocab, generator=gen) * 2 - 1) * 1e4
        teacher = (torch.rand(n, vocab, generator=gen) * 2 - 1) * 1e4
    else:
        student = torch.randn(n, vocab, generator=gen) * 2.0
        teacher = torch.randn(n, vocab, generator=gen) * 2.0
    labels = torch.randint(0, vv, (n,), generator=gen)
    if kind == "onehot_teacher":
        hot = torch.randint(0, vv, (n,), generator=gen)
        teacher[torch.arange(n), hot] += 60.0
    if kind == "all_ignored":
        labels.fill_(IGNORE)
    else:
        ignored = torch.rand(n, generator=gen) < 0.2
        if n > 1:
            ignored[0] = True  # always mix at least one ignored token in
            ignored[1] = False
        labels[ignored] = IGNORE
    return student.to(dtype), teacher.to(dtype), labels


def reference_loss_and_grad(student, teacher, labels, **kwargs):
    """Float64 loss, gradient and stats of the reference on the (already rounded) inputs."""
    s64 = student.detach().double().requires_grad_(True)
    loss, stats = kd_loss_reference(s64, teacher.double(), labels, **kwargs)
    loss.backward()
    return loss.detach(), s64.grad, stats


def ours_loss_and_grad(student, teacher, labels, **kwargs):
    s = student.detach().clone().requires_grad_(True)
    loss, stats = kd_loss(s, teacher, labels, **kwargs)
    loss.backward()
    return loss.detach(), s.grad, stats


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    ours, ref = ours.double(), ref.double()
    denom = ref.norm().item()
    diff = (ours - ref).norm().item()
    return diff / denom if denom > 0 else diff


def tolerances(dtype):
    """(loss, grad) relative tolerances from the issue: fp32 1e-5 / 1e-4, bf16 / fp16 1e-2."""
    return (1e-5, 1e-4) if dtype in (torch.float32, torch.float64) else (1e-2, 1e-2)
