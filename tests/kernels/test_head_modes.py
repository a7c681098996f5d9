"""The fused head's two other modes: forward only (evaluation) and CE only (no teacher).

Forward only: under torch.no_grad the head forms no gradient (no gradient matmul, no logit
gradient written by the loss kernel on either backend) and gives the same numbers. CE only:
`ce_head_loss` equals cross-entropy of the head's logits (float64 reference), with gradients.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.kd_head import ce_head_loss, kd_head_loss
from engine.kernels.loss_spec import LossOptions, LossSpec, loss_and_grad
from tests.kernels.alloc_tracking import AllocationRecorder
from tests.kernels.kd_cases import make_inputs, rel_err, tolerances
from tests.kernels.test_kd_head import head_inputs

pytestmark = pytest.mark.usefixtures("one_thread")

BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.filterwarnings("ignore"))]


def _options(**overrides):
    settings = dict(alpha=0.4, temperature=2.0, ignore_index=-100, valid_vocab=250,
                    divergence="jsd", beta=0.3, skew=0.1, t2_scale=True)
    settings.update(overrides)
    return LossOptions.of(LossSpec(**settings), settings["valid_vocab"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_loss_kernel_forward_only_writes_nothing_and_agrees(backend, divergence):
    if backend == "triton":
        pytest.importorskip("triton")
    s, t, labels = make_inputs(9, 257, valid_vocab=250, seed=1)
    options = _options(divergence=divergence)
    inv_norm = torch.tensor(1 / 7.0)
    grad = torch.empty_like(s)
    with_grad = loss_and_grad(backend, s, t, labels, grad, inv_norm, options)
    before = s.clone()
    forward_only = loss_and_grad(backend, s, t, labels, None, inv_norm, options)
    assert torch.equal(s, before)
    for a, b in zip(with_grad, forward_only, strict=True):
        assert rel_err(b, a) <= 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_head_under_no_grad_does_no_gradient_work(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    h_s, w_s, h_t, w_t, labels = head_inputs(shape=(40,), seed=11)
    kwargs = dict(valid_vocab=1000, divergence="reverse_kl", chunk_tokens=16, backend=backend)
    hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss, stats = kd_head_loss(hs, ws, h_t, w_t, labels, **kwargs)
    with torch.no_grad(), AllocationRecorder() as rec:
        eval_loss, eval_stats = kd_head_loss(hs, ws, h_t, w_t, labels, **kwargs)
    assert not eval_loss.requires_grad
    assert rel_err(eval_loss, loss.detach()) <= 1e-6
    assert rel_err(eval_stats["kd_sum"], stats["kd_sum"]) <= 1e-6
    # Three chunks, two head matmuls each, and nothing else: no d hidden / d weight.
    assert rec.ops.count("aten.mm.out") + rec.ops.count("aten.mm.default") == 6
    assert hs.numel() * 4 not in rec.sizes and ws.numel() * 4 not in rec.sizes


def _ce_reference(hidden, weight, labels, valid_vocab, normalizer):
    """Float64 loss, d hidden, d weight of plain cross-entropy; bf16 logits rounded as the bf16
    matmul rounds them (identity gradient), as in test_kd_head.reference_grads."""
    h64 = hidden.detach().double().requires_grad_(True)
    w64 = weight.detach().double().requires_grad_(True)
    logits = h64 @ w64.t()
    if hidden.dtype != torch.float32:
        logits = logits + (logits.to(hidden.dtype).double() - logits).detach()
    loss = F.cross_entropy(logits[:, :valid_vocab], labels, reduction="sum") / normalizer
    loss.backward()
    return loss.detach(), h64.grad, w64.grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_ce_head_loss_against_float64_cross_entropy(backend, dtype):
    if backend == "triton":
        pytest.importorskip("triton")
    h_s, w_s, _, _, labels = head_inputs(shape=(29,), dtype=dtype, seed=12)
    hs, ws = h_s.clone().requires_grad_(True), w_s.clone().requires_grad_(True)
    loss, stats = ce_head_loss(hs, ws, labels, valid_vocab=1000, normalizer=31.0,
                               chunk_tokens=8, backend=backend)
    loss.backward()
    ref_loss, ref_h, ref_w = _ce_reference(h_s, w_s, labels, 1000, 31.0)
    loss_tol, grad_tol = tolerances(dtype)
    assert rel_err(loss, ref_loss) <= loss_tol
    assert rel_err(hs.grad, ref_h) <= grad_tol and rel_err(ws.grad, ref_w) <= grad_tol
    assert stats["kd_sum"] == 0 and stats["valid_tokens"] == (labels != -100).sum()
    assert rel_err(stats["ce_sum"], ref_loss * 31.0) <= loss_tol
    with torch.no_grad():
        eval_loss, _ = ce_head_loss(hs, ws, labels, valid_vocab=1000, normalizer=31.0,
                                    chunk_tokens=8, backend=backend)
    assert rel_err(eval_loss, loss.detach()) <= 1e-6


def test_ce_head_loss_checks_its_inputs():
    h_s, w_s, _, _, labels = head_inputs(seed=13)
    with pytest.raises(ValueError, match=r"student_weight \(1003, 5\)"):
        ce_head_loss(h_s, w_s[:, :5], labels)
    with pytest.raises(ValueError, match="labels' shape"):
        ce_head_loss(h_s, w_s, labels[:3])
