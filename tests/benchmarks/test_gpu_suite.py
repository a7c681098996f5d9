"""The GPU suite's smoke mode runs every code path on CPU, so the one real GPU run (a scarce,
short lease) cannot die of a typo. Also checks the summary survives a failed section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_suite_runs_every_section(tmp_path):
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert proc.stdout.splitlines()[0].startswith("device: ")
    report = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"kernel_correctness", "kernel_speed", "seed_recipe",
                             "seed_recipe_compiled", "transformers", "capped_12gib"}
    for name, body in sections.items():
        assert "error" not in body, (name, body.get("traceback"))
    assert sections["kernel_correctness"]["passed"]
    seed = sections["seed_recipe"]
    assert seed["tokens_per_s"] > 0 and seed["finite"]
    assert seed["plan_largest_micro_batch_12gib"] >= 2
    compiled = sections["seed_recipe_compiled"]
    assert compiled["tokens_per_s"] > 0 and compiled["finite"]
    capped = sections["capped_12gib"]
    assert capped["seed_micro_batch_fits"] and capped["measured_largest_micro_batch"] >= 2
    hf = sections["transformers"]
    assert "skipped" in hf or hf["tokens_per_s"] > 0
    # The summary table comes last.
    tail = proc.stdout.strip().splitlines()
    assert any(line.startswith("GPU suite summary") for line in tail[-15:])
    assert "JSON:" in tail[-1]


def test_summary_reports_a_failed_section_and_keeps_the_rest():
    from benchmarks.gpu_suite import format_summary

    report = {
        "device": "cpu", "mode": "smoke", "wall_s": 1.0, "json_path": "x.json",
        "sections": {
            "kernel_correctness": {"error": "RuntimeError: boom\n"},
            "seed_recipe": {
                "tokens_per_s": 1234.0, "mfu": 0.41, "peak_allocated_bytes": 3 * 2**30,
                "plan_allocated_peak_bytes": 3.2 * 2**30, "plan_largest_micro_batch_12gib": 14,
                "plan_largest_micro_batch_12gib_checkpointing": 19,
            },
            "transformers": {"skipped": "transformers is not installed"},
        },
    }
    text = format_summary(report)
    assert "FAILED: RuntimeError: boom" in text
    assert "1,234" in text and "MFU 41.0%" in text
    assert "14 (checkpointing: 19)" in text
    assert "skipped: transformers is not installed" in text


def test_batches_are_shifted_next_tokens():
    import torch

    from benchmarks.common import make_batch

    batch = make_batch(3, 17, 50, torch.device("cpu"), seed=1)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 17)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert int(batch["input_ids"].max()) < 50
