"""`python -m tools.compile_kernels` builds every kernel for sm_80/86/90 with no GPU present,
specialised as a real launch at the seed shapes specialises it, with the installed Triton or
one installed in another folder (--triton-path)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.kernels.divergences import DIVERGENCES

REPO_ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("triton")


def run_tool(*args, interpret=None):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret is not None:
        env["TRITON_INTERPRET"] = interpret
    return subprocess.run([sys.executable, "-m", "tools.compile_kernels", *args], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=600)


def test_every_kernel_compiles_for_every_target_without_spills(tmp_path):
    report = tmp_path / "compile.json"
    result = run_tool("--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads(report.read_text())["kernels"]
    combos = {(row["kernel"], row["dtype"], row["capability"]) for row in rows}
    kernels = [f"kd_loss_fwd_bwd_kernel[{divergence}]" for divergence in DIVERGENCES]
    kernels += ["sparse_kd_fwd_bwd_kernel[grad]", "sparse_kd_fwd_bwd_kernel[forward]"]
    assert combos == {(kernel, dtype, cc) for kernel in kernels
                      for dtype in ("bf16", "fp32") for cc in (80, 86, 90)}
    for row in rows:
        assert row["status"] == "ok"
        assert 0 < row["registers"] <= 255
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0
        # Specialised as a launch at V = 50304 is: aligned pointers and the row strides and
        # n_cols divisible by 16 (valid_vocab = 50277 is not).
        assert "n_cols" in row["specialisation"] and "student_row_stride" in row["specialisation"]
        assert "valid_vocab" not in row["specialisation"]
    forward_kl = [row for row in rows if row["kernel"] == "kd_loss_fwd_bwd_kernel[forward_kl]"]
    assert all(row["vector_store"] >= 2 for row in forward_kl)  # the vectorised gradient store
    assert f"all {len(combos)} kernel builds compiled without spills" in result.stdout
    assert "sm_86" in result.stdout


def test_refuses_to_run_under_the_interpreter():
    result = run_tool(interpret="1")
    assert result.returncode == 2
    assert "TRITON_INTERPRET" in result.stderr


CAPTURE_CHECK = """
import torch
from engine.kernels.kd_loss_triton import launch_config
from tools.compile_kernels import (_HostlessPointer, capture, describe_specialisation,
                                   kernel_launches, specialise)

kernel, args, kwargs = capture(kernel_launches()["kd_loss_fwd_bwd_kernel[jsd]"], "bf16")
assert (kwargs["BLOCK_SIZE"], kwargs["num_warps"]) == launch_config(50304, "jsd"), kwargs
source, _, options = specialise(kernel, args, kwargs, 90)
assert options.num_warps == launch_config(50304, "jsd")[1]
print(describe_specialisation(source))
# A view starting 2 bytes into its storage is not 16-byte aligned: no divisibility.
shifted = list(args)
shifted[0] = _HostlessPointer(torch.empty(8, dtype=torch.bfloat16, device="meta")[1:])
print(describe_specialisation(specialise(kernel, shifted, kwargs, 90)[0]))
"""


def test_the_launch_is_captured_from_the_launcher_and_specialised_like_the_jit():
    """The launcher's own arguments (block and warps from launch_config) reach Triton's
    binder, which gives divisibility to what a real launch would and to nothing else."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", CAPTURE_CHECK], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    aligned, shifted = result.stdout.strip().splitlines()
    assert aligned.startswith("d16: 7 ptrs") and "n_cols" in aligned
    assert "valid_vocab" not in aligned and "ignore_index" not in aligned
    assert shifted == aligned.replace("d16: 7 ptrs", "d16: 6 ptrs")


def test_another_triton_runs_in_a_child_process(tmp_path):
    import triton

    site = Path(triton.__file__).resolve().parents[1]
    report = tmp_path / "other.json"
    result = run_tool("--triton-path", str(site), "--only", "[forward_kl]", "--arch", "90",
                      "--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"triton {triton.__version__} ({site / 'triton'})" in result.stdout
    rows = json.loads(report.read_text())["kernels"]
    assert {(row["kernel"], row["capability"]) for row in rows} == {
        ("kd_loss_fwd_bwd_kernel[forward_kl]", 90)}
    missing = run_tool("--triton-path", str(tmp_path / "nowhere"))
    assert missing.returncode == 2 and "no triton package" in missing.stderr


OLD_TRITON = os.environ.get("NEOX_DISTILL_OLD_TRITON")  # e.g. a --target install of 3.6.0


@pytest.mark.skipif(not OLD_TRITON, reason="set NEOX_DISTILL_OLD_TRITON to a folder holding "
                    "the oldest supported triton (pip install --no-deps --target DIR "
                    "triton==3.6.0)")
def test_the_oldest_supported_triton_compiles_every_kernel_without_spills(tmp_path):
    report = tmp_path / "old.json"
    result = run_tool("--triton-path", OLD_TRITON, "--json", str(report))
    assert result.returncode == 0, result.stdout + result.stderr
    payload = json.loads(report.read_text())
    assert payload["triton"].startswith("3.6")
    assert all(row["status"] == "ok" for row in payload["kernels"])
