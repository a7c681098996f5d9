"""Throughput and memory of the fused KD + CE loss, of the fused heads + loss, per divergence.

    python -m benchmarks.kd_loss [--section all|loss|head|divergences] [--smoke] [--json PATH]
                                 [--repeats N] [--sweep]

CPU (always), each section printing its comparison side by side:
  loss         the naive composite (log_softmax at T, kl_div, cross_entropy, autograd) against our
               chunked PyTorch path, default and in-place gradient, at N=4096 x V=50304 in fp32 and
               bf16 (issue 11 item 4: default mode <= 1/4 of the naive peak).
  head         engine.kernels.kd_head_loss (both LM heads inside the loss, chunk by chunk) against
  the head
               matmuls + kd_loss (default mode, and the in-place gradient the training step used),
               N=4096, student hidden 512, teacher hidden 768, V=50304, fp32 (issue 11: extra peak
               <= 1/8, time <= 1.1x).
  divergences  kd_loss forward + backward per divergence against forward_kl, 512 x 50304 fp32
               (issue 13: <= 1.3x on the CPU).
Memory: each variant runs in its own subprocess, so its peak resident memory (VmHWM after resetting
it through /proc/self/clear_refs, minus the resident size once the inputs exist) is its own. Time:
process CPU time of one thread (on a shared machine wall-clock time mostly measures the
neighbours); the head's time comes from in-process repeats interleaved fused / unfused, the
divergences' likewise, so a busy minute hits every variant alike.

CUDA (when present): correctness of the Triton kernel against the float64 reference, then forward
+ backward median time (CUDA events) for ours, the eager naive composite and torch.compile of it,
effective bandwidth counting 5 x element size bytes per logit (10 B for bf16: two streaming reads of
student and teacher, one gradient write) against a device copy bandwidth measured in the same run,
and peak memory; per-divergence times. `--sweep` times the kernel over block sizes and warp counts.
The fused head's GPU figures are in the GPU suite (benchmarks/gpu_suite.py).

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
    SEED_HEAD,
    TEMPERATURE,
    VALID_VOCAB_PAD,
    current_device,
    divergence_times,
    gpu_correctness,
    gpu_speed,
    head_inputs,
    head_step,
    kernel_backend,
    loss_step_fn,
    make_inputs,
    proc_status_mib,
    reset_peak_rss,
    timed,
)
from engine.data.atomic import write_json_atomic
from engine.kernels.constants import IGNORE_INDEX

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


def _run_worker(kind: str, arguments: list) -> dict:
    """One measurement in a fresh process (its own peak RSS); the result row it printed."""
    cmd = [sys.executable, "-m", "benchmarks.kd_loss", "--_worker", json.dumps([kind,
                                                                                *arguments])]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"worker {kind} {arguments[:2]} failed:\n{result.stderr}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def cpu_compare(n, vocab, repeats, threads):
    rows = []
    for dtype_name in KERNEL_DTYPES:
        for variant in ("naive", "ours", "ours_inplace"):
            rows.append(_run_worker("loss", [variant, dtype_name, n, vocab, repeats, threads]))
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


# ----------------------------------------------------------------------------- the fused head
HEAD_VARIANTS = {  # name: (benchmarks.common.head_step variant, its options)
    "fused": ("fused", {}),
    "unfused_default": ("unfused", {"inplace_grad": False}),
    "unfused_inplace": ("unfused", {"inplace_grad": True}),
}


def _head_run(name, shape):
    variant, options = HEAD_VARIANTS[name]
    inputs = head_inputs(**shape, dtype=torch.float32, dev=torch.device("cpu"))
    return head_step(variant, inputs, backend="torch", **options)


def head_memory_worker(name, shape, threads):
    """Runs inside its own process: the peak RSS one forward + backward adds (second call)."""
    torch.set_num_threads(threads)
    run, leaves = _head_run(name, shape)
    peak_delta, exact = 0.0, False
    for _ in range(2):  # the first call warms allocator and caches
        for leaf in leaves:
            leaf.grad = None
        baseline = proc_status_mib("VmRSS")
        exact = reset_peak_rss()
        run()
        if exact:
            peak_delta = proc_status_mib("VmHWM") - baseline
    return {"variant": name, "peak_rss_delta_mib": peak_delta, "peak_measured": exact}


def head_compare(shape, repeats, threads):
    """Peak memory per variant (own processes) and CPU time per variant (one process, the
    variants interleaved repeat by repeat)."""
    rows = {}
    for name in HEAD_VARIANTS:
        rows[name] = _run_worker("head", [name, shape, threads])
    torch.set_num_threads(threads)
    runs = {name: _head_run(name, shape)[0] for name in HEAD_VARIANTS}
    cpu_times = {name: [] for name in HEAD_VARIANTS}
    for repeat in range(repeats + 1):
        for name, run in runs.items():
            start = time.process_time()
            run()
            if repeat:
                cpu_times[name].append(time.process_time() - start)
    for name, row in rows.items():
        row.update(median_cpu_s=statistics.median(cpu_times[name]),
                   min_cpu_s=min(cpu_times[name]))
    fused = rows["fused"]
    for baseline in ("unfused_default", "unfused_inplace"):
        base = rows[baseline]
        fused[f"memory_vs_{baseline}"] = (fused["peak_rss_delta_mib"] / base["peak_rss_delta_mib"]
                                          if base["peak_rss_delta_mib"] > 0 else None)
        fused[f"time_vs_{baseline}"] = fused["median_cpu_s"] / base["median_cpu_s"]
        fused[f"min_time_vs_{baseline}"] = fused["min_cpu_s"] / base["min_cpu_s"]
    return {**shape, "dtype": "fp32", "threads": threads, "repeats": repeats, "rows": rows}


def print_head_table(head):
    print(f"\nCPU, fused heads + loss vs head matmuls + kd_loss: N={head['n_tokens']}, hidden "
          f"{head['student_hidden']} / {head['teacher_hidden']}, V={head['vocab']}, fp32, "
          f"fwd+bwd, {head['threads']} thread(s), CPU time median of {head['repeats']}")
    print(f"{'variant':<17}{'CPU s':>8}{'min s':>8}{'peak MiB':>10}")
    for name, row in head["rows"].items():
        print(f"{name:<17}{row['median_cpu_s']:>8.2f}{row['min_cpu_s']:>8.2f}"
              f"{row['peak_rss_delta_mib']:>10.0f}")
    fused = head["rows"]["fused"]
    for baseline in ("unfused_default", "unfused_inplace"):
        memory = fused[f"memory_vs_{baseline}"]
        print(f"fused / {baseline}: extra peak memory "
              f"{f'{memory:.3f}' if memory is not None else 'n/a'} (target <= 0.125), CPU time "
              f"{fused[f'time_vs_{baseline}']:.2f}x median, "
              f"{fused[f'min_time_vs_{baseline}']:.2f}x min (target <= 1.1x)")


# ----------------------------------------------------------------------------- per divergence
def divergence_compare(n, vocab, repeats, threads, dev=None, dtype=torch.float32):
    """kd_loss forward + backward per divergence on the same logits, against forward_kl."""
    dev = dev or torch.device("cpu")
    if dev.type == "cpu":
        torch.set_num_threads(threads)
    backend = kernel_backend(dev) if dev.type == "cuda" else "torch"
    seconds = divergence_times(n, vocab, dtype, dev, repeats, backend)
    return {"n_tokens": n, "vocab": vocab, "device": dev.type, "backend": backend,
            "dtype": str(dtype).replace("torch.", ""), "repeats": repeats,
            "seconds": seconds,
            "vs_forward_kl": {k: v / seconds["forward_kl"] for k, v in seconds.items()}}


def print_divergence_table(div):
    unit = "CPU s" if div["device"] == "cpu" else "ms"
    scale = 1.0 if div["device"] == "cpu" else 1e3
    target = "1.3x" if div["device"] == "cpu" else "1.2x"
    print(f"\n{div['device']} ({div['backend']}), kd_loss fwd+bwd per divergence, "
          f"N={div['n_tokens']} x V={div['vocab']} {div['dtype']}, median of {div['repeats']} "
          f"interleaved (target <= {target} of forward_kl)")
    for name, value in div["seconds"].items():
        print(f"{name:<17}{value * scale:>9.3f} {unit}{div['vs_forward_kl'][name]:>8.2f}x")


# ----------------------------------------------------------------------------- GPU (and smoke)
def kernel_sweep(n_tokens, vocab, dtype, repeats):
    """Median kernel time over block sizes and warp counts (CUDA only): where launch_config
    comes from."""
    from engine.kernels.kd_loss_triton import kd_loss_forward_triton
    from engine.kernels.loss_spec import LossOptions, inverse_normalizer

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
            student, teacher, labels, grad,
            LossOptions(alpha=ALPHA, temperature=TEMPERATURE, ignore_index=IGNORE_INDEX,
                        valid_vocab=vocab - VALID_VOCAB_PAD),
            inv_norm=inv_norm, block_size=b, num_warps=w, num_stages=st)
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


WORKERS = {"loss": cpu_worker, "head": head_memory_worker}
SECTIONS = ("loss", "head", "divergences")


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--section", choices=("all", *SECTIONS), default="all")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, same code paths")
    parser.add_argument("--json", type=Path, default=None, help=f"default {DEFAULT_JSON}")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--sweep", action="store_true", help="CUDA: block size / warps sweep")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per variant (1: stable on a shared machine)")
    parser.add_argument("--_worker", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_cpu_sections(args, payload):
    """The CPU comparisons asked for, each printed as it finishes."""
    wanted = SECTIONS if args.section == "all" else (args.section,)
    if "loss" in wanted:
        n, vocab = (64, 1000) if args.smoke else (4096, 50304)
        payload["cpu"] = cpu_compare(n, vocab, args.repeats or (1 if args.smoke else 3),
                                     args.threads)
        print_cpu_table(payload["cpu"])
    if "head" in wanted:
        shape = (dict(n_tokens=64, student_hidden=32, teacher_hidden=48, vocab=1000)
                 if args.smoke else SEED_HEAD)
        payload["head"] = head_compare(shape, args.repeats or (1 if args.smoke else 3),
                                       args.threads)
        print_head_table(payload["head"])
    if "divergences" in wanted:
        n, vocab = (16, 1000) if args.smoke else (512, 50304)
        payload["divergences_cpu"] = divergence_compare(
            n, vocab, args.repeats or (1 if args.smoke else 7), args.threads)
        print_divergence_table(payload["divergences_cpu"])


def run_gpu_sections(args, payload) -> bool:
    """Correctness, speed and per-divergence rows on CUDA (tiny on CPU with --smoke)."""
    gpu_repeats = args.repeats or 50
    payload["correctness"] = gpu_correctness(smoke=args.smoke)
    payload["speed"] = [
        gpu_speed(4096, 50304, dtype, repeats=gpu_repeats, smoke=args.smoke)
        for dtype in (torch.bfloat16, torch.float32)
    ]
    payload["sweep"] = (kernel_sweep(4096, 50304, torch.bfloat16, gpu_repeats)
                        if args.sweep and torch.cuda.is_available() else [])
    print_gpu(payload["correctness"], payload["speed"], payload["sweep"])
    if torch.cuda.is_available():
        payload["divergences_gpu"] = divergence_compare(
            4096, 50304, min(gpu_repeats, 20), args.threads, current_device(), torch.bfloat16)
        print_divergence_table(payload["divergences_gpu"])
    return all(r["passed"] for r in payload["correctness"])


def main(argv=None):
    args = _parse(argv)
    if args._worker:
        kind, *arguments = json.loads(args._worker)
        print(json.dumps(WORKERS[kind](*arguments)))
        return 0
    path = args.json or DEFAULT_JSON
    payload = _previous_results(path)  # a section run alone keeps the others' last results
    payload.update(smoke=args.smoke, torch=torch.__version__)
    run_cpu_sections(args, payload)
    passed = True
    if torch.cuda.is_available() or (args.smoke and args.section in ("all", "loss")):
        passed = run_gpu_sections(args, payload)
    else:
        print("\nno CUDA device: GPU section skipped (run with --smoke to exercise its code)")
    write_json_atomic(path, payload, trailing_newline=False)
    if not passed:
        print("kernel correctness check FAILED", file=sys.stderr)
        return 1
    print(f"\nwrote {path}")
    return 0


def _previous_results(path: Path) -> dict:
    try:
        previous = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return previous if isinstance(previous, dict) else {}


if __name__ == "__main__":
    sys.exit(main())
