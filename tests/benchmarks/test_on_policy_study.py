"""The on-policy study (benchmarks/on_policy.py) at the quickstart's --tiny scale: every code
path, so the full-scale run behind benchmarks/README.md cannot die of a typo; and a reused
quickstart folder is read where it lies, whatever folder it was made from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common, on_policy

REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"run", "fraction", "steps", "step_cost_s", "cpu_time_s", "step_time_s",
            "median_step_s", "generation_share", "ppl", "last_word_ppl", "last_word_acc",
            "sample_nll", "points", "kd"}


def test_reused_quickstart_paths_point_into_its_folder(tmp_path):
    folder = tmp_path / "copied"
    (folder / "teacher_pretrain" / "final").mkdir(parents=True)
    summary = {"data_dir": "runs/quickstart/data", "last_word_task":
               "runs/quickstart/tasks/last_word.jsonl",
               "tokenizer": {"path": "runs/quickstart/tokenizer/tokenizer.json"},
               "runs": {"teacher_pretrain": {"export_dir":
                                             "runs/quickstart/teacher_pretrain/final"}}}
    (folder / "quickstart.json").write_text(json.dumps(summary))

    class Args:
        quickstart, out, tiny = str(folder), str(tmp_path / "out"), False

    got = common.finished_quickstart(Args)
    assert got["data_dir"] == str(folder / "data")
    assert got["tokenizer"]["path"] == str(folder / "tokenizer" / "tokenizer.json")
    assert got["runs"]["teacher_pretrain"]["export_dir"] == str(
        folder / "teacher_pretrain" / "final")


def test_equal_time_steps_fill_the_budget():
    assert on_policy.equal_time_steps(80 * 1.5, 1.0) == 120
    assert on_policy.equal_time_steps(80 * 1.5, 1.25) == 96
    assert on_policy.equal_time_steps(0.01, 1.0) == 1


@pytest.mark.slow
def test_on_policy_study_tiny(tmp_path):
    report_path = tmp_path / "study.json"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.on_policy", "--tiny", "--out", str(tmp_path / "runs"),
         "--json", str(report_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    report = json.loads(report_path.read_text())
    rows = report["rows"]
    assert [r["run"] for r in rows] == [
        "off-policy, equal steps", "mixed, equal steps", "on-policy, equal steps",
        "off-policy, equal time", "mixed, equal time"]
    assert all(set(r) >= ROW_KEYS for r in rows)
    assert [r["fraction"] for r in rows] == [0.0, 0.5, 1.0, 0.0, 0.5]
    steps = report["steps"]
    assert all(r["steps"] == steps for r in rows[:3])
    cost = report["step_cost"]
    on, off = cost["on-policy"]["step_s"], cost["off-policy"]["step_s"]
    assert cost["ratio"] == pytest.approx(on / off, rel=1e-2)
    assert report["time_budget_s"] == rows[2]["cpu_time_s"]
    for row in rows[3:]:  # the equal-time runs fill the on-policy run's CPU time
        assert abs(row["cpu_time_s"] - report["time_budget_s"]) <= row["step_cost_s"]
    assert report["prompt_tokens"] + report["new_tokens"] == 64  # --tiny's seq_len
    assert rows[0]["generation_share"] == 0.0 < rows[1]["generation_share"]
    assert rows[1]["generation_share"] < rows[2]["generation_share"] < 1.0
    for row in rows:
        assert row["points"][0][0] == 0 and row["points"][-1][0] == row["steps"]
        assert row["sample_nll"] > 0 and row["ppl"] > 0
    # lambda 0's prepare_window only counts labels; lambda 1's samples
    assert cost["off-policy"]["sampling_s"] < 0.05 * off < cost["on-policy"]["sampling_s"]
    assert cost["off-policy"]["positions"] == [4, 64] and cost["on-policy"]["positions"] == [4, 63]
    assert "| on-policy, equal steps |" in proc.stdout and "teacher prefill" in report["table"]
    assert Path(report["chart"]).stat().st_size > 0
