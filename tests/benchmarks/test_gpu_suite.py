"""The GPU suite's smoke mode runs every code path on CPU, so the one real GPU run (a scarce,
short lease) cannot die of a typo. Also checks the summary survives a failed section."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_smoke_suite_runs_every_section(tmp_path):
    env = dict(os.environ)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--out", str(tmp_path)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=900, env=env,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert proc.stdout.splitlines()[0].startswith("device: ")
    report = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    sections = report["sections"]
    assert set(sections) == {"kernel_correctness", "head_correctness", "kernel_speed",
                             "divergences", "head",
                             "seed_recipe", "seed_recipe_logits", "seed_recipe_compiled",
                             "teacher_cache", "teacher_cache_build", "transformers",
                             "on_policy_step", "sampling", "capped_12gib", "fsdp",
                             "onpolicy_sampler_memory"}
    for name, body in sections.items():
        assert "error" not in body, (name, body.get("traceback"))
    assert sections["kernel_correctness"]["passed"]
    heads = sections["head_correctness"]
    assert heads["passed"], heads["cases"]
    cases = " | ".join(row["case"] for row in heads["cases"])
    for part in ("dense jsd", "dense tvd", "sparse top_k", "sparse sampled", "T=0.5", "T=4.0",
                 "N=127", "bf16"):  # N=127: the smoke plan's micro-batch 2 x 64 tokens - 1
        assert part in cases
    assert "fused heads bf16 vs float64 reference" in proc.stdout
    seed = sections["seed_recipe"]
    assert seed["tokens_per_s"] > 0 and seed["finite"]
    assert seed["plan_largest_micro_batch_12gib"] >= 2
    compiled = sections["seed_recipe_compiled"]
    assert compiled["tokens_per_s"] > 0 and compiled["finite"]
    assert not sections["seed_recipe_logits"]["fused_head"] and seed["fused_head"]
    assert set(sections["divergences"]["rows"]) == {
        "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"}
    head = sections["head"]["variants"]
    assert {"matmuls", "fused", "unfused", "fused_chunk_16", "fused_chunk_32"} <= set(head)
    assert all("median_ms" in row for row in head.values())
    cache = sections["teacher_cache"]
    assert cache["passed"] and len(cache["correctness"]) == 4
    assert cache["cache"]["finite"] and cache["online"]["finite"] and cache["speedup"] > 0
    assert "seed step from a top-64 cache / online step" in proc.stdout
    sampled = sections["sampling"]  # benchmarks/sampling.py in a worker, at smoke size
    assert sampled["greedy_token_agreement"] == 1.0 and sampled["ratio_of_medians"] > 0
    assert "sampling: ours / transformers generate" in proc.stdout
    builds = sections["teacher_cache_build"]["builds"]
    assert set(builds) == {"top-64", "sampled-32"}
    # (at smoke sizes the steady rate is noise: only the plumbing and the record are checked)
    assert all(b["seconds"] > 0 and b["bytes_per_token"] == b["target_bytes_per_token"]
               for b in builds.values())
    assert "teacher cache build, top-64 / teacher forward" in proc.stdout
    check_on_policy_sections(sections, proc.stdout)
    capped = sections["capped_12gib"]
    assert capped["seed_micro_batch_fits"] and capped["measured_largest_micro_batch"] >= 2
    assert capped["best_compiled_micro_batch"] == capped["measured_largest_micro_batch"]
    hf = sections["transformers"]
    assert "skipped" in hf or hf["tokens_per_s"] > 0
    fsdp = sections["fsdp"]
    assert fsdp["seed"]["fsdp"]["finite"] and fsdp["seed"]["fsdp_over_plain_tokens_per_s"] > 0
    assert fsdp["capped"]["finite"] and fsdp["capped"]["plan_allocated_peak_bytes"] > 0
    assert "FSDP x1 / plain seed step tokens/s" in proc.stdout
    # The summary table comes last.
    tail = proc.stdout.strip().splitlines()
    assert any(line.startswith("GPU suite summary") for line in tail[-40:])
    assert "JSON:" in tail[-1]


def check_on_policy_sections(sections: dict, stdout: str) -> None:
    onpolicy = sections["on_policy_step"]
    assert onpolicy["on_policy"]["finite"] and onpolicy["off_policy"]["finite"]
    assert onpolicy["on_over_off_step_time"] > 0 and 0 < onpolicy["sampling_share"] < 1
    assert "on-policy / off-policy step time (2 x 32)" in stdout
    sampler = sections["onpolicy_sampler_memory"]
    assert sampler["plan_sampler_bytes"] > 0 and sampler["generated_tokens"] == 2 * 8
    assert "memory plan / measured: on-policy sampler" in stdout


def test_onpolicy_sampler_row_plans_and_stays_unmeasured_without_a_gpu():
    """The sampler's plan / measured row: the plan's sampling group always, a measurement only
    where CUDA measured one (never faked on the CPU)."""
    from benchmarks.common import SMOKE
    from benchmarks.gpu_suite import section_onpolicy_sampler_memory, summary_rows

    body = section_onpolicy_sampler_memory(SMOKE, True)
    assert body["plan_sampler_bytes"] > 0 and body["generated_tokens"] == 2 * 8
    report = {"sections": {"onpolicy_sampler_memory": body}}
    (row,) = [r for r in summary_rows(report) if "on-policy sampler" in r[0]]
    if torch.cuda.is_available():
        assert row[1].startswith("x") and "measured_sampler_bytes" in body
    else:
        assert row[1].startswith("not measured (no GPU") and "plan_over_measured" not in body


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
    report["sections"]["capped_12gib"] = {
        "seed_micro_batch_fits": True, "measured_largest_micro_batch": 30,
        "search_stopped": "out of memory",
        "attempts": [{"micro_batch": 30, "ok": True, "compiled": True, "tokens_per_s": 5.2e5,
                      "mfu": 0.36, "peak_allocated_bytes": 10 * 2**30,
                      "plan_over_measured": 1.01, "plan_allocated_peak_bytes": 10.1 * 2**30,
                      "plan_total_over_measured": 0.98, "reserved_over_allocated": 1.02}],
    }
    report["sections"]["head"] = {"liger": "absent", "fused_vs_matmuls": 1.2,
                                  "best_chunk": "fused_chunk_4096", "variants": {
                                      "fused": {"median_ms": 1.2, "peak_mib": 700.0},
                                      "matmuls": {"median_ms": 1.0, "peak_mib": 900.0}}}
    text = format_summary(report)
    assert "FAILED: RuntimeError: boom" in text
    assert "1,234" in text and "MFU 41.0%" in text
    assert "14 (checkpointing: 19)" in text
    assert "skipped: transformers is not installed" in text
    assert "best under 12 GiB: compiled, mb 30" in text and "520,000 tokens/s, MFU 36.0%" in text
    assert "memory plan / measured: capped mb 30 compiled" in text and "x1.010" in text
    assert "x1.20 (1.20 vs 1.00 ms; fastest chunk fused_chunk_4096)" in text
    assert "skipped: liger_kernel is not installed" in text


def test_batches_are_shifted_next_tokens():
    import torch

    from benchmarks.common import make_batch

    batch = make_batch(3, 17, 50, torch.device("cpu"), seed=1)
    assert batch["input_ids"].shape == batch["labels"].shape == (3, 17)
    assert torch.equal(batch["input_ids"][:, 1:], batch["labels"][:, :-1])
    assert int(batch["input_ids"].max()) < 50


def test_liger_is_set_to_our_objective():
    """LigerFusedLinearJSDLoss as the suite configures it computes our loss and gradients
    (so the side-by-side times the same work); skipped where liger_kernel is absent."""
    pytest.importorskip("liger_kernel")
    import torch

    from benchmarks.common import head_inputs, head_step, liger_jsd_loss

    inputs = head_inputs(200, 32, 48, 1000, torch.float32, torch.device("cpu"))
    results = {}
    for variant, options in (("liger", {"liger": liger_jsd_loss(compiled=False)}),
                             ("fused", {"full_vocab": True, "backend": "torch"})):
        run, (hs, ws) = head_step(variant, inputs, **options)
        run()
        results[variant] = (hs.grad, ws.grad)
    for ours, theirs in zip(results["fused"], results["liger"], strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-7)


def fake_sections(monkeypatch, **bodies):
    """Replace the suite's sections with named fakes: a dict body, an exception to raise, or
    a number of seconds to sleep; the first is a gate."""
    import time

    import benchmarks.gpu_suite as suite

    ran = []

    def make(name, body):
        def run(sizes, smoke, out_dir):
            ran.append(name)
            if isinstance(body, Exception):
                raise body
            if isinstance(body, (int, float)):
                time.sleep(body)
                return {}
            return dict(body)
        return run

    sections = {name: suite.Section(make(name, body), 1, gate=i == 0)
                for i, (name, body) in enumerate(bodies.items())}
    monkeypatch.setattr(suite, "SECTIONS", sections)
    return ran


def test_list_and_only_select_sections_with_the_gates_first(capsys):
    from benchmarks.gpu_suite import SECTIONS, main, select_sections

    assert main(["--list"]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert listed == list(SECTIONS) and {"head_correctness", "fsdp", "head"} <= set(listed)
    assert select_sections("fsdp,head") == ["kernel_correctness", "head_correctness", "head",
                                            "fsdp"]
    assert main(["--only", "head,nope"]) == 2
    assert "unknown section(s) nope" in capsys.readouterr().err


def test_a_failed_gate_stops_the_call_before_any_timing(monkeypatch, tmp_path):
    from benchmarks.gpu_suite import main

    ran = fake_sections(monkeypatch, gate={"passed": False, "cases": []}, timing={"x": 1})
    assert main(["--smoke", "--out", str(tmp_path), "--only", "timing"]) == 1
    assert ran == ["gate"]
    report = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    assert report["sections"]["timing"] == {"skipped": "correctness gate gate failed"}


def test_a_failing_or_slow_section_is_recorded_and_the_rest_kept(monkeypatch, tmp_path):
    import time

    import benchmarks.gpu_suite as suite

    ran = fake_sections(monkeypatch, gate={"passed": True}, boom=RuntimeError("boom"),
                        slow=30, after={"y": 2})
    started = time.perf_counter()
    body = suite.run_section("slow", suite.FULL, False, tmp_path)  # limit 1 s
    assert time.perf_counter() - started < 10
    assert "SectionTimeout: slow ran past its limit of 1 s" in body["error"]
    monkeypatch.setitem(suite.SECTIONS, "slow", suite.Section(lambda *a: {"z": 3}, 1))
    assert suite.main(["--smoke", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    assert report["sections"]["boom"]["error"] == "RuntimeError: boom"
    assert report["sections"]["after"]["y"] == 2 and ran[-1] == "after"


BUDGET_SCRIPT = """
import sys, time
import benchmarks.gpu_suite as suite
suite.SECTIONS.clear()
suite.SECTIONS["first"] = suite.Section(lambda *a: {"finished": True}, 60)
suite.SECTIONS["stuck"] = suite.Section(lambda *a: time.sleep(60), 60)
sys.exit(suite.main(["--smoke", "--budget-s", "3", "--out", sys.argv[1]]))
"""


def test_the_call_budget_ends_the_process_and_keeps_the_json(tmp_path):
    proc = subprocess.run([sys.executable, "-c", BUDGET_SCRIPT, str(tmp_path)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 124, proc.stderr
    assert "budget of 3 s ran out" in proc.stderr
    report = json.loads((tmp_path / "gpu_suite_smoke.json").read_text())
    assert report["sections"]["first"]["finished"] and report["budget_expired_s"] == 3
