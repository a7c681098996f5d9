"""The compiled Triton kernels on a real GPU against the float64 reference: every divergence
through kd_loss, and kd_head_loss under the three training precisions.

Run in a fresh process with the interpreter off (tests/kernels/test_kernels_gpu.py; conftest
turns the interpreter on for the whole test session). Prints one JSON list of cases, each with
its errors, tolerances and "passed". `python -m tests.kernels.gpu_checks` works on its own too.
`run(cpu, smoke=True)` is the same code on tiny shapes through the interpreter, so this script
works the first time it meets a GPU.
"""

from __future__ import annotations

import json

import torch

from engine.kernels.divergences import DIVERGENCES
from engine.kernels.kd_head import kd_head_loss, kd_head_loss_reference
from engine.kernels.kd_loss import kd_loss, kd_loss_reference
from tests.kernels.kd_cases import make_inputs, rel_err, tolerances

EXTRA = {"jsd": {"beta": 0.3}, "skew_forward_kl": {"skew": 0.2}, "skew_reverse_kl": {"skew": 0.6}}


def _case(name, loss, ref_loss, grads, ref_grads, dtype):
    loss_tol, grad_tol = tolerances(dtype)
    errors = [rel_err(loss, ref_loss)] + [rel_err(g, r) for g, r in zip(grads, ref_grads,
                                                                        strict=True)]
    finite = all(bool(torch.isfinite(t).all()) for t in (loss, *grads))
    passed = finite and errors[0] <= loss_tol and all(e <= grad_tol for e in errors[1:])
    return {"case": name, "errors": errors, "tolerances": [loss_tol, grad_tol],
            "finite": finite, "passed": passed}


def divergence_cases(device, smoke=False):
    shapes = (
        (300, 50304, 50277, torch.bfloat16, "random"),
        (7, 32003, 32000, torch.float32, "random"),
        (5, 50304, 50277, torch.float32, "onehot_teacher"),
    )
    if smoke:
        shapes = tuple((min(n, 3), 301, 297, dtype, kind) for n, _, _, dtype, kind in shapes)
    cases = []
    for divergence in DIVERGENCES:
        for n, vocab, valid_vocab, dtype, kind in shapes:
            student, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab,
                                                   dtype=dtype, kind=kind, seed=n)
            kwargs = dict(alpha=0.5, temperature=2.0, valid_vocab=valid_vocab,
                          divergence=divergence, **EXTRA.get(divergence, {}))
            s64 = student.double().requires_grad_(True)
            ref, _ = kd_loss_reference(s64, teacher.double(), labels, **kwargs)
            ref.backward()
            s = student.to(device).requires_grad_(True)
            loss, _ = kd_loss(s, teacher.to(device), labels.to(device), backend="triton",
                              **kwargs)
            loss.backward()
            cases.append(_case(f"kd_loss {divergence} {n}x{vocab} {dtype} {kind}",
                               loss.cpu(), ref, [s.grad.cpu()], [s64.grad], dtype))
    return cases


def head_cases(device, smoke=False):
    gen = torch.Generator().manual_seed(0)
    n, hs, ht, vocab = (12, 16, 24, 301) if smoke else (1000, 512, 768, 50304)
    tensors = [torch.randn(n, hs, generator=gen), torch.randn(vocab, hs, generator=gen) / 11,
               torch.randn(n, ht, generator=gen), torch.randn(vocab, ht, generator=gen) / 14]
    labels = torch.randint(0, vocab - 27, (n,), generator=gen)
    labels[::7] = -100
    cases = []
    for precision, dtype, autocast in (("fp32", torch.float32, False),
                                       ("bf16-pure", torch.bfloat16, False),
                                       ("bf16-autocast", torch.float32, True)):
        inputs = [t.to(dtype).detach() for t in tensors]
        kwargs = dict(alpha=0.5, temperature=2.0, valid_vocab=vocab - 27, divergence="forward_kl")
        ref_in = [t.to(torch.float64, copy=True).requires_grad_(i < 2)
                  for i, t in enumerate(inputs)]
        ref, _ = kd_head_loss_reference(*ref_in, labels, **kwargs)
        ref.backward()
        for chunk in (None, 5 if smoke else 256):
            ours = [t.to(device, copy=True).requires_grad_(i < 2) for i, t in enumerate(inputs)]
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss, _ = kd_head_loss(*ours, labels.to(device), backend="triton",
                                       chunk_tokens=chunk, **kwargs)
            loss.backward()
            cases.append(_case(f"kd_head_loss {precision} chunk={chunk}", loss.cpu(), ref,
                               [ours[0].grad.cpu(), ours[1].grad.cpu()],
                               [ref_in[0].grad, ref_in[1].grad],
                               torch.bfloat16 if precision != "fp32" else torch.float32))
            cases[-1]["grad_dtypes_ok"] = ours[0].grad.dtype == ours[1].grad.dtype == dtype
            cases[-1]["passed"] = cases[-1]["passed"] and cases[-1]["grad_dtypes_ok"]
    return cases


def run(device, smoke=False) -> list[dict]:
    return divergence_cases(device, smoke) + head_cases(device, smoke)


def main():
    print(json.dumps(run(torch.device("cuda"))))


if __name__ == "__main__":
    main()
