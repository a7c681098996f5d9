"""Fixtures of the kernel tests."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Small tensor ops on a shared 2-core machine: a second OpenMP thread only adds waiting
    (each parallel op stalls until the other core's time slice comes round)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
