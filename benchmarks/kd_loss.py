"""Throughput and memory of the fused KD + CE loss against the naive PyTorch composite.

    python -m benchmarks.kd_loss [--smoke] [--json PATH] [--repeats N] [--sweep]

CPU (always): the naive composite (log_softmax at T, kl_div, cross_entropy, autograd) against our
chunked PyTorch path, default and in-place gradient, at N=4096 x V=50304 in fp32 and bf16. Each
variant runs in its own subprocess so its peak resident memory (VmHWM after resetting it through
/proc/self/clear_refs, minus the resident size once the inputs exist) is its own. Prints ratios.

CUDA (when present): correctness of the Triton kernel against the float64 reference, then forward
+ backward median time (CUDA events) for ours, the eager naive composite and torch.compile of it,
effective bandwidth counting 5 x element size bytes per logit (10 B for bf16: two streaming reads of
student and teacher, one gradient write) against a device copy bandwidth measured in the same run,
and peak memory. `--sweep` times the kernel over block sizes and warp counts.

`--smoke` runs the same code paths tiny, on CPU here, so the GPU branch works the first time it
meets a GPU. `gpu_correctness()` and `gpu_speed()` live in benchmarks/common.py: the GPU suite
calls them too.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import (
    ALPHA,
    KERNEL_DTYPES,
    RESULTS_DIR,
    TEMPERATURE,
    VALID_VOCAB_PAD,
    current_device,
    gpu_correctness,
    gpu_speed,
    loss_step_fn,
    make_inputs,
    proc_status_mib,
    reset_peak_rss,
    timed,
)
from data.atomic import write_json_atomic
from kernels.constants import IGNORE_INDEX

DEFAULT_JSON = RESULTS_DIR / "kd_loss.json"


# ----------------------------------------------------------------------------- CPU, per process
def cpu_worker(variant, dtype_name, n, vocab, repeats, threads):
    """Runs inside its own process: time and peak RSS delta of one variant."""
    torch.set_num_threads(threads)
    student, teacher, labels = make_inputs(n, vocab, KERNEL_DTYPES[dtype_name], "cpu")
    valid_vocab = vocab - VALID_VOCAB_PAD
    run = loss_step_fn(variant, backend="torch")
    times = []
    peak_delta = 0.0
    for i in range(repeats + 1):  # the first call warms allocator and caches
        x = student.detach().clone().requires_grad_(True)
        baseline = proc_status_mib("VmRSS")
        exact = reset_peak_rss()  # True only where /proc is there, so both readings are too
        start = time.perf_counter()
        run(x, teacher, labels, valid_vocab)
        elapsed = time.perf_counter() - start
        peak = proc_status_mib("VmHWM")
        if i > 0:
            times.append(elapsed)
        if exact:
            peak_delta = max(peak_delta, peak - baseline)
        del x
    return {
        "variant": variant,
        "dtype": dtype_name,
        "n_tokens": n,
        "vocab": vocab,
        "median_s": statistics.median(times),
        "peak_rss_delta_mib": peak_delta,
        "peak_measured": exact,
        "threads": threads,
    }


def cpu_compare(n, vocab, repeats, threads):
    rows = []
    for dtype_name in KERNEL_DTYPES:
        for variant in ("naive", "ours", "ours_inplace"):
            cmd = [sys.executable, "-m", "benchmarks.kd_loss", "--_worker",
                   json.dumps([variant, dtype_name, n, vocab, repeats, threads])]
            result = subprocess.run(cmd, capture_output=True, text=True)
            if result.returncode != 0:
                raise RuntimeError(f"worker {variant}/{dtype_name} failed:\n{result.stderr}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
    for row in rows:
        naive = next(r for r in rows if r["dtype"] == row["dtype"] and r["variant"] == "naive")
        row["time_ratio_vs_naive"] = row["median_s"] / naive["median_s"]
        row["memory_ratio_vs_naive"] = (row["peak_rss_delta_mib"] / naive["peak_rss_delta_mib"]
                                        if naive["peak_rss_delta_mib"] > 0 else None)
    return rows


def print_cpu_table(rows):
    n, vocab = rows[0]["n_tokens"], rows[0]["vocab"]
    print(f"\nCPU, N={n} x V={vocab}, fwd+bwd, each variant in its own process, "
          f"{rows[0]['threads']} thread(s)")
    print(f"{'variant':<14}{'dtype':<6}{'median s':>10}{'peak MiB':>10}{'time/naive':>12}"
          f"{'mem/naive':>11}")
    for r in rows:
        mem = r["memory_ratio_vs_naive"]
        print(f"{r['variant']:<14}{r['dtype']:<6}{r['median_s']:>10.3f}"
              f"{r['peak_rss_delta_mib']:>10.0f}{r['time_ratio_vs_naive']:>12.2f}"
              f"{(f'{mem:.3f}' if mem is not None else 'n/a'):>11}")


# ----------------------------------------------------------------------------- GPU (and smoke)
def kernel_sweep(n_tokens, vocab, dtype, repeats):
    """Median kernel time over block sizes and warp counts (CUDA only): where launch_config
    comes from."""
    from kernels.kd_loss_torch import inverse_normalizer
    from kernels.kd_loss_triton import kd_loss_forward_triton

    dev = current_device()
    student, teacher, labels = make_inputs(n_tokens, vocab, dtype, dev)
    grad = torch.empty_like(student)
    inv_norm = inverse_normalizer(None, (labels != IGNORE_INDEX).sum())
    elem = student.element_size()
    rows = []
    configs = [(b, w, None) for b in (512, 1024, 2048, 4096) for w in (2, 4, 8)]
    configs += [(b, w, st) for b in (512, 1024) for w in (4, 8) for st in (1, 2, 4)]
    for block, warps, stages in configs:
        fn = lambda b=block, w=warps, st=stages: kd_loss_forward_triton(
            student, teacher, labels, grad, alpha=ALPHA, temperature=TEMPERATURE,
            ignore_index=IGNORE_INDEX, valid_vocab=vocab - VALID_VOCAB_PAD, inv_norm=inv_norm,
            block_size=b, num_warps=w, num_stages=st)
        seconds = timed(fn, repeats, dev)
        rows.append({"block": block, "warps": warps, "stages": stages,
                     "median_ms": seconds * 1e3,
                     "gbps": n_tokens * vocab * 5 * elem / seconds / 1e9})
    return rows


def print_gpu(correctness, speeds, sweep):
    print("\nKernel correctness against float64 reference")
    print(f"{'case':<42}{'backend':<8}{'loss rel':>10}{'grad rel':>10}  ok")
    for r in correctness:
        print(f"{r['case']:<42}{r['backend']:<8}{r['loss_rel_err']:>10.1e}"
              f"{r['grad_rel_err']:>10.1e}  {'yes' if r['passed'] else 'NO'}")
    for speed in speeds:
        print(f"\nfwd+bwd on {speed['device']} ({speed['backend']}), N={speed['n_tokens']} "
              f"V={speed['vocab']} {speed['dtype']}, copy bandwidth {speed['copy_gbps']:.0f} GB/s")
        print(f"{'variant':<16}{'median ms':>10}{'GB/s':>8}{'of copy':>9}{'peak MiB':>10}"
              f"{'vs eager':>10}")
        for name, r in speed["variants"].items():
            peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
            print(f"{name:<16}{r['median_ms']:>10.3f}{r['gbps']:>8.0f}"
                  f"{r['fraction_of_copy']:>9.2f}{peak:>10}{r['speedup_vs_eager']:>9.2f}x")
    if sweep:
        print("\nKernel sweep (forward kernel only)")
        for r in sweep:
            print(f"block {r['block']:>5} warps {r['warps']:>2} stages {r.get('stages')}: "
                  f"{r['median_ms']:.3f} ms "
                  f"{r['gbps']:.0f} GB/s")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths")
    parser.add_argument("--json", type=Path, default=None, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="CUDA: block size / warps sweep")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per variant (1: stable on a shared machine)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._worker:
        print(json.dumps(cpu_worker(*json.loads(args._worker))))
        return 0

    n, vocab = (64, 1000) if args.smoke else (4096, 50304)
    cpu_repeats = args.repeats or (1 if args.smoke else 3)
    payload = {"smoke": args.smoke, "torch": torch.__version__}
    payload["cpu"] = cpu_compare(n, vocab, cpu_repeats, args.threads)
    print_cpu_table(payload["cpu"])

    passed = True
    if torch.cuda.is_available() or args.smoke:
        gpu_repeats = args.repeats or 50
        payload["correctness"] = gpu_correctness(smoke=args.smoke)
        payload["speed"] = [
            gpu_speed(4096, 50304, dtype, repeats=gpu_repeats, smoke=args.smoke)
            for dtype in (torch.bfloat16, torch.float32)
        ]
        payload["sweep"] = (kernel_sweep(4096, 50304, torch.bfloat16, gpu_repeats)
                            if args.sweep and torch.cuda.is_available() else [])
        print_gpu(payload["correctness"], payload["speed"], payload["sweep"])
        passed = all(r["passed"] for r in payload["correctness"])
    else:
        print("\nno CUDA device: GPU section skipped (run with --smoke to exercise its code)")
    path = args.json or DEFAULT_JSON
    write_json_atomic(path, payload, trailing_newline=False)
    if not passed:
        print("kernel correctness check FAILED", file=sys.stderr)
        return 1
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
