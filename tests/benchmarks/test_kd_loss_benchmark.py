"""The kernel benchmark's code paths, tiny, on CPU: what the GPU suite calls works first time."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import common
from benchmarks import kd_loss as bench
from engine.kernels.kd_loss import kd_loss_reference


def test_gpu_correctness_smoke_runs_the_kernel_and_passes():
    pytest.importorskip("triton")
    results = common.gpu_correctness(smoke=True)
    assert len(results) == 2 * 2 * 3  # shapes x dtypes x temperatures
    for row in results:
        assert set(row) >= {"case", "loss_rel_err", "grad_rel_err", "passed"}
        assert row["backend"] == ("triton" if torch.cuda.is_available() else
                                  common.kernel_backend(torch.device("cpu")))
        assert row["passed"], row


def test_gpu_speed_smoke_reports_every_variant(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the torch path keeps this quick
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops on a shared 2-core machine: threads only add waiting
    try:
        out = common.gpu_speed(smoke=True)
    finally:
        torch.set_num_threads(threads)
    assert set(out["variants"]) == {"ours_inplace", "ours", "naive_eager", "naive_compiled"}
    assert out["copy_gbps"] > 0
    for row in out["variants"].values():
        assert row["median_ms"] > 0 and row["gbps"] > 0 and row["speedup_vs_eager"] > 0
    assert out["variants"]["naive_eager"]["speedup_vs_eager"] == 1.0


def test_naive_composite_agrees_with_the_reference():
    student, teacher, labels = common.make_inputs(9, 300, torch.float32, "cpu")
    naive = common.naive_kd_loss(student, teacher, labels, valid_vocab=273)
    ref, _ = kd_loss_reference(student.double(), teacher.double(), labels, alpha=common.ALPHA,
                                     temperature=common.TEMPERATURE, valid_vocab=273)
    assert abs(naive.item() - ref.item()) <= 1e-5 * abs(ref.item())


def test_cpu_worker_measures_time_and_memory():
    row = bench.cpu_worker("ours", "bf16", 16, 500, 1, 1)
    assert row["median_s"] > 0
    assert row["peak_rss_delta_mib"] >= 0
    json.dumps(row)


def test_head_and_divergence_sections_run_tiny(tmp_path, capsys):
    """--section head / divergences at smoke size: every variant measured and compared, and a
    section run alone keeps the results file's other sections."""
    path = tmp_path / "kd.json"
    path.write_text(json.dumps({"cpu": ["kept"]}))
    assert bench.main(["--smoke", "--section", "head", "--json", str(path)]) == 0
    assert bench.main(["--smoke", "--section", "divergences", "--json", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["cpu"] == ["kept"]
    rows = saved["head"]["rows"]
    assert set(rows) == {"fused", "unfused_default", "unfused_inplace"}
    assert rows["fused"]["time_vs_unfused_inplace"] > 0
    assert set(saved["divergences_cpu"]["vs_forward_kl"]) == {
        "forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"}
    assert saved["divergences_cpu"]["vs_forward_kl"]["forward_kl"] == 1.0
    out = capsys.readouterr().out
    assert "fused / unfused_default: extra peak memory" in out and "per divergence" in out


def test_kernel_alone_variant_writes_the_loss_gradient_in_place():
    """The suite's bandwidth row times kernel_step_fn: it must run the real kernel, its
    gradient (normalizer 1) written over the logits."""
    pytest.importorskip("triton")

    student, teacher, labels = common.make_inputs(5, 301, torch.float32, "cpu")
    s64 = student.double().requires_grad_(True)
    ref, _ = kd_loss_reference(s64, teacher.double(), labels, alpha=common.ALPHA,
                               temperature=common.TEMPERATURE, valid_vocab=290, normalizer=1.0)
    ref.backward()
    logits = student.clone()
    common.kernel_step_fn()(logits, teacher, labels, 290)
    assert (logits.double() - s64.grad).norm() <= 1e-4 * s64.grad.norm()


def test_summary_has_the_kernel_alone_bandwidth_row():
    from benchmarks.gpu_suite import _kernel_rows

    def variant(ms, fraction):
        return {"median_ms": ms, "fraction_of_copy": fraction, "speedup_vs_eager": 4.0}

    speed = {"n_tokens": 4096, "vocab": 50304, "dtype": "bfloat16",
             "variants": {"ours": variant(1.5, 0.5), "ours_inplace": variant(1.4, 0.55),
                          "naive_compiled": variant(3.0, 0.2), "kernel": variant(0.8, 0.82)}}
    rows = _kernel_rows({"kernel_speed": {"4096": speed}})
    assert ("kernel alone 4096x50304 bfloat16", "0.800 ms, 82% of copy bw",
            ">= 80% copy bw") in rows
