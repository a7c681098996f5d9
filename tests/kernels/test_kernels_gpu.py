"""The compiled kernels on a real GPU: every divergence and the fused head (marker gpu).

Runs tests/kernels/gpu_checks.py in a fresh process with the Triton interpreter off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.gpu
def test_every_divergence_and_the_fused_head_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "tests.kernels.gpu_checks"], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(cases) == 3 * 6 + 6
    failed = [case for case in cases if not case["passed"]]
    assert not failed, failed


@pytest.mark.filterwarnings("ignore")
@pytest.mark.usefixtures("one_thread")
def test_gpu_checks_smoke_through_the_interpreter():
    pytest.importorskip("triton")
    from tests.kernels.gpu_checks import run

    cases = run(torch.device("cpu"), smoke=True)
    assert len(cases) == 3 * 6 + 6
    failed = [case for case in cases if not case["passed"]]
    assert not failed, failed
