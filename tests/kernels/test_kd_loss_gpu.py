"""The compiled Triton kernel on a real GPU against the float64 reference (marker gpu).

The rest of the kernel tests use the interpreter (set by conftest for the whole session), so
this one runs benchmarks.kd_loss.gpu_correctness in a fresh process with the interpreter off.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json
from benchmarks.kd_loss import gpu_correctness
print(json.dumps(gpu_correctness()))
"""


@pytest.mark.gpu
def test_compiled_kernel_matches_float64_reference_on_gpu():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    cases = json.loads(proc.stdout.strip().splitlines()[-1])
    assert cases and all(case["backend"] == "triton" for case in cases)
    failed = [case for case in cases if not case["passed"]]
    assert not failed, failed
