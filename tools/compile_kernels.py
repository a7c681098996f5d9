"""Compile every Triton kernel ahead of time for the GPUs we target, without needing a GPU.

    python -m tools.compile_kernels [--json PATH]

For each kernel x input dtype (bf16, fp32) x compute capability (sm_80 A100, sm_86 RTX 3060,
sm_90 H100) it runs triton.compile on the kernel's source with the launch configuration the
launcher uses, then feeds the resulting PTX to the ptxas bundled with Triton in verbose mode to
read registers, spill bytes and stack; shared memory comes from the compiled metadata. A kernel
that fails to compile or spills makes the command exit non-zero, so CI catches a regression that
only a GPU run would otherwise reveal.

Why re-run ptxas: the compiled object only learns n_regs / n_spills when a driver loads the
cubin, which needs a GPU. ptxas -v reports the same numbers from the PTX alone.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.data.atomic import write_json_atomic

CAPABILITIES = (80, 86, 90)
DTYPES = {"bf16": "*bf16", "fp32": "*fp32"}


def _kernel_specs():
    """(name, jit function, signature builder, constexprs, num_warps) for every Triton kernel.

    The loss kernel is one source but a different program per divergence (a constexpr), so
    each divergence is built and checked for spills on its own.
    """
    from engine.kernels.divergences import DIVERGENCES
    from engine.kernels.kd_loss_triton import kd_loss_fwd_bwd_kernel, launch_config

    def kd_signature(ptr_type: str) -> dict:
        return {
            "student_ptr": ptr_type,
            "teacher_ptr": ptr_type,
            "grad_ptr": ptr_type,
            "labels_ptr": "*i64",
            "ce_row_ptr": "*fp32",
            "kd_row_ptr": "*fp32",
            "inv_norm_ptr": "*fp32",
            "student_row_stride": "i32",
            "teacher_row_stride": "i32",
            "grad_row_stride": "i32",
            "n_rows": "i32",
            "n_cols": "i32",
            "valid_vocab": "i32",
            "ignore_index": "i32",
            "alpha": "fp32",
            "temperature": "fp32",
            "kd_scale": "fp32",
            "w_p": "fp32",
            "w_q": "fp32",
            "log_w_p": "fp32",
            "log_w_q": "fp32",
            "DIVERGENCE": "constexpr",
            "WRITE_GRAD": "constexpr",
            "BLOCK_SIZE": "constexpr",
        }

    specs = []
    for index, name in enumerate(DIVERGENCES):
        block, warps = launch_config(50304, name)
        specs.append((f"kd_loss_fwd_bwd_kernel[{name}]", kd_loss_fwd_bwd_kernel, kd_signature,
                      {"DIVERGENCE": index, "WRITE_GRAD": True, "BLOCK_SIZE": block}, warps))
    return specs + _sparse_kernel_specs()


def _sparse_kernel_specs():
    """The teacher cache's loss kernel (kernels/sparse_kd_triton.py), int32 ids, k = 64."""
    from engine.kernels.sparse_kd_triton import (
        launch_config,
        list_block,
        sparse_kd_fwd_bwd_kernel,
    )

    def signature(ptr_type: str) -> dict:
        pointers = {"student_ptr": ptr_type, "grad_ptr": ptr_type, "labels_ptr": "*i64",
                    "ids_ptr": "*i32", "mass_ptr": "*fp32", "count_ptr": "*i32"}
        pointers.update(dict.fromkeys(("tail_ptr", "entropy_ptr", "saved_ptr", "ce_row_ptr",
                                       "kd_row_ptr", "inv_norm_ptr"), "*fp32"))
        ints = dict.fromkeys(("student_row_stride", "grad_row_stride", "ids_row_stride",
                              "mass_row_stride", "saved_row_stride", "n_rows", "n_cols",
                              "valid_vocab", "ignore_index"), "i32")
        floats = dict.fromkeys(("alpha", "temperature", "kd_scale"), "fp32")
        return {**pointers, **ints, **floats, "WRITE_GRAD": "constexpr",
                "BLOCK_SIZE": "constexpr", "LIST_BLOCK": "constexpr"}

    block, warps = launch_config(50304)
    return [(f"sparse_kd_fwd_bwd_kernel[{'grad' if write else 'forward'}]",
             sparse_kd_fwd_bwd_kernel, signature,
             {"WRITE_GRAD": write, "BLOCK_SIZE": block, "LIST_BLOCK": list_block(64)},
             warps) for write in (True, False)]


def _find_ptxas(capability: int) -> str:
    """Path of the ptxas Triton itself uses (its location moved between Triton releases)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            tool = get_ptxas(capability)
        except TypeError:  # older signature without the architecture
            tool = get_ptxas()
        path = getattr(tool, "path", tool)
        if path:
            return str(path)
    except (ImportError, AttributeError):
        pass
    try:
        from triton import knobs

        return str(knobs.nvidia.ptxas.path)
    except (ImportError, AttributeError):
        pass
    import triton

    bundled = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if bundled.is_file():
        return str(bundled)
    raise RuntimeError("cannot find ptxas (looked in Triton's knobs and its bundled bin/)")


_REGS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_STACK = re.compile(r"(\d+) bytes stack frame")


def ptxas_usage(ptx: str, capability: int) -> dict:
    """Registers, spill bytes and stack frame reported by `ptxas -v` for one PTX module."""
    target = re.search(r"^\.target\s+(sm_\w+)", ptx, re.MULTILINE)
    gpu_name = target.group(1) if target else f"sm_{capability}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path = Path(tmp) / "kernel.ptx"
        ptx_path.write_text(ptx)
        result = subprocess.run(
            [_find_ptxas(capability), "-v", f"--gpu-name={gpu_name}", str(ptx_path), "-o",
             str(Path(tmp) / "kernel.cubin")],
            capture_output=True,
            text=True,
        )
    log = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"ptxas failed for {gpu_name}:\n{log}")
    regs = _REGS.search(log)
    spills = _SPILLS.search(log)
    stack = _STACK.search(log)
    if regs is None:
        raise RuntimeError(f"could not read the register count from ptxas output:\n{log}")
    return {
        "gpu_name": gpu_name,
        "registers": int(regs.group(1)),
        "spill_store_bytes": int(spills.group(1)) if spills else 0,
        "spill_load_bytes": int(spills.group(2)) if spills else 0,
        "stack_bytes": int(stack.group(1)) if stack else 0,
    }


def compile_one(fn, signature: dict, constexprs: dict, capability: int, num_warps: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    source = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(
        source, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps}
    )
    usage = ptxas_usage(compiled.asm["ptx"], capability)
    metadata = compiled.metadata
    shared = metadata.get("shared", 0) if isinstance(metadata, dict) else metadata.shared
    usage["shared_bytes"] = int(shared)
    return usage


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter replaces @triton.jit functions with Python ones that cannot be compiled.
        print("error: unset TRITON_INTERPRET to compile kernels ahead of time", file=sys.stderr)
        return 2
    import triton

    rows, failures = [], 0
    header = (f"{'kernel':<40} {'dtype':<5} {'arch':<7} {'warps':>5} {'regs':>5} "
              f"{'spill st/ld B':>13} {'stack B':>7} {'shared B':>8}  status")
    print(f"triton {triton.__version__}")
    print(header)
    print("-" * len(header))
    for name, fn, make_signature, constexprs, warps in _kernel_specs():
        for dtype, ptr_type in DTYPES.items():
            for capability in CAPABILITIES:
                row = {"kernel": name, "dtype": dtype, "capability": capability,
                       "num_warps": warps, "constexprs": constexprs}
                try:
                    row.update(compile_one(fn, make_signature(ptr_type), constexprs, capability,
                                           warps))
                    spilled = row["spill_store_bytes"] + row["spill_load_bytes"]
                    row["status"] = "ok" if spilled == 0 else "SPILLS"
                except Exception as error:  # report every failure, then fail the command
                    row["status"] = "FAILED"
                    row["error"] = f"{type(error).__name__}: {error}"
                failures += row["status"] != "ok"
                rows.append(row)
                if row["status"] == "FAILED":
                    print(f"{name:<40} {dtype:<5} sm_{capability:<4} {warps:>5}  FAILED:\n"
                          f"{row['error'][-2000:]}")
                else:
                    spills = f"{row['spill_store_bytes']}/{row['spill_load_bytes']}"
                    print(f"{name:<40} {dtype:<5} {row['gpu_name']:<7} {warps:>5} "
                          f"{row['registers']:>5} {spills:>13} {row['stack_bytes']:>7} "
                          f"{row['shared_bytes']:>8}  {row['status']}")
    if args.json:
        write_json_atomic(
            args.json, {"triton": triton.__version__, "kernels": rows}, trailing_newline=False
        )
    if failures:
        print(f"{failures} kernel build(s) failed or spilled", file=sys.stderr)
        return 1
    print(f"all {len(rows)} kernel builds compiled without spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
