"""The GPU suite's FSDP rows in smoke mode: both parts run their whole code path on the CPU."""

from __future__ import annotations

import json

from benchmarks.gpu_fsdp import main


def test_seed_part_runs_plain_and_fsdp_steps(tmp_path):
    out = tmp_path / "seed.json"
    assert main(["--part", "seed", "--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    for run in (result["plain"], result["fsdp"]):
        assert run["finite"] and run["tokens_per_s"] > 0
    # The same weights, data and fp32-master arithmetic: the first step's loss agrees.
    assert abs(result["fsdp"]["losses"][0] / result["plain"]["losses"][0] - 1) < 1e-2
    assert result["fsdp_over_plain_tokens_per_s"] > 0


def test_capped_part_runs_the_pair_and_plans_it(tmp_path):
    out = tmp_path / "capped.json"
    assert main(["--part", "capped", "--smoke", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["finite"] and result["plan_allocated_peak_bytes"] > 0
    assert result["pair"]["activation_checkpointing"] is True
