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
meets a GPU. `gpu_correctness()` and `gpu_speed()` are also called by benchmarks/gpu_suite.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.model_load import proc_status_mib, reset_peak_rss
from data.atomic import write_json_atomic
from kernels.kd_loss import kd_loss, kd_loss_reference

DEFAULT_JSON = Path("benchmarks/results/kd_loss.json")
ALPHA, TEMPERATURE, VALID_VOCAB_PAD = 0.5, 2.0, 27  # Pythia: 50304 columns, 50277 real ids
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------- the contenders
def naive_kd_loss(student, teacher, labels, *, alpha=ALPHA, temperature=TEMPERATURE,
                  valid_vocab=None, ignore_index=-100):
    """The composite most code writes: fp32 log-softmaxes, kl_div, cross_entropy, autograd."""
    vv = valid_vocab or student.shape[-1]
    s = student[:, :vv].float()
    t = teacher[:, :vv].float()
    valid = labels != ignore_index
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    kd = torch.nn.functional.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="none",
                                           ignore_index=ignore_index)
    token = (1 - alpha) * temperature**2 * kd * valid + alpha * ce
    return token.sum() / valid.sum().clamp_min(1)


def make_inputs(n, vocab, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student = (torch.randn(n, vocab, generator=gen) * 2).to(device=device, dtype=dtype)
    teacher = (torch.randn(n, vocab, generator=gen) * 2).to(device=device, dtype=dtype)
    labels = torch.randint(0, vocab - VALID_VOCAB_PAD, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.1] = -100
    return student, teacher, labels.to(device)


def step_fn(variant, backend="auto", compiled=None):
    """A callable (student, teacher, labels) -> None doing forward + backward of one variant."""
    def run(student, teacher, labels, valid_vocab):
        if variant == "naive":
            loss = naive_kd_loss(student, teacher, labels, valid_vocab=valid_vocab)
        elif variant == "compiled":
            loss = compiled(student, teacher, labels, valid_vocab=valid_vocab)
        else:
            loss, _ = kd_loss(student, teacher, labels, alpha=ALPHA, temperature=TEMPERATURE,
                              valid_vocab=valid_vocab, backend=backend,
                              inplace_grad=variant == "ours_inplace")
        loss.backward()
        student.grad = None
    return run


# ----------------------------------------------------------------------------- CPU, per process
def cpu_worker(variant, dtype_name, n, vocab, repeats, threads):
    """Runs inside its own process: time and peak RSS delta of one variant."""
    torch.set_num_threads(threads)
    student, teacher, labels = make_inputs(n, vocab, DTYPES[dtype_name], "cpu")
    valid_vocab = vocab - VALID_VOCAB_PAD
    run = step_fn(variant, backend="torch")
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
    for dtype_name in DTYPES:
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
def _device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _kernel_backend(device):
    """Triton on CUDA or under the interpreter; otherwise the torch path (smoke on plain CPU)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


def _timed(fn, repeats, device, warmup=2):
    """Median seconds of fn() over `repeats`: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device, n_bytes, repeats):
    """Device memory bandwidth of a plain copy (read + write), bytes / second."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    seconds = _timed(lambda: dst.copy_(src), repeats, device)
    return 2 * src.numel() * 4 / seconds


def gpu_correctness(smoke=False):
    """Our kernel against the float64 reference on the GPU (odd shapes, padding, ignored tokens).

    Returns one dict per case: case, loss_rel_err, grad_rel_err, passed (fp32: 1e-5 / 1e-4,
    bf16: 1e-2).
    """
    device = _device()
    backend = _kernel_backend(device)
    if smoke:
        shapes = [(5, 257, 250), (3, 1000, None)]
    else:
        shapes = [(1, 50304, 50277), (7, 50277, None), (300, 50304, 50277), (1027, 32003, 32000)]
    results = []
    for n, vocab, valid_vocab in shapes:
        for dtype_name, dtype in DTYPES.items():
            for temperature in (1.0, 2.0, 4.0):
                student, teacher, labels = make_inputs(n, vocab, dtype, device,
                                                       seed=n + vocab + int(temperature))
                labels[0] = -100  # at least one ignored token in every case
                kwargs = dict(alpha=0.5, temperature=temperature, valid_vocab=valid_vocab)
                s64 = student.detach().double().requires_grad_(True)
                ref, _ = kd_loss_reference(s64, teacher.double(), labels, **kwargs)
                ref.backward()
                s = student.detach().clone().requires_grad_(True)
                loss, _ = kd_loss(s, teacher, labels, backend=backend, **kwargs)
                loss.backward()
                loss_err = abs(loss.double().item() - ref.item()) / max(abs(ref.item()), 1e-30)
                ref_norm = s64.grad.norm().item()
                diff = (s.grad.double() - s64.grad).norm().item()
                # All-ignored rows (N=1 with its only label ignored) have a zero reference
                # gradient: ours must then be exactly zero too.
                grad_err = diff / ref_norm if ref_norm > 0 else diff
                loss_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
                results.append({
                    "case": f"N={n} V={vocab} vv={valid_vocab} {dtype_name} T={temperature}",
                    "backend": backend,
                    "loss_rel_err": loss_err,
                    "grad_rel_err": grad_err,
                    "passed": bool(loss_err <= loss_tol and grad_err <= grad_tol),
                })
    return results


def gpu_speed(n_tokens=4096, vocab=50304, dtype=torch.bfloat16, repeats=50, smoke=False):
    """Forward + backward of ours / eager naive / torch.compile naive on the current device.

    Returns {"device", "n_tokens", "vocab", "dtype", "copy_gbps", "variants": {name: {median_ms,
    gbps, fraction_of_copy, peak_mib, speedup_vs_eager}}}. Bandwidth counts 5 x element size
    bytes per logit (10 for bf16). On CPU (smoke) peak memory is not measured (None).
    """
    device = _device()
    warmup = 2
    if smoke:  # tiny: under TRITON_INTERPRET=1 every kernel row costs milliseconds
        n_tokens, vocab, repeats, warmup = 16, 1000, 1, 1
    backend = _kernel_backend(device)
    valid_vocab = vocab - VALID_VOCAB_PAD
    elem = torch.empty((), dtype=dtype).element_size()
    bytes_moved = n_tokens * vocab * 5 * elem
    copy_bps = copy_bandwidth(device, 1 << (20 if smoke else 30), max(repeats, 5))
    # Inductor on a GPU; on CPU (smoke) dynamo with the eager backend exercises the same path
    # without needing a C++ toolchain.
    compiled = torch.compile(naive_kd_loss, backend="inductor" if device.type == "cuda"
                             else "eager")
    variants = {
        "ours_inplace": step_fn("ours_inplace", backend),
        "ours": step_fn("ours", backend),
        "naive_eager": step_fn("naive"),
        "naive_compiled": step_fn("compiled", compiled=compiled),
    }
    student, teacher, labels = make_inputs(n_tokens, vocab, dtype, device)
    out = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "backend": backend, "n_tokens": n_tokens, "vocab": vocab,
           "dtype": str(dtype).replace("torch.", ""), "copy_gbps": copy_bps / 1e9,
           "variants": {}}
    for name, run in variants.items():
        # ours_inplace overwrites its logits with the gradient on every call, so it gets a copy
        # of its own; the values stay finite and small, which is all the timing needs.
        x = student.detach()
        if name == "ours_inplace":
            x = x.clone()
        x.requires_grad_(True)
        fn = lambda run=run, x=x: run(x, teacher, labels, valid_vocab)
        peak_mib = None
        if device.type == "cuda":
            fn()  # compile / warm up before measuring memory
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak_mib = (torch.cuda.max_memory_allocated() - base) / 2**20
        seconds = _timed(fn, repeats, device, warmup=warmup)
        out["variants"][name] = {
            "median_ms": seconds * 1e3,
            "gbps": bytes_moved / seconds / 1e9,
            "fraction_of_copy": bytes_moved / seconds / copy_bps,
            "peak_mib": peak_mib,
        }
    eager = out["variants"]["naive_eager"]["median_ms"]
    for row in out["variants"].values():
        row["speedup_vs_eager"] = eager / row["median_ms"]
    return out


def kernel_sweep(n_tokens, vocab, dtype, repeats):
    """Median kernel time over block sizes and warp counts (CUDA only): where launch_config
    comes from."""
    from kernels.kd_loss_torch import inverse_normalizer
    from kernels.kd_loss_triton import kd_loss_forward_triton

    device = _device()
    student, teacher, labels = make_inputs(n_tokens, vocab, dtype, device)
    grad = torch.empty_like(student)
    inv_norm = inverse_normalizer(None, (labels != -100).sum())
    elem = student.element_size()
    rows = []
    configs = [(b, w, None) for b in (512, 1024, 2048, 4096) for w in (2, 4, 8)]
    configs += [(b, w, st) for b in (512, 1024) for w in (4, 8) for st in (1, 2, 4)]
    for block, warps, stages in configs:
        fn = lambda b=block, w=warps, st=stages: kd_loss_forward_triton(
            student, teacher, labels, grad, alpha=ALPHA, temperature=TEMPERATURE,
            ignore_index=-100, valid_vocab=vocab - VALID_VOCAB_PAD, inv_norm=inv_norm,
            block_size=b, num_warps=w, num_stages=st)
        seconds = _timed(fn, repeats, device)
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
