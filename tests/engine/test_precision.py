"""engine.precision: one vocabulary of dtype names and precision modes for every command."""

from __future__ import annotations

import pytest
import torch

from engine import precision


def test_short_and_long_names_mean_the_same_dtype():
    for short, long in (("fp32", "float32"), ("bf16", "bfloat16"), ("fp16", "float16")):
        assert precision.dtype_of(short) is precision.dtype_of(long)
        assert precision.canonical_name(long) == short
    assert precision.dtype_of("bf16") is torch.bfloat16
    assert [precision.dtype_bytes(n) for n in ("fp32", "bf16", "float16")] == [4, 2, 2]
    assert set(precision.DTYPE_NAMES) == {"fp32", "bf16", "fp16", "float32", "bfloat16",
                                          "float16"}


def test_unknown_names_are_refused_with_the_choices():
    with pytest.raises(ValueError, match=r"unknown dtype 'int8'.*fp32, bf16, fp16, float32"):
        precision.dtype_of("int8")
    with pytest.raises(ValueError, match=r"unknown precision 'fp8'.*bf16-autocast, bf16-pure"):
        precision.precision_dtypes("fp8")


def test_modes_give_weight_autocast_and_compute_dtypes():
    assert precision.precision_dtypes("bf16-autocast") == (torch.float32, torch.bfloat16)
    assert precision.precision_dtypes("bf16-pure") == (torch.bfloat16, None)
    assert precision.precision_dtypes("fp32") == (torch.float32, None)
    assert [precision.compute_dtype(m) for m in precision.PRECISION_MODES] == [
        torch.bfloat16, torch.bfloat16, torch.float32]
