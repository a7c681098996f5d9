"""The on-policy study (benchmarks/on_policy.py) at the quickstart's --tiny scale: every code
path, so the full-scale run behind benchmarks/README.md cannot die of a typo; and a reused
quickstart folder is read where it lies, whatever folder it was made from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import on_policy

REPO_ROOT = Path(__file__).resolve().parents[2]
ROW_KEYS = {"run", "fraction", "steps", "step_time_s", "median_step_s", "generation_share",
            "ppl", "last_word_ppl", "last_word_acc", "sample_nll", "points"}


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

    got = on_policy.quickstart_run(Args)
    assert got["data_dir"] == str(folder / "data")
    assert got["tokenizer"]["path"] == str(folder / "tokenizer" / "tokenizer.json")
    assert got["runs"]["teacher_pretrain"]["export_dir"] == str(
        folder / "teacher_pretrain" / "final")


def test_equal_time_steps_scale_with_the_budget():
    assert on_policy.equal_time_steps(80, 150.0, 100.0) == 120
    assert on_policy.equal_time_steps(80, 50.0, 100.0) == 40
    assert on_policy.equal_time_steps(4, 0.01, 100.0) == 1


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
    assert report["time_budget_s"] == rows[2]["step_time_s"]
    assert report["prompt_tokens"] + report["new_tokens"] == 64  # --tiny's seq_len
    assert rows[0]["generation_share"] == 0.0 < rows[1]["generation_share"]
    assert rows[1]["generation_share"] < rows[2]["generation_share"] < 1.0
    for row in rows:
        assert row["points"][0][0] == 0.0
        assert row["points"][-1][0] == pytest.approx(row["step_time_s"], abs=0.01)
        assert row["sample_nll"] > 0 and row["ppl"] > 0
    cost = report["step_cost"]
    assert cost["ratio"] == round(rows[2]["median_step_s"] / rows[0]["median_step_s"], 3)
    assert cost["off-policy"]["sampling_s"] == 0.0 < cost["on-policy"]["sampling_s"]
    assert "| on-policy, equal steps |" in proc.stdout and "teacher prefill" in report["table"]
    assert Path(report["chart"]).stat().st_size > 0
