"""The GPU suite's kernel-level sections: the loss kernel, its divergences, the fused head.

Each function measures one thing on the current device and returns a JSON-ready dict; the
suite (benchmarks/gpu_suite.py) runs them guarded, one after another, and summarises them.
With `smoke` they run tiny on whatever device there is, so the code paths are exercised on
the CPU (the test) before the one real GPU run.
"""

from __future__ import annotations

import torch

from benchmarks.common import (
    SEED_HEAD,
    current_device,
    divergence_times,
    error_record,
    free_memory,
    gpu_correctness,
    gpu_speed,
    head_inputs,
    head_step,
    kernel_backend,
    liger_jsd_loss,
    timed,
)

SMOKE_HEAD = dict(n_tokens=64, student_hidden=32, teacher_hidden=48, vocab=1000)


def section_kernel_correctness(sizes, smoke: bool) -> dict:
    rows = gpu_correctness(smoke=smoke)
    return {
        "cases": rows,
        "passed": all(r["passed"] for r in rows),
        "max_loss_rel_err": max(r["loss_rel_err"] for r in rows),
        "max_grad_rel_err": max(r["grad_rel_err"] for r in rows),
    }


def section_kernel_speed(sizes, smoke: bool) -> dict:
    out = {}
    for n in sizes["speed_tokens"]:
        try:  # one size failing (say, out of memory for the eager composite) keeps the other
            out[str(n)] = gpu_speed(n_tokens=n, smoke=smoke)
        except Exception as exc:
            out[str(n)] = error_record(exc)
        free_memory(current_device())
    return out


def section_divergences(sizes, smoke: bool) -> dict:
    """kd_loss forward + backward per divergence on the same logits (4096 x 50304 bf16 on a
    GPU), each against forward_kl (issue 13: within 1.2x on a GPU)."""
    dev = current_device()
    n, vocab = (16, 1000) if smoke else (4096, 50304)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    seconds = divergence_times(n, vocab, dtype, dev, sizes["div_repeats"], kernel_backend(dev))
    base = seconds["forward_kl"]
    rows = {name: {"median_ms": s * 1e3, "vs_forward_kl": s / base}
            for name, s in seconds.items()}
    return {"n_tokens": n, "vocab": vocab, "dtype": str(dtype).replace("torch.", ""),
            "rows": rows, "max_vs_forward_kl": max(r["vs_forward_kl"] for r in rows.values())}


def _measure(run, dev, repeats: int) -> dict:
    """Median ms of run() and, on CUDA, the peak memory it adds beyond what exists."""
    peak_mib = None
    if dev.type == "cuda":
        run()  # warm up (compiles) before the memory reading
        torch.cuda.synchronize(dev)
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        run()
        torch.cuda.synchronize(dev)
        peak_mib = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
    seconds = timed(run, repeats, dev, warmup=1)
    return {"median_ms": seconds * 1e3, "peak_mib": peak_mib}


def section_head(sizes, smoke: bool) -> dict:
    """The fused heads + loss forward + backward at the seed shapes (4096 tokens, hidden 512 /
    768, V 50304, bf16 on a GPU) against its own four matmuls alone (target <= 1.25x), the
    unfused path, a sweep of chunk sizes, and Liger-Kernel's LigerFusedLinearJSDLoss set to
    the same objective (time and peak memory side by side; skipped without liger_kernel)."""
    dev = current_device()
    shape = SMOKE_HEAD if smoke else SEED_HEAD
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    inputs = head_inputs(**shape, dtype=dtype, dev=dev)
    backend = kernel_backend(dev)
    repeats = sizes["head_repeats"]
    variants = {"matmuls": ("matmuls", {}), "fused": ("fused", {}), "unfused": ("unfused", {})}
    for chunk in sizes["head_chunks"]:
        variants[f"fused_chunk_{chunk}"] = ("fused", {"chunk_tokens": chunk})
    liger = liger_jsd_loss(compiled=dev.type == "cuda")
    if liger is not None:
        variants["liger"] = ("liger", {"liger": liger})
        variants["fused_full_vocab"] = ("fused", {"full_vocab": True})  # Liger's objective
    rows = {}
    for name, (variant, options) in variants.items():
        try:
            run, _ = head_step(variant, inputs, backend=backend, **options)
            rows[name] = _measure(run, dev, repeats)
        except Exception as exc:  # one variant failing (Liger, say) keeps the others
            rows[name] = error_record(exc)
        free_memory(dev)
    out = {**shape, "dtype": str(dtype).replace("torch.", ""), "backend": backend,
           "variants": rows, "liger": "absent" if liger is None else "present"}
    if "median_ms" in rows.get("fused", {}) and "median_ms" in rows.get("matmuls", {}):
        out["fused_vs_matmuls"] = rows["fused"]["median_ms"] / rows["matmuls"]["median_ms"]
        timed_chunks = {k: v["median_ms"] for k, v in rows.items()
                        if k.startswith("fused_chunk_") and "median_ms" in v}
        if timed_chunks:
            out["best_chunk"] = min(timed_chunks, key=timed_chunks.get)
    return out
