"""Compile every Triton kernel ahead of time for the GPUs we target, without needing a GPU.

    python -m tools.compile_kernels [--json PATH] [--only TEXT] [--arch 80,86,90]
    python -m tools.compile_kernels --triton-path DIR ...   # with the Triton installed in DIR

What is compiled is what a real launch compiles. Each launcher (kd_loss_forward_triton,
sparse_kd_forward_triton) is called at the seed shapes (4096 tokens x V 50304, valid vocabulary
50277, top-64 targets) on "meta" tensors, with Triton's launch intercepted: the kernel, its
arguments and launch options (block size and warps from the launch_config functions) are
recorded instead of run. Triton's own binder then specialises them as its JIT would on a GPU
(tt.divisibility = 16 on 16-byte-aligned pointers and on integers divisible by 16, such as
V = 50304 and the row strides; integers equal to 1 become constants), so the build is the
vectorised variant a launch gets, not a generic one. Each kernel x input dtype (bf16, fp32) x
compute capability (sm_80 A100, sm_86 RTX 3060, sm_90 H100) is compiled with triton.compile,
and the PTX is fed to the ptxas bundled with Triton in verbose mode to read registers, spill
bytes and stack; shared memory comes from the compiled metadata, the widest vector global load
and store from the PTX. A kernel that fails to compile or spills makes the command exit non-zero.

--triton-path DIR runs the same in a child process with DIR first on PYTHONPATH (a Triton
installed with `pip install --no-deps --target DIR triton==3.6.0`): the oldest Triton we
support, checked beside the installed one.

Why re-run ptxas: the compiled object only learns n_regs / n_spills when a driver loads the
cubin, which needs a GPU. ptxas -v reports the same numbers from the PTX alone.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from engine.data.atomic import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = (80, 86, 90)
DTYPES = ("bf16", "fp32")
# The seed shapes: micro-batch 2 x 2048 tokens, Pythia's padded vocabulary, top-64 targets.
SEED_TOKENS, SEED_VOCAB, SEED_VALID_VOCAB, SEED_TOP_K = 4096, 50304, 50277, 64


def _meta(shape, dtype):
    import torch

    return torch.empty(shape, dtype=dtype, device="meta")


def _kd_launch(divergence: str):
    """kd_loss_forward_triton at the seed shapes, gradient in place (as the fused head and
    kd_loss(inplace_grad=True) run it)."""
    def launch(dtype):
        import torch

        from engine.kernels.kd_loss_triton import kd_loss_forward_triton
        from engine.kernels.loss_spec import LossOptions

        s = _meta((SEED_TOKENS, SEED_VOCAB), dtype)
        kd_loss_forward_triton(s, _meta((SEED_TOKENS, SEED_VOCAB), dtype),
                               _meta((SEED_TOKENS,), torch.int64), s,
                               LossOptions(alpha=0.5, temperature=2.0, ignore_index=-100,
                                           valid_vocab=SEED_VALID_VOCAB, divergence=divergence),
                               inv_norm=_meta((), torch.float32))
    return launch


def _sparse_launch(write_grad: bool):
    """sparse_kd_forward_triton at the seed shapes with top-64 targets as the teacher cache
    hands them over (int32 ids, fp32 masses); the gradient in place, or forward only."""
    def launch(dtype):
        import torch

        from engine.kernels.loss_spec import LossOptions
        from engine.kernels.sparse_kd_triton import sparse_kd_forward_triton
        from engine.kernels.sparse_targets import SparseTargets

        n, k = SEED_TOKENS, SEED_TOP_K
        targets = SparseTargets(_meta((n, k), torch.int32), _meta((n, k), torch.float32),
                                _meta((n,), torch.int32), _meta((n,), torch.float32),
                                _meta((n,), torch.float32))
        s = _meta((n, SEED_VOCAB), dtype)
        sparse_kd_forward_triton(s, targets, _meta((n,), torch.int64), s if write_grad else None,
                                 LossOptions(alpha=0.5, temperature=2.0, ignore_index=-100,
                                             valid_vocab=SEED_VALID_VOCAB),
                                 inv_norm=_meta((), torch.float32))
    return launch


def kernel_launches() -> dict:
    """name -> launch(dtype): every kernel build to check, each launched as the engine does.

    The loss kernel is one source but a different program per divergence (a constexpr), so
    each divergence is built and checked for spills on its own. A new kernel adds a row."""
    from engine.kernels.divergences import DIVERGENCES

    launches = {f"kd_loss_fwd_bwd_kernel[{name}]": _kd_launch(name) for name in DIVERGENCES}
    launches["sparse_kd_fwd_bwd_kernel[grad]"] = _sparse_launch(True)
    launches["sparse_kd_fwd_bwd_kernel[forward]"] = _sparse_launch(False)
    return launches


class _HostlessPointer:
    """A meta tensor as Triton's specialiser sees an argument: its dtype and an address,
    which the CUDA caching allocator aligns to 512 bytes, plus the view's offset."""

    def __init__(self, tensor):
        self.dtype = tensor.dtype
        self.address = 512 + tensor.storage_offset() * tensor.element_size()

    def data_ptr(self) -> int:
        return self.address


@contextlib.contextmanager
def recorded_launches():
    """Within: every Triton kernel launch is recorded as (kernel, args, kwargs), not run."""
    from triton.runtime.jit import JITFunction

    launches = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        launches.append((self, args, kwargs))

    JITFunction.run = record
    try:
        yield launches
    finally:
        JITFunction.run = original


def capture(launch, dtype_name: str) -> tuple:
    """(kernel, args, kwargs) of the one launch `launch` makes with `dtype_name` logits."""
    import torch

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    with recorded_launches() as launches:
        launch(dtype)
    if len(launches) != 1:
        raise RuntimeError(f"expected one kernel launch, the launcher made {len(launches)}")
    kernel, args, kwargs = launches[0]
    as_arg = lambda v: _HostlessPointer(v) if isinstance(v, torch.Tensor) else v
    return kernel, [as_arg(v) for v in args], {k: as_arg(v) for k, v in kwargs.items()}


def specialise(kernel, args, kwargs, capability: int):
    """(ASTSource, target, options) exactly as JITFunction.run builds them on this target."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", capability, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound,
                                                              specialization, options)
    return ASTSource(kernel, signature, constexprs, attrs), target, options


def describe_specialisation(source) -> str:
    """The runtime specialisation in a few words: which arguments carry tt.divisibility = 16
    (pointers counted, integers named) and which integers became constants."""
    names = [p.name for p in source.fn.params]
    divisible = sorted(names[key[0]] for key, values in source.attrs.items()
                       if ["tt.divisibility", 16] in [list(v) for v in values])
    pointers = [n for n in divisible if str(source.signature[n]).startswith("*")]
    ints = [n for n in divisible if n not in pointers]
    constexpr_params = {p.name for p in source.fn.params if p.is_constexpr}
    ones = [names[key[0]] for key in source.constants
            if names[key[0]] not in constexpr_params]
    text = f"d16: {len(pointers)} ptrs" + (f", {', '.join(ints)}" if ints else "")
    return text + (f"; =1: {', '.join(ones)}" if ones else "")


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


_VECTOR = {kind: re.compile(kind + r"\.global[\w.:]*?\.v(\d)") for kind in ("ld", "st")}


def compile_one(kernel, args, kwargs, capability: int) -> dict:
    """Compile one captured launch for one capability; ptxas usage and the specialisation."""
    import triton

    source, target, options = specialise(kernel, args, kwargs, capability)
    compiled = triton.compile(source, target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    usage = ptxas_usage(ptx, capability)
    metadata = compiled.metadata
    shared = metadata.get("shared", 0) if isinstance(metadata, dict) else metadata.shared
    usage.update(shared_bytes=int(shared), num_warps=options.num_warps,
                 specialisation=describe_specialisation(source),
                 vector_load=max(map(int, _VECTOR["ld"].findall(ptx)), default=1),
                 vector_store=max(map(int, _VECTOR["st"].findall(ptx)), default=1),
                 constexprs={source.fn.params[key[0]].name: value
                             for key, value in source.constants.items()
                             if isinstance(value, (bool, int, float))})
    return usage


def _row(name: str, dtype: str, capability: int, captured: tuple) -> dict:
    row = {"kernel": name, "dtype": dtype, "capability": capability}
    try:
        row.update(compile_one(*captured, capability))
        spilled = row["spill_store_bytes"] + row["spill_load_bytes"]
        row["status"] = "ok" if spilled == 0 else "SPILLS"
    except Exception as error:  # report every failure, then fail the command
        row["status"] = "FAILED"
        row["error"] = f"{type(error).__name__}: {error}"
    return row


def _print_row(row: dict) -> None:
    name, dtype, cc = row["kernel"], row["dtype"], row["capability"]
    if row["status"] == "FAILED":
        print(f"{name:<36} {dtype:<5} sm_{cc:<4} FAILED:\n{row['error'][-2000:]}", flush=True)
        return
    spills = f"{row['spill_store_bytes']}/{row['spill_load_bytes']}"
    vectors = f"v{row['vector_load']}/v{row['vector_store']}"
    print(f"{name:<36} {dtype:<5} {row['gpu_name']:<6} {row['num_warps']:>5} "
          f"{row['registers']:>4} {spills:>9} {row['stack_bytes']:>5} {row['shared_bytes']:>6} "
          f"{vectors:>6}  {row['status']:<6} "
          f"{row['specialisation']}",
          flush=True)


def run_in_other_triton(triton_path: Path, argv: list[str]) -> int:
    """This command in a child process with `triton_path` first on PYTHONPATH."""
    if not (triton_path / "triton" / "__init__.py").is_file():
        print(f"error: --triton-path {triton_path}: no triton package in that folder",
              file=sys.stderr)
        return 2
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(triton_path), str(REPO_ROOT)])
    return subprocess.run([sys.executable, "-m", "tools.compile_kernels", *argv], cwd=REPO_ROOT,
                          env=env).returncode


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also write the table as JSON here")
    parser.add_argument("--only", default=None,
                        help="only the kernels whose name contains this text")
    parser.add_argument("--arch", default=",".join(map(str, CAPABILITIES)),
                        help="compute capabilities, comma-separated (default: 80,86,90)")
    parser.add_argument("--triton-path", type=Path, default=None,
                        help="run with the triton package installed in this folder")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    if args.triton_path is not None:
        rest = [a for i, a in enumerate(argv) if a != "--triton-path"
                and not a.startswith("--triton-path=")
                and (i == 0 or argv[i - 1] != "--triton-path")]
        return run_in_other_triton(args.triton_path.resolve(), rest)
    if os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter replaces @triton.jit functions with Python ones that cannot be compiled.
        print("error: unset TRITON_INTERPRET to compile kernels ahead of time", file=sys.stderr)
        return 2
    import triton

    capabilities = [int(c) for c in args.arch.split(",")]
    header = (f"{'kernel':<36} {'dtype':<5} {'arch':<6} {'warps':>5} {'regs':>4} "
              f"{'spill B':>9} {'stack':>5} {'shared':>6} {'ld/st':>6}  {'status':<6} "
              "specialisation")
    print(f"triton {triton.__version__} ({Path(triton.__file__).parent})")
    print(header)
    print("-" * len(header))
    rows = []
    for name, launch in kernel_launches().items():
        if args.only and args.only not in name:
            continue
        for dtype in DTYPES:
            captured = capture(launch, dtype)
            for capability in capabilities:
                rows.append(_row(name, dtype, capability, captured))
                _print_row(rows[-1])
    failures = sum(row["status"] != "ok" for row in rows)
    if args.json:
        write_json_atomic(args.json, {"triton": triton.__version__, "kernels": rows},
                          default=str, trailing_newline=False)
    if failures:
        print(f"{failures} kernel build(s) failed or spilled", file=sys.stderr)
        return 1
    print(f"all {len(rows)} kernel builds compiled without spills")
    return 0


if __name__ == "__main__":
    sys.exit(main())
