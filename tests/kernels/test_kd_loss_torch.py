"""The chunked PyTorch path against the float64 reference over the issue's full grid."""

from __future__ import annotations

import pytest
import torch

import engine.kernels.divergences as divergences
from engine.kernels.kd_loss import kd_loss_reference
from tests.kernels.kd_cases import (
    make_inputs,
    ours_loss_and_grad,
    reference_loss_and_grad,
    rel_err,
    tolerances,
)

VOCABS = ((1000, None), (50277, None), (50304, 50277))
# 300 rows x 50k vocab in float64 costs ~5 s per reference call on the shared 2-core machine, so
# those shapes run the full T x alpha grid in a separate slow test with one dtype each.
SHAPES = [(n, vocab, vv) for n in (1, 7, 300) for vocab, vv in VOCABS if n < 300 or vocab < 50000]
# Between them the two big cases still visit every temperature.
BIG_SHAPES = [
    (300, 50277, None, torch.float32, (0.5, 2.0)),
    (300, 50304, 50277, torch.bfloat16, (1.0, 4.0)),
]
TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
ALPHAS = (0.0, 0.5, 1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(("n", "vocab", "valid_vocab"), SHAPES, ids=lambda v: str(v))
def test_full_grid_against_float64_reference(n, vocab, valid_vocab, dtype):
    """Every N x V x T x alpha x dtype combination, with ignored tokens mixed in."""
    check_grid(n, vocab, valid_vocab, dtype)


@pytest.mark.slow
@pytest.mark.parametrize(("n", "vocab", "valid_vocab", "dtype", "temperatures"), BIG_SHAPES,
                         ids=str)
def test_300_rows_big_vocab(n, vocab, valid_vocab, dtype, temperatures):
    check_grid(n, vocab, valid_vocab, dtype, temperatures)


def check_grid(n, vocab, valid_vocab, dtype, temperatures=TEMPERATURES):
    """Our path at every T and alpha against the float64 reference.

    The reference loss and gradient are linear in alpha and the CE part does not depend on T, so
    the reference runs once for CE and once per T for KD, then is combined; our path runs at
    every (T, alpha) on its own.
    """
    student, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab, dtype=dtype,
                                           seed=n + vocab)
    loss_tol, grad_tol = tolerances(dtype)
    ref_ce, ref_ce_grad, _ = reference_loss_and_grad(student, teacher, labels, alpha=1.0,
                                                     valid_vocab=valid_vocab)
    for temperature in temperatures:
        common = dict(temperature=temperature, valid_vocab=valid_vocab)
        ref_kd, ref_kd_grad, _ = reference_loss_and_grad(student, teacher, labels, alpha=0.0,
                                                         **common)
        for alpha in ALPHAS:
            ref_loss = (1 - alpha) * ref_kd + alpha * ref_ce
            ref_grad = (1 - alpha) * ref_kd_grad + alpha * ref_ce_grad
            loss, grad, stats = ours_loss_and_grad(student, teacher, labels, alpha=alpha,
                                                   backend="torch", **common)
            case = f"T={temperature} alpha={alpha}"
            assert torch.isfinite(loss), case
            assert rel_err(loss, ref_loss) <= loss_tol, case
            assert rel_err(grad, ref_grad) <= grad_tol, case
            assert grad.dtype == dtype
            if valid_vocab is not None:
                assert torch.count_nonzero(grad[:, valid_vocab:]) == 0, case
            assert torch.count_nonzero(grad[labels == -100]) == 0, case
        valid = (labels != -100).sum()
        assert stats["valid_tokens"].item() == valid.item()
        assert rel_err(stats["ce_sum"], ref_ce * valid.clamp_min(1)) <= loss_tol
        assert rel_err(stats["kd_sum"], ref_kd * valid.clamp_min(1)) <= loss_tol


@pytest.mark.parametrize("kind", ["extreme", "onehot_teacher"])
@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_extreme_and_onehot_inputs(kind, temperature):
    for vocab, valid_vocab in ((1000, None), (50304, 50277)):
        student, teacher, labels = make_inputs(7, vocab, valid_vocab=valid_vocab, kind=kind,
                                               seed=3)
        kwargs = dict(alpha=0.5, temperature=temperature, valid_vocab=valid_vocab)
        ref_loss, ref_grad, _ = reference_loss_and_grad(student, teacher, labels, **kwargs)
        loss, grad, _ = ours_loss_and_grad(student, teacher, labels, backend="torch", **kwargs)
        assert torch.isfinite(loss) and torch.isfinite(grad).all()
        assert rel_err(loss, ref_loss) <= 1e-5
        assert rel_err(grad, ref_grad) <= 1e-4


def test_row_chunks_with_a_remainder(monkeypatch):
    """Small chunks force several row blocks plus a short last one through the same code."""
    monkeypatch.setattr(divergences, "CHUNK_ELEMENTS", 3 * 1000)
    student, teacher, labels = make_inputs(11, 1000, valid_vocab=997, seed=5)
    kwargs = dict(alpha=0.3, temperature=1.5, valid_vocab=997)
    ref_loss, ref_grad, _ = reference_loss_and_grad(student, teacher, labels, **kwargs)
    loss, grad, _ = ours_loss_and_grad(student, teacher, labels, backend="torch", **kwargs)
    assert rel_err(loss, ref_loss) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-4


def test_gradcheck_on_the_reference():
    torch.manual_seed(0)
    student = (torch.randn(4, 9, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(4, 9, dtype=torch.float64) * 2
    labels = torch.tensor([3, -100, 0, 6])

    def loss_of(s):
        return kd_loss_reference(s, teacher, labels, alpha=0.3, temperature=1.7,
                                 valid_vocab=7)[0]

    assert torch.autograd.gradcheck(loss_of, (student,))


def test_reference_matches_the_textbook_composite():
    """The reference equals kl_div(batchmean-free) * T^2 and cross_entropy written by torch.nn."""
    torch.manual_seed(1)
    student = torch.randn(6, 50, dtype=torch.float64)
    teacher = torch.randn(6, 50, dtype=torch.float64)
    labels = torch.tensor([1, 2, -100, 4, 49, 0])
    temperature, alpha = 2.0, 0.25
    loss, stats = kd_loss_reference(student, teacher, labels, alpha=alpha,
                                    temperature=temperature)
    keep = labels != -100
    kl = torch.nn.functional.kl_div(
        torch.log_softmax(student[keep] / temperature, -1),
        torch.log_softmax(teacher[keep] / temperature, -1),
        reduction="sum",
        log_target=True,
    )
    ce = torch.nn.functional.cross_entropy(student, labels, reduction="sum")
    expected = ((1 - alpha) * temperature**2 * kl + alpha * ce) / keep.sum()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(stats["ce_sum"], ce.float())
