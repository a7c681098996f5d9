"""The epilogue head's two kernels compile ahead of time for sm_90 (H100 / H200), bf16 and fp32,
with the launch configuration the launchers use at the seed shapes, and ptxas reports no
spills. Runs in a child process without TRITON_INTERPRET (the interpreter replaces the kernels
with Python functions that cannot be compiled); needs no GPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytest.importorskip("triton")

SCRIPT = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from engine.kernels import head_epilogue_triton as k
from tools.compile_kernels import ptxas_usage

rows = []
for dtype in ("bf16", "fp32"):
    ptr = f"*{dtype}"
    heads = dict.fromkeys(("hs_ptr", "ws_ptr", "ht_ptr", "wt_ptr"), ptr)
    block_m, block_n, block_k, warps = k.launch_config(4096, 50304, 768,
                                                       2 if dtype == "bf16" else 4)
    consts = {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k,
              "DOT_PRECISION": "ieee" if dtype == "fp32" else "tf32"}
    ints = ("vocab", "valid_vocab", "hs_dim", "ht_dim", "hs_stride", "ws_stride", "ht_stride",
            "wt_stride")
    stats = {**heads, "labels_ptr": "*i64", "out_ptr": "*fp32", "n_rows": "i32",
             **dict.fromkeys(ints, "i32"), "inv_t": "fp32", "tiles_per_split": "i32",
             **dict.fromkeys(consts, "constexpr")}
    grad = {**heads, "labels_ptr": "*i64", "stats_ptr": "*fp32", "coef_ptr": "*fp32",
            "grad_ptr": ptr, "row_start": "i32", "n_rows": "i32",
            **dict.fromkeys(ints + ("grad_stride", "stats_stride", "ignore_index"), "i32"),
            "inv_t": "fp32", **dict.fromkeys(consts, "constexpr")}
    for fn, signature in ((k.head_stats_kernel, stats), (k.head_grad_kernel, grad)):
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                                  target=GPUTarget("cuda", 90, 32),
                                  options={"num_warps": warps})
        usage = ptxas_usage(compiled.asm["ptx"], 90)
        rows.append({"kernel": fn.__name__, "dtype": dtype, "num_warps": warps, **usage})
print(json.dumps(rows))
'''


def test_epilogue_kernels_compile_for_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = json.loads(result.stdout.strip().splitlines()[-1])
    assert {(row["kernel"], row["dtype"]) for row in rows} == {
        (kernel, dtype) for kernel in ("head_stats_kernel", "head_grad_kernel")
        for dtype in ("bf16", "fp32")}
    for row in rows:
        assert row["gpu_name"].startswith("sm_90"), row
        assert 0 < row["registers"] <= 255, row
        assert row["spill_store_bytes"] == 0 and row["spill_load_bytes"] == 0, row
