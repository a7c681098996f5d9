"""The Triton kernel (TRITON_INTERPRET=1 on CPU, set by conftest) against the float64 reference.

The interpreter costs ~0.1 s per 50k-column row, so instead of the full grid this runs a covering
set: every N, V, T, alpha, dtype and input kind of the issue appears at least once, big
vocabularies included (tests/kernels/test_kd_loss_torch.py runs the full grid on the torch path).
"""

from __future__ import annotations

import pytest
import torch

from engine.kernels.loss_spec import inverse_normalizer
from tests.kernels.kd_cases import (
    make_inputs,
    ours_loss_and_grad,
    reference_loss_and_grad,
    rel_err,
    tolerances,
)

triton = pytest.importorskip("triton")

BF16, FP32 = torch.bfloat16, torch.float32
# (n, vocab, valid_vocab, temperature, alpha, dtype, kind)
COVERING = [
    (300, 1000, None, 0.5, 0.5, FP32, "random"),
    (300, 1000, None, 4.0, 0.0, BF16, "random"),
    (7, 50277, None, 1.0, 0.0, BF16, "random"),
    (7, 50304, 50277, 2.0, 1.0, FP32, "random"),
    (1, 50304, 50277, 4.0, 0.5, BF16, "random"),
    (1, 50277, None, 0.5, 1.0, FP32, "random"),
    (7, 1000, None, 2.0, 0.5, FP32, "extreme"),
    (5, 50304, 50277, 0.5, 0.5, FP32, "extreme"),
    (7, 1000, None, 0.5, 1.0, FP32, "onehot_teacher"),
    (7, 1000, None, 4.0, 0.5, BF16, "onehot_teacher"),
    (3, 50304, 50277, 1.0, 0.5, FP32, "onehot_teacher"),
    (7, 1000, 999, 1.0, 1.0, BF16, "random"),
]


@pytest.mark.parametrize(
    ("n", "vocab", "valid_vocab", "temperature", "alpha", "dtype", "kind"), COVERING, ids=str
)
def test_triton_against_float64_reference(n, vocab, valid_vocab, temperature, alpha, dtype,
                                          kind):
    student, teacher, labels = make_inputs(n, vocab, valid_vocab=valid_vocab, dtype=dtype,
                                           kind=kind, seed=n * 31 + vocab)
    kwargs = dict(alpha=alpha, temperature=temperature, valid_vocab=valid_vocab)
    ref_loss, ref_grad, ref_stats = reference_loss_and_grad(student, teacher, labels, **kwargs)
    loss, grad, stats = ours_loss_and_grad(student, teacher, labels, backend="triton", **kwargs)
    loss_tol, grad_tol = tolerances(dtype)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert rel_err(loss, ref_loss) <= loss_tol
    assert rel_err(grad, ref_grad) <= grad_tol
    assert grad.dtype == dtype
    assert torch.count_nonzero(grad[labels == -100]) == 0
    if valid_vocab is not None:
        assert torch.count_nonzero(grad[:, valid_vocab:]) == 0
    assert stats["valid_tokens"].item() == ref_stats["valid_tokens"].item()
    assert rel_err(stats["ce_sum"], ref_stats["ce_sum"]) <= loss_tol
    assert rel_err(stats["kd_sum"], ref_stats["kd_sum"]) <= loss_tol


def test_many_blocks_with_a_rising_maximum():
    """Small blocks and logits that grow along the row: the running max changes every block,
    so the online rescaling of all three sums is exercised, with a partial last block."""
    from engine.kernels.kd_loss_triton import kd_loss_forward_triton
    from engine.kernels.loss_spec import LossOptions

    student, teacher, labels = make_inputs(5, 1000, valid_vocab=990, seed=11)
    student += torch.linspace(0, 40, 1000)
    teacher += torch.linspace(0, 25, 1000)
    kwargs = dict(alpha=0.4, temperature=1.7, valid_vocab=990)
    _, ref_grad, ref_stats = reference_loss_and_grad(student, teacher, labels, **kwargs)
    grad = torch.empty_like(student)
    valid = labels != -100
    inv_norm = inverse_normalizer(None, valid.sum())
    ce_sum, kd_sum = kd_loss_forward_triton(student, teacher, labels, grad,
                                            LossOptions(ignore_index=-100, **kwargs),
                                            inv_norm=inv_norm, block_size=128, num_warps=4)
    assert rel_err(ce_sum, ref_stats["ce_sum"]) <= 1e-5
    assert rel_err(kd_sum, ref_stats["kd_sum"]) <= 1e-5
    assert rel_err(grad, ref_grad) <= 1e-4


def test_out_of_range_label_gives_nan_not_garbage():
    """On a GPU a bad label cannot raise without a host sync; the kernel makes its CE NaN."""
    from engine.kernels.kd_loss_triton import kd_loss_forward_triton
    from engine.kernels.loss_spec import LossOptions

    student, teacher, _ = make_inputs(3, 64, seed=2)
    labels = torch.tensor([5, 64, -100])
    grad = torch.empty_like(student)
    ce_sum, kd_sum = kd_loss_forward_triton(
        student, teacher, labels, grad,
        LossOptions(alpha=0.5, temperature=2.0, ignore_index=-100, valid_vocab=64),
        inv_norm=torch.tensor(0.5),
    )
    assert torch.isnan(ce_sum)
    assert torch.isfinite(kd_sum)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_persistent_grid_and_in_place_match_the_reference(divergence):
    """Three programs over seven rows (each program loops over rows pid, pid + 3, ...), the
    gradient written over the student logits themselves, against float64."""
    from engine.kernels.kd_loss_triton import kd_loss_forward_triton
    from engine.kernels.loss_spec import LossOptions

    student, teacher, labels = make_inputs(7, 301, valid_vocab=297, seed=21)
    kwargs = dict(alpha=0.5, temperature=0.5, valid_vocab=297, divergence=divergence)
    _, ref_grad, ref_stats = reference_loss_and_grad(student, teacher, labels, **kwargs)
    inv_norm = inverse_normalizer(None, (labels != -100).sum())
    logits = student.clone()
    ce_sum, kd_sum = kd_loss_forward_triton(logits, teacher, labels, logits,
                                            LossOptions(ignore_index=-100, **kwargs),
                                            inv_norm=inv_norm, block_size=64, programs=3)
    assert rel_err(ce_sum, ref_stats["ce_sum"]) <= 1e-5
    assert rel_err(kd_sum, ref_stats["kd_sum"]) <= 1e-5
    assert rel_err(logits, ref_grad) <= 1e-4


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_compiled_kernel_has_a_barrier_between_the_label_load_and_the_first_store(divergence):
    """The in-place race (issue 24, item 1) cannot show in the interpreter: read the sm_90
    TTGIR instead. Every warp must pass a CTA barrier after loading s[label] and before the
    first gradient store of the same row, or one warp could overwrite s[label] before another
    has read it. forward_kl and reverse_kl have no reduction between the two that would order
    them by accident."""
    from engine.kernels.divergences import DIVERGENCES
    from engine.kernels.kd_loss_triton import launch_config
    from tests.kernels.ttgir import barrier_between_label_load_and_first_store, compiled_ttgir

    block, warps = launch_config(50304, divergence)
    ttgir = compiled_ttgir("engine.kernels.kd_loss_triton", "kd_loss_fwd_bwd_kernel",
                           {"DIVERGENCE": DIVERGENCES.index(divergence), "WRITE_GRAD": True,
                            "BLOCK_SIZE": block}, warps)
    assert barrier_between_label_load_and_first_store(ttgir), \
        "no barrier between the load of s[label] and the first gradient store"
