"""The sparse (teacher cache) loss: chunked PyTorch path and Triton kernel against the float64
reference, on top-k and sampled targets, odd shapes, ignored tokens, valid_vocab < V, fp32 /
bf16; k = V against the dense kd_loss; the memory modes, errors and the fused head."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch

from engine.kernels.kd_loss import kd_loss_reference
from engine.kernels.sparse_kd import sparse_kd_loss, sparse_kd_reference
from engine.kernels.sparse_kd_head import sparse_kd_head_loss, sparse_kd_head_loss_reference
from tests.kernels.kd_cases import close, make_inputs, rel_err, tolerances
from tests.kernels.sparse_cases import (
    as_float32,
    ours_loss_and_grad,
    reference_loss_and_grad,
    sampled_case,
    top_k_case,
)

pytestmark = pytest.mark.usefixtures("one_thread")
BF16, FP32 = torch.bfloat16, torch.float32


def check_case(student, targets, labels, *, backend, valid_vocab, temperature, alphas):
    loss_tol, grad_tol = tolerances(student.dtype)
    for alpha in alphas:
        kwargs = dict(alpha=alpha, temperature=temperature, valid_vocab=valid_vocab)
        ref_loss, ref_grad, ref_stats = reference_loss_and_grad(student, targets, labels,
                                                                **kwargs)
        loss, grad, stats = ours_loss_and_grad(student, as_float32(targets), labels,
                                               backend=backend, **kwargs)
        case = f"{backend} T={temperature} alpha={alpha}"
        assert torch.isfinite(loss) and torch.isfinite(grad).all(), case
        assert close(loss, ref_loss, loss_tol), case
        assert close(grad, ref_grad, grad_tol), case
        assert close(stats["kd_sum"], ref_stats["kd_sum"], loss_tol), case
        assert grad.dtype == student.dtype
        assert torch.count_nonzero(grad[labels == -100]) == 0, case
        if valid_vocab is not None:
            assert torch.count_nonzero(grad[:, valid_vocab:]) == 0, case


@pytest.mark.parametrize("kind", ["random", "extreme", "onehot_teacher", "zero_prob"])
@pytest.mark.parametrize("dtype", [FP32, BF16], ids=str)
@pytest.mark.parametrize("width", [1, 7, 64, "sampled"])
def test_torch_path_against_float64_reference(kind, dtype, width):
    n, vocab, valid_vocab = 37, 331, 300
    student, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab, dtype=dtype,
                                           kind=kind, seed=len(kind) + n)
    for temperature in (0.5, 2.0):
        if width == "sampled":
            targets = sampled_case(teacher, 16, temperature, valid_vocab, seed=n)
        else:
            targets = top_k_case(teacher, width, temperature, valid_vocab)
        check_case(student, targets, labels, backend="torch", valid_vocab=valid_vocab,
                   temperature=temperature, alphas=(0.0, 0.5, 1.0))


# (n, vocab, valid_vocab, width, temperature, dtype, kind): every feature at least once.
TRITON_CASES = [
    (37, 331, 300, 7, 2.0, FP32, "random"),
    (37, 331, None, "sampled", 0.5, BF16, "random"),
    (9, 1000, 999, 64, 1.0, FP32, "extreme"),
    (9, 1000, None, 1000, 2.0, FP32, "onehot_teacher"),  # k = V: no tail
    (7, 2100, 2090, 1500, 4.0, BF16, "zero_prob"),  # more listed ids than a column block
    (3, 50304, 50277, 64, 2.0, BF16, "random"),
]


@pytest.mark.parametrize(("n", "vocab", "valid_vocab", "width", "temperature", "dtype", "kind"),
                         TRITON_CASES, ids=str)
def test_triton_against_float64_reference(n, vocab, valid_vocab, width, temperature, dtype,
                                          kind):
    pytest.importorskip("triton")
    student, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab, dtype=dtype,
                                           kind=kind, seed=vocab)
    vv = valid_vocab or vocab
    targets = sampled_case(teacher, 32, temperature, vv) if width == "sampled" else \
        top_k_case(teacher, width, temperature, vv)
    check_case(student, targets, labels, backend="triton", valid_vocab=valid_vocab,
               temperature=temperature, alphas=(0.5,))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_k_equal_to_vocabulary_is_the_dense_forward_kl(backend):
    """Every column listed: the sparse loss is kd_loss's forward KL, value and gradient."""
    if backend == "triton":
        pytest.importorskip("triton")
    student, teacher, labels = make_inputs(23, 130, valid_vocab=120, seed=5)
    targets = top_k_case(teacher, 120, 2.0, 120, ragged=False)
    s64 = student.double().requires_grad_(True)
    dense, dense_stats = kd_loss_reference(s64, teacher.double(), labels, valid_vocab=120)
    dense.backward()
    loss, grad, stats = ours_loss_and_grad(student, as_float32(targets), labels,
                                           valid_vocab=120, backend=backend)
    assert close(loss, dense.detach(), 1e-5)
    assert close(grad, s64.grad, 1e-4)
    assert close(stats["kd_sum"], dense_stats["kd_sum"], 1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_tail_is_exact_when_the_listed_columns_hold_almost_all_student_mass(backend):
    """q_U ~ e^-40 while the teacher keeps 30% in its tail: 1 - sum(listed q) would be 0 in
    fp32 and the loss infinite or wrong; the unlisted log-sum-exp keeps it exact."""
    if backend == "triton":
        pytest.importorskip("triton")
    student, teacher, labels = make_inputs(6, 200, seed=9)
    targets = top_k_case(teacher, 10, 1.0, 200, ragged=False)
    targets = replace(targets, log_mass=targets.log_mass + math.log(0.7),
                      log_tail=torch.full((6,), math.log(0.3), dtype=torch.float64))
    student = student.scatter(1, targets.ids.long(), 80.0)  # listed columns 80 above the rest
    check_case(student, targets, labels, backend=backend, valid_vocab=None, temperature=1.0,
               alphas=(0.0,))


def test_gradcheck_float64():
    student, teacher, labels = make_inputs(5, 13, seed=1)
    targets = top_k_case(teacher, 4, 2.0, 13)
    s = student.double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sparse_kd_loss(x, targets, labels, backend="torch")[0], (s,))


def test_memory_modes_and_second_backward_agree():
    student, teacher, labels = make_inputs(17, 90, seed=2)
    targets = as_float32(top_k_case(teacher, 5, 2.0, 90))
    _, grad, _ = ours_loss_and_grad(student, targets, labels)
    s = student.clone().requires_grad_(True)
    loss, _ = sparse_kd_loss(s, targets, labels)
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    s.grad = None
    loss.backward()
    assert torch.equal(first, grad) and torch.equal(s.grad, grad)
    logits = student.clone().requires_grad_(True)
    in_place = logits * 1.0  # a non-leaf the loss may overwrite
    loss, _ = sparse_kd_loss(in_place, targets, labels, inplace_grad=True)
    loss.backward()
    assert torch.allclose(logits.grad, grad, rtol=0, atol=1e-7)


def test_refused_divergences_and_bad_targets_name_the_problem():
    student, teacher, labels = make_inputs(6, 40, seed=3)
    targets = as_float32(top_k_case(teacher, 4, 2.0, 40, ragged=False))
    with pytest.raises(ValueError, match=r"reverse_kl.*cannot be computed from a teacher cache"):
        sparse_kd_loss(student, targets, labels, divergence="reverse_kl")
    unsorted = targets.ids.clone()
    unsorted[3, [0, 1]] = unsorted[3, [1, 0]]
    bad = [
        (replace(targets, ids=unsorted), r"ids\[3\].*ascending"),
        (replace(targets, ids=targets.ids + 37), r"ids\[\d+, \d\] = \d+ is outside \[0, 40\)"),
        (replace(targets, count=targets.count + 1), r"count\[0\] = 5 is outside \[0, 4\]"),
        (replace(targets, log_mass=targets.log_mass[:, :3]), "log_mass"),
    ]
    for wrong, message in bad:
        with pytest.raises(ValueError, match=message):
            sparse_kd_loss(student, wrong, labels)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fused_head_against_float64_reference(backend):
    if backend == "triton":
        pytest.importorskip("triton")
    gen = torch.Generator().manual_seed(4)
    n, hidden, vocab, valid_vocab = 41, 24, 150, 141
    h = torch.randn(n, hidden, generator=gen)
    w = torch.randn(vocab, hidden, generator=gen) * 0.3
    _, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab, seed=4)
    targets = top_k_case(teacher, 6, 2.0, valid_vocab)
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    ref, ref_stats = sparse_kd_head_loss_reference(h64, w64, targets, labels,
                                                   valid_vocab=valid_vocab)
    ref.backward()
    hs, ws = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    loss, stats = sparse_kd_head_loss(hs, ws, as_float32(targets), labels,
                                      valid_vocab=valid_vocab, backend=backend, chunk_tokens=9)
    loss.backward()
    assert close(loss, ref.detach(), 1e-5)
    assert close(hs.grad, h64.grad, 1e-4) and close(ws.grad, w64.grad, 1e-4)
    assert close(stats["kd_sum"], ref_stats["kd_sum"], 1e-5)
    assert hs.grad.dtype == FP32 and ws.grad.dtype == FP32
    logits_loss, _ = sparse_kd_reference(h @ w.t(), as_float32(targets), labels,
                                         valid_vocab=valid_vocab)
    assert close(loss, logits_loss, 1e-5)


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_triton_persistent_in_place_with_easy_and_hard_tails(temperature):
    """Four programs over nine rows, the gradient written over the logits. Rows 0, 3 and 6
    put their listed columns 30 above the rest (listed share ~1: the exact-tail pass), the
    others are random (log(1 - listed share)); top-k targets with a tail, ragged counts."""
    pytest.importorskip("triton")
    from engine.kernels.loss_spec import LossOptions, inverse_normalizer
    from engine.kernels.sparse_kd_triton import sparse_kd_forward_triton

    student, teacher, labels = make_inputs(9, 331, valid_vocab=300, seed=31)
    targets = top_k_case(teacher, 7, temperature, 300)
    hard = torch.tensor([0, 3, 6])
    lifted = torch.zeros_like(student).scatter_(1, targets.ids.long(), 30.0)
    lifted[:, 300:] = 0.0
    student[hard] += lifted[hard] * (torch.arange(7) < targets.count[hard, None]).any(1)[:, None]
    kwargs = dict(alpha=0.5, temperature=temperature, valid_vocab=300)
    _, ref_grad, ref_stats = reference_loss_and_grad(student, targets, labels, **kwargs)
    flat = as_float32(targets)
    logits = student.clone()
    inv_norm = inverse_normalizer(None, (labels != -100).sum())
    ce_sum, kd_sum = sparse_kd_forward_triton(logits, flat, labels, logits,
                                              LossOptions(ignore_index=-100, **kwargs),
                                              inv_norm=inv_norm, programs=4)
    assert close(ce_sum, ref_stats["ce_sum"], 1e-5)
    assert close(kd_sum, ref_stats["kd_sum"], 1e-5)
    assert close(logits, ref_grad, 1e-4)


def test_triton_duplicate_or_descending_ids_make_the_row_nan():
    """On a GPU the targets are not checked (a host sync); a repeated id must not be counted
    twice silently: that row's KD becomes NaN, the other rows stay finite."""
    pytest.importorskip("triton")
    from engine.kernels.loss_spec import LossOptions, inverse_normalizer
    from engine.kernels.sparse_kd_triton import sparse_kd_forward_triton

    student, teacher, labels = make_inputs(4, 50, seed=32)
    labels[:] = torch.tensor([1, 2, 3, 4])
    targets = as_float32(top_k_case(teacher, 5, 2.0, 50, ragged=False))
    ids = targets.ids.clone()
    ids[1, 2] = ids[1, 1]
    kd_rows = []
    for row in range(4):
        one = targets.select(torch.tensor([row]))
        if row == 1:
            one = replace(one, ids=ids[1:2])
        _, kd = sparse_kd_forward_triton(
            student[row:row + 1], one, labels[row:row + 1], None,
            LossOptions(alpha=0.5, temperature=2.0, ignore_index=-100, valid_vocab=50),
            inv_norm=inverse_normalizer(None, labels[:1]))
        kd_rows.append(kd)
    assert torch.isnan(kd_rows[1])
    assert all(torch.isfinite(kd_rows[row]) for row in (0, 2, 3))


def test_compiled_sparse_kernel_has_no_histogram_or_atomics_and_orders_its_stores():
    """The sm_90 TTGIR: no tl.histogram (ballots, popcounts, shared atomics and barriers per
    element) and no atomics anywhere; a barrier between the label load and the first store."""
    pytest.importorskip("triton")
    from engine.kernels.sparse_kd_triton import launch_config, list_block
    from tests.kernels.ttgir import barrier_between_label_load_and_first_store, compiled_ttgir

    block, warps = launch_config(50304)
    ttgir = compiled_ttgir("engine.kernels.sparse_kd_triton", "sparse_kd_fwd_bwd_kernel",
                           {"WRITE_GRAD": True, "BLOCK_SIZE": block,
                            "LIST_BLOCK": list_block(64)}, warps)
    assert "tt.histogram" not in ttgir
    assert "atomic" not in ttgir
    assert barrier_between_label_load_and_first_store(ttgir)


def test_fused_head_weight_gradient_is_rounded_once():
    """bf16 head: d weight over 32 chunks is as close to float64 as in one chunk (the sparse
    head shares the chunked head's loop: summed in fp32, rounded to bf16 once)."""
    gen = torch.Generator().manual_seed(6)
    n, hidden, vocab, valid_vocab = 2048, 32, 1024, 1000
    h = torch.randn(n, hidden, generator=gen).bfloat16()
    w = (torch.randn(vocab, hidden, generator=gen) * 0.3).bfloat16()
    _, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab, seed=6)
    targets = top_k_case(teacher, 8, 2.0, valid_vocab)
    w64 = w.double().requires_grad_(True)
    logits = h.double() @ w64.t()
    logits = logits + (logits.bfloat16().double() - logits).detach()  # the bf16 matmul's output
    ref, _ = sparse_kd_reference(logits, targets, labels, valid_vocab=valid_vocab)
    ref.backward()
    errors = {}
    for chunk in (n, n // 32):
        ws = w.clone().requires_grad_(True)
        loss, _ = sparse_kd_head_loss(h, ws, as_float32(targets), labels, valid_vocab=valid_vocab,
                                      backend="torch", chunk_tokens=chunk)
        loss.backward()
        errors[chunk] = rel_err(ws.grad, w64.grad)
    assert errors[n // 32] <= 1.1 * errors[n], errors
