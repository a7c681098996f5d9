"""engine.train.lost_updates against torch's own AdamW: the update it predicts is the one
applied, and the elements it calls lost are exactly those the bf16 step left unchanged."""

from __future__ import annotations

import warnings

import pytest
import torch

from engine.model import GPTNeoX, GPTNeoXConfig
from engine.train import lost_updates
from engine.train.lost_updates import (
    LostUpdateMeter,
    adamw_update,
    full_step_loss,
    lost_update_sums,
    startup_warning,
    typical_step,
)


def tiny_model(dtype: torch.dtype) -> GPTNeoX:
    torch.manual_seed(0)
    config = GPTNeoXConfig(vocab_size=97, num_layers=2, hidden_size=32, num_heads=2,
                           intermediate_size=72, max_positions=32)
    return GPTNeoX(config).to(dtype)


def backward(model: GPTNeoX, seed: int) -> None:
    """A gradient on every parameter except the embedding rows of unused tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (2, 11), generator=generator)
    logits = model(ids).float()
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1)
                                      ).backward()


def snapshot_step(model, optimizer):
    """(weights before, predicted updates, metric sums) of one real optimizer step."""
    before = [p.detach().clone() for p in model.parameters()]
    group = optimizer.param_groups[0]
    predicted = [adamw_update(p, optimizer.state.get(p, {}), group) for p in model.parameters()]
    sums = lost_update_sums(optimizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return before, predicted, sums


@pytest.mark.parametrize("fused", [True, False])
def test_predicted_update_is_the_one_adamw_applies_fp32(fused):
    model = tiny_model(torch.float32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1,
                                  betas=(0.8, 0.95), fused=fused)
    for step in range(3):  # the first step (empty state) and later ones
        backward(model, step)
        before, predicted, sums = snapshot_step(model, optimizer)
        for param, old, update in zip(model.parameters(), before, predicted, strict=True):
            new, old = param.detach().reshape(-1).double(), old.reshape(-1).double()
            # fp32 rounding of the weights, and fp32 arithmetic of the update (AdamW's
            # moments are formed in another order, e.g. lerp: a few ulps of u)
            tolerance = 2 * torch.finfo(torch.float32).eps * torch.maximum(old.abs(), new.abs())
            tolerance += 1e-5 * update.double().abs()
            assert torch.all((new - old - update.double()).abs() <= tolerance), step
        assert sums[0].item() == 0  # nothing lost in fp32 at this lr


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("lr", [1e-5, 1e-3])
def test_lost_elements_are_those_the_bf16_step_left_unchanged(fused, lr):
    model = tiny_model(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, fused=fused)
    for step in range(3):
        backward(model, step)
        before, predicted, sums = snapshot_step(model, optimizer)
        moved = unchanged = 0
        size_moved = size_unchanged = 0.0
        for param, old, update in zip(model.parameters(), before, predicted, strict=True):
            mask = update != 0
            same = mask & (param.detach().reshape(-1) == old.reshape(-1))
            moved += int(mask.sum())
            unchanged += int(same.sum())
            size_moved += float(update.abs().sum())
            size_unchanged += float((update.abs() * same).sum())
        lost, moved_sum, lost_size, moved_size = sums.tolist()
        assert moved_sum == moved
        # The fused kernel rounds once, as the metric assumes; the unfused one rounds its
        # bf16 intermediates too, so a handful of boundary elements may differ.
        tolerance = 0 if fused else 1e-3 * moved
        assert abs(lost - unchanged) <= tolerance, (step, lost, unchanged)
        assert lost_size / moved_size == pytest.approx(size_unchanged / size_moved,
                                                       abs=0 if fused else 1e-3)
        assert (lost / moved > 0.5) == (lr == 1e-5)


def test_chunks_add_up_to_the_whole(monkeypatch):
    model = tiny_model(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    backward(model, 0)
    optimizer.step()  # a non-empty state
    backward(model, 1)
    whole = lost_update_sums(optimizer)
    monkeypatch.setattr(lost_updates, "CHUNK_ELEMENTS", 1000)  # several chunks per matrix
    chunked = lost_update_sums(optimizer)
    assert chunked[:2].tolist() == whole[:2].tolist()
    torch.testing.assert_close(chunked[2:], whole[2:], rtol=1e-6, atol=0)


def test_startup_warning_only_when_most_typical_steps_are_lost():
    model = tiny_model(torch.bfloat16)
    lost, median = full_step_loss(model, 1e-6)
    assert lost > 0.9 and 0 < median < 1
    assert full_step_loss(model, 1.0)[0] < 0.01
    assert typical_step(1e-3, 0.9) == pytest.approx(1e-3 * (0.1 / 1.9) ** 0.5)
    # An lr whose full step mostly survives while its typical step mostly does not.
    lr = next(lr for lr in (1e-5 * 1.5**k for k in range(40))
              if full_step_loss(model, lr)[0] < 0.5)
    assert full_step_loss(model, typical_step(lr, 0.9))[0] > 0.5
    message = startup_warning(model, lr, 0.9)
    assert f"optim.lr={lr:g}" in message and "bf16-autocast" in message
    assert "median |w|" in message
    assert startup_warning(model, lr, 0.0) is None  # beta1 0: every step is full size
    assert startup_warning(model, 1.0, 0.9) is None
    assert startup_warning(tiny_model(torch.float32), 1e-9, 0.9) is None  # fp32 masters


def test_meter_modes():
    model = tiny_model(torch.bfloat16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    zero, off = LostUpdateMeter(optimizer, "zero"), LostUpdateMeter(optimizer, "off")
    assert zero.fields(1) == {"update_lost_frac": 0.0, "update_lost_weighted": 0.0}
    assert off.fields(1) == {"update_lost_frac": None, "update_lost_weighted": None}
    meter = LostUpdateMeter(optimizer, "measure")
    assert meter.fields(1)["update_lost_frac"] is None  # no step taken (a skipped update)
    backward(model, 0)
    optimizer.step()
    with pytest.warns(RuntimeWarning, match="step 2: .* rounded away"):
        assert meter.fields(2)["update_lost_frac"] > 0.5
    backward(model, 1)
    optimizer.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per run
        assert meter.fields(3)["update_lost_frac"] > 0.5
    with pytest.raises(ValueError, match="measure, zero or off"):
        LostUpdateMeter(optimizer, "sometimes")
    with pytest.raises(ValueError, match="AdamW without amsgrad"):
        LostUpdateMeter(torch.optim.SGD(model.parameters(), lr=0.1), "measure")
    with pytest.raises(ValueError, match="AdamW without amsgrad"):
        LostUpdateMeter(torch.optim.AdamW(model.parameters(), amsgrad=True), "measure")
