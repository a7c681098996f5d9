"""Every divergence in the Triton kernel (TRITON_INTERPRET=1, set by conftest) against the
float64 reference.

The interpreter costs ~0.1 s per 50k-column row and pass, so instead of the torch path's full
grid (tests/kernels/test_divergences.py) this runs a covering set: every divergence and every
beta / skew value of the issue, each T, alpha and dtype several times over, ignored tokens and
valid_vocab < V throughout, one Pythia-sized row block per kernel variant and the extreme,
one-hot and zero-probability inputs for every kernel variant.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from engine.kernels.divergences import DIVERGENCES
from tests.kernels.kd_cases import (
    ALPHAS,
    DIVERGENCE_CASES,
    TEMPERATURES,
    case_id,
    check_against_reference,
    make_inputs,
)

pytest.importorskip("triton")
pytestmark = [pytest.mark.filterwarnings("ignore"), pytest.mark.usefixtures("one_thread")]

# Case i of the grid gets temperature i mod 4, alpha i mod 3 and alternating dtypes: across the
# 18 cases every (T, alpha) pair and both dtypes appear several times.
_DTYPES = (torch.float32, torch.bfloat16)
COVERING = [
    (case, TEMPERATURES[i % 4], ALPHAS[i % 3], _DTYPES[i % 2])
    for i, case in enumerate(DIVERGENCE_CASES)
]


@pytest.mark.parametrize(("case", "temperature", "alpha", "dtype"), COVERING,
                         ids=lambda v: case_id(v) if isinstance(v, tuple) else str(v))
def test_triton_small_vocab(case, temperature, alpha, dtype):
    divergence, extra = case
    student, teacher, labels = make_inputs(6, 301, valid_vocab=297, dtype=dtype, seed=6)
    check_against_reference(student, teacher, labels, backend="triton", divergence=divergence,
                            extra=extra, valid_vocab=297, temperatures=(temperature,),
                            alphas=(alpha,))


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_pythia_vocab(divergence):
    """Many 1024-column blocks, the masked padding columns and a partial last block."""
    extra = {"beta": 0.3} if divergence == "jsd" else {"skew": 0.2}
    student, teacher, labels = make_inputs(2, 50304, valid_vocab=50277, seed=7)
    labels[0] = 5  # one ignored and one scored row whatever the random draw
    labels[1] = -100
    check_against_reference(student, teacher, labels, backend="triton", divergence=divergence,
                            extra=extra, valid_vocab=50277, temperatures=(2.0,), alphas=(0.5,))


@pytest.mark.parametrize(("divergence", "kind"),
                         list(itertools.product(DIVERGENCES,
                                                ("extreme", "onehot_teacher", "zero_prob"))))
def test_triton_extreme_inputs(divergence, kind):
    extra = {"beta": 0.7} if divergence == "jsd" else {"skew": 0.1}
    student, teacher, labels = make_inputs(5, 200, valid_vocab=190, kind=kind, seed=8)
    check_against_reference(student, teacher, labels, backend="triton", divergence=divergence,
                            extra=extra, valid_vocab=190, temperatures=(0.5, 4.0),
                            alphas=(0.0, 0.5), saturated=kind == "extreme")


def test_rising_maximum_moves_the_reverse_kl_pivot():
    """Logits that grow along the row move the student's running max (and the reverse-KL
    pivot) in every block; 128-column blocks force many of them."""
    from engine.kernels.kd_loss_triton import kd_loss_forward_triton
    from engine.kernels.loss_spec import LossOptions, inverse_normalizer
    from tests.kernels.kd_cases import reference_loss_and_grad, rel_err

    student, teacher, labels = make_inputs(4, 1000, valid_vocab=990, seed=9)
    student += torch.linspace(0, 40, 1000)
    teacher -= torch.linspace(0, 25, 1000)
    kwargs = dict(alpha=0.4, temperature=1.7, valid_vocab=990)
    _, ref_grad, ref_stats = reference_loss_and_grad(student, teacher, labels,
                                                     divergence="reverse_kl", **kwargs)
    grad = torch.empty_like(student)
    inv_norm = inverse_normalizer(None, (labels != -100).sum())
    options = LossOptions(ignore_index=-100, divergence="reverse_kl", **kwargs)
    _, kd_sum = kd_loss_forward_triton(student, teacher, labels, grad, options,
                                       inv_norm=inv_norm, block_size=128)
    assert rel_err(kd_sum, ref_stats["kd_sum"]) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-4


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_triton_every_temperature_odd_rows_padded_vocab(divergence):
    """Each divergence at T = 0.5, 1, 2 and 4 on odd N with valid_vocab < V: the per-lane
    statistics and the base-2 constants c = log2(e) / T at every temperature of the issue."""
    extra = {"beta": 0.4} if divergence == "jsd" else {"skew": 0.3}
    student, teacher, labels = make_inputs(5, 67, valid_vocab=61, seed=23)
    check_against_reference(student, teacher, labels, backend="triton", divergence=divergence,
                            extra=extra, valid_vocab=61, temperatures=TEMPERATURES,
                            alphas=(0.5,))
