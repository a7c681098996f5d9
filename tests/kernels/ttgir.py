"""The TTGIR of a Triton kernel compiled ahead of time for sm_90 (no GPU needed), for tests
that check what the interpreter cannot show (barriers, the absence of shared-memory atomics).

The compile runs in a subprocess without TRITON_INTERPRET: under the interpreter (which the
test session sets) @triton.jit functions cannot be compiled.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = """
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module, name, constexprs, warps = sys.argv[1:5]
constexprs, warps = json.loads(constexprs), int(warps)
kernel = getattr(importlib.import_module(module), name)
logits = ("student_ptr", "teacher_ptr", "grad_ptr")
ints = {"labels_ptr": "*i64", "ids_ptr": "*i32", "count_ptr": "*i32"}
signature = {}
for arg in kernel.arg_names:
    if arg in constexprs:
        signature[arg] = "constexpr"
    elif arg in logits:
        signature[arg] = "*bf16"
    elif arg in ints:
        signature[arg] = ints[arg]
    elif arg.endswith("_ptr"):
        signature[arg] = "*fp32"
    elif arg.endswith(("_stride", "n_rows", "n_cols", "valid_vocab", "ignore_index")):
        signature[arg] = "i32"
    else:
        signature[arg] = "fp32"
compiled = triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs),
                          target=GPUTarget("cuda", 90, 32), options={"num_warps": warps})
print(compiled.asm["ttgir"])
"""


def compiled_ttgir(module: str, kernel: str, constexprs: dict, num_warps: int) -> str:
    """TTGIR text of `module.kernel` with bf16 logits, int32 ids, fp32 elsewhere, sm_90."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([sys.executable, "-c", _SCRIPT, module, kernel,
                             json.dumps(constexprs), str(num_warps)],
                            cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise AssertionError(result.stderr[-3000:])
    return result.stdout


def barrier_between_label_load_and_first_store(ttgir: str) -> bool:
    """Whether a CTA barrier lies between the load of s[label] (the only scalar load of a bf16
    pointer) and the first bf16 tensor store (the first gradient store of the row)."""
    import re

    lines = ttgir.splitlines()
    label_load = [i for i, line in enumerate(lines)
                  if re.search(r"= tt\.load .*: !tt\.ptr<bf16>", line)]
    stores = [i for i, line in enumerate(lines)
              if re.search(r"tt\.store .*: tensor<\d+x!tt\.ptr<bf16>", line)]
    barriers = [i for i, line in enumerate(lines)
                if re.search(r"\b(gpu\.barrier|ttg\.barrier)\b", line)]
    if len(label_load) != 1 or not stores:
        raise AssertionError(f"unexpected TTGIR: {len(label_load)} label loads, "
                             f"{len(stores)} stores")
    return any(label_load[0] < b < stores[0] for b in barriers)
