"""The head that never writes logits (kd_head_loss(backend="epilogue"), TRITON_INTERPRET=1 set by
conftest) against the float64 reference: loss, d hidden and d weight on small odd shapes
(N 37, V 300 with valid_vocab 291, Hs 24 / Ht 40), every T of the grid, with launch tiles small
enough that every loop runs more than once (several token blocks, vocabulary tiles, splits and
hidden-dimension steps, each with a ragged end)."""

from __future__ import annotations

import pytest
import torch

from engine.kernels import head_epilogue_triton
from engine.kernels.kd_head import kd_head_loss, merge_statistics
from tests.kernels.kd_cases import ALPHAS, TEMPERATURES, rel_err
from tests.kernels.test_kd_head import fused_grads, head_inputs, reference_grads

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore")]
pytest.importorskip("triton")

SHAPE = dict(shape=(37,), hs=24, ht=40, vocab=300, valid_vocab=291)


@pytest.fixture
def small_tiles(monkeypatch):
    """16-row, 32-column, 16-deep tiles: 3 token blocks, 10 vocabulary tiles in 3 splits of 4
    (the last with 2 tiles past the vocabulary), 2-3 K steps each, every one ragged."""
    monkeypatch.setattr(head_epilogue_triton, "launch_config", lambda *_: (16, 32, 16, 4))
    monkeypatch.setattr(head_epilogue_triton, "TARGET_PROGRAMS", 9)


@pytest.mark.parametrize("temperature", TEMPERATURES)
def test_loss_and_gradients_against_float64(small_tiles, temperature):
    inputs = head_inputs(**SHAPE, seed=7)
    common = dict(valid_vocab=291, temperature=temperature)
    for alpha in ALPHAS:
        ref = reference_grads(*inputs, alpha=alpha, **common)
        ours = fused_grads(*inputs, alpha=alpha, backend="epilogue", chunk_tokens=16, **common)
        case = f"T={temperature} alpha={alpha}"
        assert rel_err(ours[0], ref[0]) <= 2e-6, case
        assert rel_err(ours[1], ref[1]) <= 2e-5, case
        assert rel_err(ours[2], ref[2]) <= 2e-5, case
        assert rel_err(ours[3]["ce_sum"], ref[3]["ce_sum"]) <= 2e-6, case
        assert rel_err(ours[3]["kd_sum"], ref[3]["kd_sum"]) <= 2e-5, case


def test_bf16_against_float64_and_the_chunked_path():
    """bf16 heads: within the bf16 tolerance of float64, like the chunked Triton path (the
    epilogue keeps fp32 logits where the chunked path rounds them to bf16)."""
    inputs = head_inputs(**SHAPE, dtype=torch.bfloat16, seed=8)
    common = dict(valid_vocab=291, temperature=2.0, alpha=0.5)
    ref = reference_grads(*inputs, **common)
    ours = fused_grads(*inputs, backend="epilogue", **common)
    chunked = fused_grads(*inputs, backend="triton", **common)
    assert ours[1].dtype == torch.bfloat16 and ours[2].dtype == torch.bfloat16
    for index in range(3):
        assert rel_err(ours[index], ref[index]) <= 2e-2
        assert rel_err(ours[index], ref[index]) <= 2 * rel_err(chunked[index], ref[index]) + 5e-3


def test_extreme_logits_stay_finite_and_exact(small_tiles):
    """Logits of several hundred (heads scaled up 100x): the online merge moves its maxima by
    that much between tiles and splits without losing the forward KL."""
    h_s, w_s, h_t, w_t, labels = head_inputs(**SHAPE, seed=9)
    inputs = (h_s, w_s * 100, h_t, w_t * 100, labels)
    ref = reference_grads(*inputs, valid_vocab=291, temperature=0.5, alpha=0.5)
    ours = fused_grads(*inputs, valid_vocab=291, temperature=0.5, alpha=0.5,
                       backend="epilogue")
    assert torch.isfinite(ours[0]) and rel_err(ours[0], ref[0]) <= 1e-5
    assert rel_err(ours[1], ref[1]) <= 1e-4 and rel_err(ours[2], ref[2]) <= 1e-4


def test_merge_of_splits_equals_one_split(small_tiles):
    """The per-row merge across vocabulary splits gives the statistics of a single split."""
    h_s, w_s, h_t, w_t, labels = head_inputs(**SHAPE, seed=10)
    flat = labels.clamp(min=0)
    merged = [merge_statistics(head_epilogue_triton.head_statistics(
        h_s, w_s, h_t, w_t, flat, valid_vocab=291, temperature=2.0, n_splits=splits), 0.5)
        for splits in (1, 4)]
    assert merged[0][0].shape == (37,)
    for one, many in zip(*merged, strict=True):
        assert torch.allclose(one, many, rtol=1e-5, atol=1e-5)


def test_no_grad_and_second_backward(small_tiles):
    """Under no_grad only the statistics run (same loss); a retained graph's second backward
    forms the same gradients again."""
    inputs = head_inputs(**SHAPE, seed=11)
    h_s, w_s, h_t, w_t, labels = inputs
    with torch.no_grad():
        forward_only, _ = kd_head_loss(*inputs, valid_vocab=291, backend="epilogue")
    hs = h_s.clone().requires_grad_(True)
    loss, _ = kd_head_loss(hs, w_s, h_t, w_t, labels, valid_vocab=291, backend="epilogue")
    assert torch.equal(loss.detach(), forward_only)
    (loss * 3).backward(retain_graph=True)
    first = hs.grad.clone()
    hs.grad = None
    loss.backward()
    assert torch.allclose(first, 3 * hs.grad, rtol=1e-5, atol=1e-8)


def test_unsupported_calls_fall_back_to_the_chunked_path(monkeypatch):
    """Divergences other than the forward KL (and float64 heads) run the chunked Triton path:
    the same numbers as backend="triton", and the epilogue kernels never launch."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("the epilogue ran")

    monkeypatch.setattr(head_epilogue_triton, "head_statistics", refuse)
    inputs = head_inputs(**SHAPE, seed=12)
    for extra in ({"divergence": "reverse_kl"}, {"divergence": "jsd", "beta": 0.3}):
        ours = fused_grads(*inputs, valid_vocab=291, backend="epilogue", **extra)
        chunked = fused_grads(*inputs, valid_vocab=291, backend="triton", **extra)
        for a, b in zip(ours[:3], chunked[:3], strict=True):
            assert torch.equal(a, b)
    wide = [x.double() if x.is_floating_point() else x for x in inputs]
    assert torch.isfinite(fused_grads(*wide, valid_vocab=291, backend="epilogue")[0])
