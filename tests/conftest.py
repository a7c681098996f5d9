"""Shared test setup: locate ../shared, skip GPU tests without CUDA, run Triton on CPU.

The real tokenizer and the Pile sample live in ../shared beside the checkout. They are
data we may read but never commit, so every test that needs them asks for a fixture
here and skips cleanly when the folder is absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# The kernel tests run Triton through its interpreter on CPU tensors, on every machine (CI has
# no GPU; on a GPU machine the same tests then still mean the same thing). It must be switched
# on before triton is first imported, which is why it happens at collection time. The compiled
# kernel on a real GPU is checked by tests/kernels/test_kd_loss_gpu.py (marker gpu), which
# runs in a subprocess with the interpreter off.
os.environ.setdefault("TRITON_INTERPRET", "1")

# Keep the 2-core CI machine from oversubscribing itself.
torch.set_num_threads(min(2, os.cpu_count() or 1))

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("NEOX_DISTILL_SHARED", REPO_ROOT.parent / "shared"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


def _shared_file(relative: str) -> Path:
    path = SHARED_DIR / relative
    if not path.is_file():
        pytest.skip(f"{path} is absent (../shared is only beside a developer checkout)")
    return path


@pytest.fixture(scope="session")
def neox_tokenizer_path() -> Path:
    """The real GPT-NeoX-20B tokenizer.json (never committed)."""
    return _shared_file("tokenizers/gpt-neox-20b-tokenizer.json")


@pytest.fixture(scope="session")
def pile_sample_path() -> Path:
    """13k real-text documents in the Pile jsonl.zst format (never committed)."""
    return _shared_file("data/pile-sample-train.jsonl.zst")
