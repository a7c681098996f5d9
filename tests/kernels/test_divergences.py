"""Every divergence on the chunked PyTorch path against the float64 reference, and the
reference against the definitions (issue 13: odd shapes, T, alpha, beta / skew, dtypes)."""

from __future__ import annotations

import math

import pytest
import torch

from engine.kernels.divergences import DIVERGENCES, divergence_reference
from engine.kernels.kd_loss import kd_loss, kd_loss_reference
from tests.kernels.kd_cases import (
    DIVERGENCE_CASES,
    case_id,
    check_against_reference,
    make_inputs,
    ours_loss_and_grad,
)

pytestmark = pytest.mark.usefixtures("one_thread")

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_torch_path_full_grid(case, dtype):
    """Each divergence x beta/skew x T x alpha x dtype, odd small shapes and a Pythia row."""
    divergence, extra = case
    for n, vocab, valid_vocab in ((7, 1000, 997), (1, 333, None)):
        student, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab, dtype=dtype,
                                               seed=n + vocab)
        check_against_reference(student, teacher, labels, backend="torch",
                                divergence=divergence, extra=extra, valid_vocab=valid_vocab)
    student, teacher, labels = make_inputs(3, 50304, valid_vocab=50277, dtype=dtype, seed=4)
    check_against_reference(student, teacher, labels, backend="torch", divergence=divergence,
                            extra=extra, valid_vocab=50277, temperatures=(0.5, 4.0),
                            alphas=(0.5,))


@pytest.mark.parametrize("kind", ["extreme", "onehot_teacher", "zero_prob"])
@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_torch_path_extreme_inputs(case, kind):
    """|logit| up to 1e4, one-hot teachers and exactly-zero probabilities: finite and exact."""
    divergence, extra = case
    student, teacher, labels = make_inputs(7, 1000, valid_vocab=993, kind=kind, seed=5)
    check_against_reference(student, teacher, labels, backend="torch", divergence=divergence,
                            extra=extra, valid_vocab=993, temperatures=(0.5, 4.0),
                            alphas=(0.0, 0.5), saturated=kind == "extreme")


@pytest.mark.parametrize("case", DIVERGENCE_CASES, ids=case_id)
def test_gradcheck_float64(case):
    """Autograd's numerical gradient of the chunked path agrees with its hand-written one
    (float64 end to end; T^2 off, the factor itself is checked by test_t2_scale_*)."""
    divergence, extra = case
    gen = torch.Generator().manual_seed(3)
    student = (torch.randn(3, 9, generator=gen, dtype=torch.float64) * 2).requires_grad_(True)
    teacher = torch.randn(3, 9, generator=gen, dtype=torch.float64) * 2
    labels = torch.tensor([3, -100, 6])

    def loss_of(s):
        return kd_loss(s, teacher, labels, alpha=0.3, temperature=1.7, valid_vocab=8,
                       divergence=divergence, t2_scale=False, backend="torch", **extra)[0]

    assert torch.autograd.gradcheck(loss_of, (student,))


@pytest.mark.parametrize(("general", "plain"), [
    (("jsd", {"beta": 0.0}), "forward_kl"),
    (("jsd", {"beta": 1.0}), "reverse_kl"),
    (("skew_forward_kl", {"skew": 0.0}), "forward_kl"),
    (("skew_reverse_kl", {"skew": 0.0}), "reverse_kl"),
], ids=str)
def test_ends_equal_the_plain_kls(general, plain):
    student, teacher, labels = make_inputs(6, 120, seed=7)
    name, extra = general
    for backend in ("reference", "torch"):
        fn = kd_loss_reference if backend == "reference" else kd_loss
        s = student.double().requires_grad_(True)
        loss, _ = fn(s, teacher.double(), labels, alpha=0.2, divergence=name, **extra)
        (grad,) = torch.autograd.grad(loss, s)
        s_plain = student.double().requires_grad_(True)
        loss_plain, _ = fn(s_plain, teacher.double(), labels, alpha=0.2, divergence=plain)
        (grad_plain,) = torch.autograd.grad(loss_plain, s_plain)
        torch.testing.assert_close(loss, loss_plain, rtol=1e-12, atol=0)
        torch.testing.assert_close(grad, grad_plain, rtol=1e-10, atol=1e-15)


def test_reference_matches_independent_formulas():
    """The reference's per-row values against the definitions computed from probabilities."""
    gen = torch.Generator().manual_seed(8)
    log_p = torch.log_softmax(torch.randn(5, 40, generator=gen, dtype=torch.float64), -1)
    log_q = torch.log_softmax(torch.randn(5, 40, generator=gen, dtype=torch.float64), -1)
    p, q = log_p.exp(), log_q.exp()

    def kl(a, b):
        return (a * (a / b).log()).sum(-1)

    beta, skew = 0.3, 0.2
    m = beta * p + (1 - beta) * q
    expected = {
        "forward_kl": kl(p, q),
        "reverse_kl": kl(q, p),
        "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m),
        "skew_forward_kl": kl(p, skew * p + (1 - skew) * q),
        "skew_reverse_kl": kl(q, skew * q + (1 - skew) * p),
        "tvd": 0.5 * (p - q).abs().sum(-1),
    }
    assert set(expected) == set(DIVERGENCES)
    for name, value in expected.items():
        got = divergence_reference(name, log_p, log_q, beta=beta, skew=skew)
        torch.testing.assert_close(got, value, rtol=1e-12, atol=1e-14, msg=name)


def test_jsd_half_is_symmetric_and_bounded():
    """JSD(1/2) is symmetric in student and teacher and at most log 2 (times T^2)."""
    student, teacher, labels = make_inputs(5, 64, seed=9)
    kwargs = dict(alpha=0.0, temperature=1.0, divergence="jsd", beta=0.5, normalizer=1.0)
    for backend in ("torch", "reference"):
        fn = kd_loss_reference if backend == "reference" else kd_loss
        forward, stats = fn(student.double(), teacher.double(), labels, **kwargs)
        swapped, _ = fn(teacher.double(), student.double(), labels, **kwargs)
        torch.testing.assert_close(forward, swapped, rtol=1e-10, atol=0)
        assert 0 < stats["kd_sum"] <= stats["valid_tokens"] * math.log(2)


def test_t2_scale_off_divides_the_kd_term_by_t_squared():
    student, teacher, labels = make_inputs(5, 90, seed=10)
    for divergence in DIVERGENCES:
        kwargs = dict(alpha=0.0, temperature=3.0, divergence=divergence)
        on_loss, on_grad, on_stats = ours_loss_and_grad(student, teacher, labels, **kwargs)
        off_loss, off_grad, off_stats = ours_loss_and_grad(student, teacher, labels,
                                                           t2_scale=False, **kwargs)
        torch.testing.assert_close(off_loss * 9.0, on_loss)
        torch.testing.assert_close(off_grad * 9.0, on_grad)
        torch.testing.assert_close(off_stats["kd_sum"] * 9.0, on_stats["kd_sum"])


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(divergence="kl"), "divergence='kl' must be one of"),
    (dict(divergence="jsd", beta=1.5), "beta=1.5 must be in"),
    (dict(divergence="jsd", beta=float("nan")), "beta=nan must be in"),
    (dict(divergence="skew_forward_kl", skew=-0.1), "skew=-0.1 must be in"),
    (dict(skew="0.1"), "skew='0.1' must be a number"),
    (dict(beta=True), "beta=True must be a number"),
    (dict(t2_scale=1), "t2_scale=1 must be True or False"),
])
def test_bad_divergence_arguments_name_the_problem(kwargs, match):
    student, teacher, labels = make_inputs(3, 20, seed=11)
    with pytest.raises(ValueError, match=match):
        kd_loss(student, teacher, labels, **kwargs)
    if "t2_scale" not in kwargs:
        with pytest.raises(ValueError, match=match):
            kd_loss_reference(student, teacher, labels, **kwargs)


def test_unused_beta_and_skew_are_ignored():
    """beta only shapes jsd and skew only the skew KLs: forward_kl does not read them."""
    student, teacher, labels = make_inputs(4, 50, seed=12)
    plain, _ = kd_loss(student, teacher, labels)
    other, _ = kd_loss(student, teacher, labels, beta=0.9, skew=0.7)
    assert torch.equal(plain, other)
