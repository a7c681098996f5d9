"""The step profiler's CPU smoke mode runs every code path, so its GPU run cannot die of a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_step_profile_smoke_profiles_both_engines(tmp_path):
    pytest.importorskip("transformers")
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.step_profile", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads((tmp_path / "step_profile_smoke.json").read_text())
    for engine in ("ours", "ours_logits", "transformers"):
        body = report[engine]
        assert "error" not in body, body.get("traceback")
        assert body["wall_ms_per_micro_step"] > 0
        assert "aten::" in body["table"]
