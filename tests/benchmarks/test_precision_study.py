"""The precision study at the quickstart's --tiny scale: every code path, so the full-scale run
behind benchmarks/README.md cannot die of a typo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_precision_study_tiny(tmp_path):
    report_path = tmp_path / "study.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.precision_study", "--tiny", "--out",
         str(tmp_path / "runs"), "--json", str(report_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads(report_path.read_text())
    rows = {row["precision"]: row for row in report["rows"]}
    assert list(rows) == ["fp32", "bf16-autocast", "bf16-pure"]
    assert rows["fp32"]["share_of_fp32_gain"] == 1.0
    for name in ("fp32", "bf16-autocast"):
        assert rows[name]["update_lost_frac"] == rows[name]["update_lost_weighted"] == 0.0
    assert 0.0 < rows["bf16-pure"]["update_lost_frac"] < 1.0
    assert "| bf16-pure |" in proc.stdout and "last-word ppl" in report["table"]
    for name in rows:  # every run watched the last-word task at step 0 and at the end
        lines = (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()
        steps = [r["step"] for r in map(json.loads, lines) if r["kind"] == "task"]
        assert steps[0] == 0 and steps[-1] == rows[name]["steps"]
