"""The GPU validation suite: everything the engine promises on a GPU, in two short calls.

    python3 -m benchmarks.gpu_suite --list
    python3 -m benchmarks.gpu_suite [--only A,B] [--out DIR] [--smoke] [--budget-s S]

The correctness gates (kernel_correctness, head_correctness) always run first, whatever
--only names: a failing check stops the call loudly (exit 1, the timing sections recorded as
skipped) before anything is timed. Every section has its own time limit (SECTIONS) and the
whole call a budget (--budget-s, 510 s by default on a GPU): at the budget the process writes
what it has and exits 124, so a call never passes 9 minutes. benchmarks/README.md gives the two
calls that together run every section.

Sections (each guarded: a failure is recorded with its traceback and the others still run):
  kernel_correctness  the loss kernel against the float64 reference on the device (a gate)
  head_correctness    the fused heads in bf16 (every divergence, both cache kinds) against
                      float64 at T = 0.5, 1, 2, 4, odd N, valid_vocab < V and the plan's
                      largest micro-batch (a gate)
  kernel_speed        the loss kernel at 4096 and 16384 tokens x 50304 bf16
  divergences         the loss kernel per divergence against forward_kl (target <= 1.2x)
  head                the fused heads + loss at the seed shapes against its own four matmuls
                      (target <= 1.25x), the unfused path, a chunk sweep, the epilogue head
                      (backend="epilogue", no logits written; CUDA only), and Liger-Kernel's
                      LigerFusedLinearJSDLoss side by side (skipped without liger_kernel)
  seed_recipe         the seed step (random pythia-160m teacher / pythia-70m student,
                      micro-batch 2 x 2048, bf16 autocast, fused AdamW, fused head) eager:
                      tokens/s, MFU, peak memory against the memory plan
  seed_recipe_logits  the same with full logits (loss.fused_head = false)
  seed_recipe_compiled  the same fused step with both models under torch.compile
  teacher_cache       the sparse loss (teacher.cache) against its float64 reference, and the
                      seed step from top-64 cached targets against the online step (>= 1.5x)
  teacher_cache_build building top-64 / sampled-32 caches of a pythia-160m teacher against
                      its own forward, steady state (target >= 0.9x)
  transformers        the step through GPTNeoXForCausalLM + the naive loss (target: ours eager
                      >= 1.5x)
  on_policy_step      the distillation step at onpolicy.fraction 1 (the student samples 64
                      tokens after 64-token prompts, the teacher scores them) against the
                      off-policy step of the same 8 x 128-token windows (pythia shapes, bf16
                      autocast): tokens/s of each, their ratio, sampling's share of the step
  sampling            batched greedy sampling tokens/s, engine.sampling against transformers'
                      generate with its KV cache (benchmarks/sampling.py --device cuda, in a
                      fresh process): pythia-70m shape, batch 32, prompt 64, 64 new tokens, fp32
  capped_12gib        a fresh process capped to a 12 GiB card: the seed step, the largest
                      micro-batch that runs (target >= 24), and that micro-batch compiled, the
                      best configuration that fits (target >= 500k tokens/s, MFU >= 35%)
  fsdp                dist.strategy=fsdp at world size 1 against the plain seed step (target
                      within 10% of its tokens/s), and the largest one-GPU ladder pair under a
                      12 GiB cap against its memory plan (target within 5%)
  onpolicy_sampler_memory  the on-policy sampler of the seed student (bf16 autocast, micro-
                      batch 8, 64-token prompts + 64 sampled): the allocated peak it adds on
                      top of the weights, against the memory plan's sampling group (within 5%)
Every configuration that trains records the memory plan beside its measured peaks (allocated,
and reserved + memory outside the allocator). The summary table is printed last; everything is
also written to DIR/gpu_suite.json, atomically after every section, so a failed or killed
call keeps every section that finished.

`--smoke` runs every code path at tiny sizes on whatever device there is (CPU in CI), so the
real run cannot die of a typo. Needs only torch (+ triton on a GPU); transformers and
liger_kernel are optional (their rows are skipped without them); zstandard is never imported.
The suite starts the CUDA allocator the way engine.train does (expandable segments unless
PYTORCH_CUDA_ALLOC_CONF is set), so its memory figures are the engine's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    FULL,
    REPO_ROOT,
    RESULTS_DIR,
    SEED_HEAD,
    SMOKE,
    TEMPERATURE,
    build_ours,
    build_pair,
    build_transformers,
    cap_memory_to,
    current_device,
    device_name,
    divergence_times,
    error_record,
    free_memory,
    gpu_correctness,
    gpu_speed,
    head_correctness,
    head_inputs,
    head_step,
    kernel_backend,
    liger_jsd_loss,
    logits_micro_step,
    make_batch,
    model_config,
    ours_micro_step,
    random_top_k_batch,
    seed_cache_build_rates,
    sparse_correctness,
    sync,
    timed,
    transformers_micro_step,
    write_json,
)
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.loss_spec import LossSpec
from engine.memory import CUDA_CONTEXT_BYTES, format_bytes, largest_micro_batch, plan_memory
from engine.metrics import mfu, peak_flops
from engine.on_policy import SamplingSettings, student_batch
from engine.sampling import new_generator
from engine.train.setup import CUDA_ALLOC_CONF
from engine.train.step import distill_micro_step
from engine.train.teacher_signal import CachedTeacher, LiveTeacher

DEFAULT_SMOKE_OUT = REPO_ROOT / "runs" / "gpu_suite_smoke"
CARD_BYTES = 12 * 2**30  # the user's RTX 3060
H100_PEAK_BF16 = 989e12  # dense bf16 datasheet, H100/H200 SXM

# ----------------------------------------------------------------------------- helpers


def _peak_flops(dev) -> float | None:
    if dev.type != "cuda":
        return None
    name = device_name(dev)
    return peak_flops(dev) or (H100_PEAK_BF16 if "H1" in name or "H2" in name else None)


def _optimizer(model, device):
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), **kwargs)


# ----------------------------------------------------------------------------- the training step


def time_training(student, teacher, micro_step, sizes, device, *, micro_batch=None,
                  warmup=None, steps=None, other_bytes: int = 0) -> dict:
    """Warm up, then time sizes['steps'] micro-steps with an optimizer step every accum.

    `other_bytes`: device memory other processes held when this one started (the suite's
    parent), left out of this process's memory outside the allocator."""
    mb = micro_batch or sizes["micro_batch"]
    warmup = sizes["warmup"] if warmup is None else warmup
    steps = sizes["steps"] if steps is None else steps
    accum, valid_vocab = sizes["accum"], sizes["valid_vocab"]
    optimizer = _optimizer(student, device)
    batches = [make_batch(mb, sizes["seq_len"], valid_vocab, device, seed=i) for i in range(accum)]
    normalizer = float(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in batches))

    def window(n_micro: int) -> float:
        loss = torch.zeros((), device=device)
        for i in range(n_micro):
            stats = micro_step(student, teacher, batches[i % accum], valid_vocab, normalizer)
            loss += stats["loss"]
            if (i + 1) % accum == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return float(loss)

    # Whole windows only, so the optimizer's state exists before timing and no gradient is
    # left half-accumulated.
    warm_loss = window(max(1, -(-warmup // accum)) * accum)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = max(1, -(-steps // accum)) * accum
    t0 = time.perf_counter()
    loss = window(steps)
    sync(device)
    seconds = time.perf_counter() - t0
    tokens = steps * mb * sizes["seq_len"]
    out = {
        "micro_batch": mb,
        "seq_len": sizes["seq_len"],
        "micro_steps": steps,
        "accum": accum,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "warmup_loss": warm_loss,
        "timed_loss_sum": loss,
        "finite": bool(torch.isfinite(torch.tensor(loss))),
    }
    if device.type == "cuda":
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        free, total = torch.cuda.mem_get_info(device)
        # Device memory in use that the caching allocator does not hold: context, handles.
        out["non_allocator_bytes"] = int(total - free - torch.cuda.memory_reserved(device)
                                         - other_bytes)
    return out


# ----------------------------------------------------------------------------- kernel sections

SMOKE_HEAD = dict(n_tokens=64, student_hidden=32, teacher_hidden=48, vocab=1000)


def section_kernel_correctness(sizes, smoke: bool) -> dict:
    rows = gpu_correctness(smoke=smoke)
    return {
        "cases": rows,
        "passed": all(r["passed"] for r in rows),
        "max_loss_rel_err": max(r["loss_rel_err"] for r in rows),
        "max_grad_rel_err": max(r["grad_rel_err"] for r in rows),
    }


def section_head_correctness(sizes, smoke: bool) -> dict:
    """The fused heads on the device against float64 (benchmarks.common.head_correctness), at
    the plan's largest micro-batch for a 12 GiB card too (its tokens minus one: odd)."""
    teacher, student = (model_config(sizes[k], vocab=sizes["vocab"])
                        for k in ("teacher", "student"))
    largest = sizes["micro_batch"] if smoke else largest_micro_batch(
        teacher, student, seq_len=sizes["seq_len"], budget_bytes=CARD_BYTES,
        teacher_dtype_bytes=2)
    rows = head_correctness(smoke, max(1, largest) * sizes["seq_len"] - 1)
    return {"cases": rows, "passed": all(r["passed"] for r in rows),
            "largest_micro_batch": largest,
            "max_rel_err": max(max(r["loss_rel_err"], r["dh_rel_err"], r["dw_rel_err"])
                               for r in rows)}


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
    if dev.type == "cuda":  # the head that never writes logits (Triton only; issue 24, 9)
        variants["epilogue"] = ("fused", {"backend": "epilogue"})
    liger = liger_jsd_loss(compiled=dev.type == "cuda")
    if liger is not None:
        variants["liger"] = ("liger", {"liger": liger})
        variants["fused_full_vocab"] = ("fused", {"full_vocab": True})  # Liger's objective
    rows = {}
    for name, (variant, options) in variants.items():
        try:
            run, _ = head_step(variant, inputs, **{"backend": backend, **options})
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


# ----------------------------------------------------------------------------- training sections


def plan_rows(result: dict, teacher_cfg, student_cfg, *, fused_head: bool) -> dict:
    """The memory plan of the configuration `result` ran (bf16 autocast, bf16 teacher) and,
    where CUDA measured it, plan / measured for the allocated peak and for the whole card
    (reserved peak + this process's memory outside the allocator)."""
    plan = plan_memory(teacher_cfg, student_cfg, micro_batch=result["micro_batch"],
                       seq_len=result["seq_len"], precision="bf16-autocast",
                       teacher_dtype_bytes=2, fused_head=fused_head)
    rows = {"plan_allocated_peak_bytes": plan.allocated_peak, "plan_total_bytes": plan.total,
            "flops_per_token": plan.flops_per_token}
    if "peak_allocated_bytes" in result:
        measured_total = result["peak_reserved_bytes"] + result["non_allocator_bytes"]
        rows.update(plan_over_measured=plan.allocated_peak / result["peak_allocated_bytes"],
                    measured_total_bytes=measured_total,
                    plan_total_over_measured=plan.total / measured_total,
                    reserved_over_allocated=result["peak_reserved_bytes"]
                    / result["peak_allocated_bytes"])
    return rows


def _with_mfu(result: dict, device) -> dict:
    result["mfu"] = mfu(result["tokens_per_s"], result["flops_per_token"], _peak_flops(device))
    return result


def _seed_step(sizes, micro_step, *, fused_head: bool, compiled: bool = False) -> dict:
    device = current_device()
    teacher, student = build_pair(build_ours, sizes, device)
    models = (torch.compile(student), torch.compile(teacher)) if compiled else (student, teacher)
    result = time_training(*models, micro_step, sizes, device)
    result.update(device=device_name(device), fused_head=fused_head, compiled=compiled,
                  **plan_rows(result, teacher.config, student.config, fused_head=fused_head))
    del teacher, student, models
    free_memory(device)
    return _with_mfu(result, device)


def section_seed_recipe(sizes, smoke: bool) -> dict:
    """The seed step, eager, fused head (the engine's default), with the plan's view of it."""
    result = _seed_step(sizes, ours_micro_step, fused_head=True)
    teacher, student = (model_config(sizes[k], vocab=sizes["vocab"])
                        for k in ("teacher", "student"))
    for ckpt in (False, True):
        key = "plan_largest_micro_batch_12gib" + ("_checkpointing" if ckpt else "")
        result[key] = largest_micro_batch(teacher, student, seq_len=sizes["seq_len"],
                                          budget_bytes=CARD_BYTES, teacher_dtype_bytes=2,
                                          activation_checkpointing=ckpt)
    return result


def section_seed_recipe_logits(sizes, smoke: bool) -> dict:
    """The same step with full logits (loss.fused_head = false), as every earlier run."""
    return _seed_step(sizes, logits_micro_step, fused_head=False)


def section_seed_recipe_compiled(sizes, smoke: bool) -> dict:
    """The seed step with student and teacher under torch.compile (the engine's
    runtime.compile, on by default with CUDA): models this small are launch-bound eager."""
    return _seed_step(sizes, ours_micro_step, fused_head=True, compiled=True)


def section_teacher_cache(sizes, smoke: bool) -> dict:
    """Training from a teacher cache (teacher.cache, issue 14): the sparse loss kernel against
    its float64 reference on the device, then the seed step from top-64 cached targets (no
    teacher forward) against the online seed step, both eager with the fused head."""
    device = current_device()
    out = {"correctness": sparse_correctness(smoke=smoke)}
    out["passed"] = all(row["passed"] for row in out["correctness"])
    teacher, student = build_pair(build_ours, sizes, device)
    out["online"] = time_training(student, teacher, ours_micro_step, sizes, device)
    del teacher
    free_memory(device)
    targets: dict[int, dict] = {}  # each of time_training's batches gets its targets once

    def cached_step(student, _teacher, batch, valid_vocab, normalizer):
        if id(batch) not in targets:
            targets[id(batch)] = random_top_k_batch(batch, 64, valid_vocab, seed=len(targets))
        return ours_micro_step(student, CachedTeacher(None), targets[id(batch)], valid_vocab,
                               normalizer)

    out["cache"] = time_training(student, None, cached_step, sizes, device)
    out["speedup"] = out["cache"]["tokens_per_s"] / out["online"]["tokens_per_s"]
    out["device"] = device_name(device)
    del student
    free_memory(device)
    return out


def section_teacher_cache_build(sizes, smoke: bool) -> dict:
    """Building a teacher cache (neox-distill cache-teacher's job) against the teacher's own
    forward on this device, at the seed shapes (pythia-160m, bf16, 2048-token windows): top-64
    and sampled-32, steady state (target >= 0.9x the forward's tokens/s)."""
    device = current_device()
    with tempfile.TemporaryDirectory(prefix="gpu-suite-cache-") as scratch:
        return seed_cache_build_rates(Path(scratch), smoke, device=device.type)


def section_transformers(sizes, smoke: bool) -> dict:
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    device = current_device()
    teacher, student = build_pair(build_transformers, sizes, device)
    result = time_training(student, teacher, transformers_micro_step, sizes, device)
    result["transformers_version"] = transformers.__version__
    del teacher, student
    free_memory(device)
    return result


# ----------------------------------------------------------------------------- on-policy step

# (prompt tokens, new tokens, micro-batch) of the on-policy row: the study's 64 + 64 window
# (benchmarks/on_policy.py) at pythia shapes; smoke mode shrinks it.
ONPOLICY_SHAPE = {"full": (64, 64, 8), "smoke": (16, 16, 2)}


def onpolicy_micro_step(settings: SamplingSettings, device, sampling_seconds: list[float]):
    """A micro-step as the trainer runs an on-policy micro-batch (engine/train/
    on_policy_signal.py): the student continues the window's prompt (no gradient, bf16
    autocast), the teacher scores prompt + completion, the divergence alone (alpha 0) runs over
    the completion. Each call's sampling time is appended to `sampling_seconds`."""
    generator = new_generator(0, device)

    def step(student, teacher, batch, valid_vocab, normalizer):
        sync(device)
        t0 = time.perf_counter()
        drawn = student_batch(student, batch["input_ids"], settings, generator=generator,
                              autocast_dtype=torch.bfloat16)
        sync(device)
        sampling_seconds.append(time.perf_counter() - t0)
        on_batch = {"input_ids": drawn["input_ids"], "labels": drawn["labels"]}
        spec = LossSpec(alpha=0.0, temperature=TEMPERATURE, valid_vocab=valid_vocab)
        return distill_micro_step(student, LiveTeacher(teacher), on_batch, spec,
                                  normalizer=settings.new_tokens * batch["input_ids"].shape[0],
                                  autocast_dtype=torch.bfloat16)

    return step


def section_on_policy_step(sizes, smoke: bool) -> dict:
    """Lambda 1 against lambda 0 on the same prompt + new-token windows: tokens (window
    positions) per second of each, the ratio of their step times, sampling's share."""
    device = current_device()
    prompt, new, micro_batch = ONPOLICY_SHAPE["smoke" if smoke else "full"]
    shape = {**sizes, "seq_len": prompt + new, "micro_batch": micro_batch, "accum": 1}
    teacher, student = build_pair(build_ours, sizes, device)
    settings = SamplingSettings(prompt_tokens=prompt, new_tokens=new,
                                valid_vocab=sizes["valid_vocab"])
    off = time_training(student, teacher, ours_micro_step, shape, device)
    sampling: list[float] = []
    on = time_training(student, teacher, onpolicy_micro_step(settings, device, sampling),
                       shape, device)
    timed_sampling = sum(sampling[-on["micro_steps"]:])
    del teacher, student
    free_memory(device)
    return {"device": device_name(device), "prompt_tokens": prompt, "new_tokens": new,
            "off_policy": off, "on_policy": on,
            "on_over_off_step_time": off["tokens_per_s"] / on["tokens_per_s"],
            "sampling_share": timed_sampling / on["seconds"]}
def section_sampling(sizes, smoke: bool, out_dir: Path) -> dict:
    """benchmarks/sampling.py on this device in a fresh process: our sampler's tokens/s against
    transformers' generate, same weights and prompts, greedy (the CPU target is 1.5x)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers is not installed"}
    args = ["benchmarks.sampling", "--device", current_device().type, "--repeats", "3",
            "--json"]
    return run_worker("sampling benchmark", args, sizes, smoke, out_dir)


def section_capped(sizes, smoke: bool, out_dir: Path) -> dict:
    """Run the capped measurements in a fresh process so the cap and allocator start clean.
    The device memory this process still holds is passed along, so the child's own memory
    outside the allocator can be told apart from ours (both sit on the same card)."""
    device = current_device()
    parent_used = 0
    if device.type == "cuda":
        free_memory(device)
        free, total = torch.cuda.mem_get_info(device)
        parent_used = total - free
    args = ["benchmarks.gpu_suite", "--parent-used", str(parent_used), "--worker-capped"]
    result = run_worker("capped worker", args, sizes, smoke, out_dir)
    result["parent_used_bytes"] = parent_used
    return result


def run_worker(what: str, module_args: list[str], sizes, smoke: bool, out_dir: Path) -> dict:
    """`python -m <module_args> RESULT [--smoke]` in a fresh process; the JSON it writes to
    RESULT, or an error record when it wrote none."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        result_path = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", *module_args, str(result_path)]
        if smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=sizes["worker_timeout"])
        except subprocess.TimeoutExpired as exc:
            return {"error": f"{what} timed out after {exc.timeout} s"}
        if not result_path.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            return {"error": f"{what} exited {proc.returncode} without a result", "log": tail}
        result = json.loads(result_path.read_text())
        result["worker_seconds"] = time.perf_counter() - t0
        result["worker_returncode"] = proc.returncode
        return result


def section_fsdp(sizes, smoke: bool, out_dir: Path) -> dict:
    """benchmarks/gpu_fsdp.py's two parts, each in a fresh process (its process group and its
    memory cap are process-wide): the seed step under FSDP at world size 1 against the plain
    step, and the largest pair that fits one 12 GiB card against its memory plan."""
    result: dict[str, Any] = {
        part: run_worker(f"FSDP {part} part", ["benchmarks.gpu_fsdp", "--part", part, "--out"],
                         sizes, smoke, out_dir)
        for part in ("seed", "capped")}
    failed = [f"{part}: {body['error'].strip().splitlines()[-1]}"
              for part, body in result.items() if "error" in body]
    if failed:  # the section fails as a whole, so the suite's exit status says so
        result["error"] = "; ".join(failed)
    return result


def _is_oom(exc: BaseException) -> bool:
    """Out of memory as torch, cuBLAS or Triton report it."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "alloc_failed" in text


def _cap_to_card(device, result: dict) -> None:
    # The driver's context lives outside the allocator but inside the card's 12 GiB.
    cap = cap_memory_to(device, CARD_BYTES, CUDA_CONTEXT_BYTES)
    if cap is not None:
        result.update(cap_bytes=cap, cap_note="12 GiB card minus the plan's CUDA context reserve")
    else:
        result["cap_note"] = "no cap on CPU (smoke): the code path only"


def capped_worker(sizes, smoke: bool, result_path: Path, parent_used: int) -> int:
    """In a fresh process: cap the allocator to a 12 GiB card, run the seed step, find the
    largest micro-batch (2, 4, 6, ...) that still runs a window without running out, then time
    the best configuration that fits: that micro-batch with both models compiled."""
    device = current_device()
    result: dict[str, Any] = {"device": device_name(device)}
    _cap_to_card(device, result)
    teacher, student = build_pair(build_ours, sizes, device)
    attempts = []

    def attempt(mb: int, *, full: bool, compiled: bool = False) -> bool:
        """One measured run at micro-batch mb (the search uses one window of warm-up and one
        timed window: enough to allocate everything a longer run would)."""
        student.zero_grad(set_to_none=True)
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        short = {} if full else {"warmup": sizes["accum"], "steps": sizes["accum"]}
        models = (torch.compile(student), torch.compile(teacher)) if compiled else (
            student, teacher)
        try:
            row = time_training(*models, ours_micro_step, sizes, device, micro_batch=mb,
                                other_bytes=parent_used, **short)
            row.update(compiled=compiled,
                       **plan_rows(row, teacher.config, student.config, fused_head=True))
            attempts.append({"micro_batch": mb, "ok": True, **_with_mfu(row, device)})
            return True
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
            if not _is_oom(exc):
                raise
            attempts.append({"micro_batch": mb, "ok": False, "oom": True, "compiled": compiled,
                             "error": str(exc).splitlines()[0][:300]})
            return False
        finally:
            student.zero_grad(set_to_none=True)
            free_memory(device)

    result["seed_micro_batch_fits"] = attempt(sizes["micro_batch"], full=True)
    largest, stopped = _search_largest(attempt, sizes, result["seed_micro_batch_fits"])
    result.update(measured_largest_micro_batch=largest, search_stopped=stopped)
    for mb in (largest, largest - 2):  # the compiled step may need a little more room
        if mb >= 1 and attempt(mb, full=True, compiled=True):
            result["best_compiled_micro_batch"] = mb
            break
    result["attempts"] = attempts
    write_json(result_path, result)
    return 0


def _search_largest(attempt, sizes, seed_fits: bool) -> tuple[int, str]:
    """Micro-batches 2 above the seed's, upwards, until one runs out (bounded in time)."""
    started = time.perf_counter()
    largest = sizes["micro_batch"] if seed_fits else 0
    mb = sizes["micro_batch"] + 2
    while mb <= sizes["search_max_mb"]:
        if time.perf_counter() - started > sizes["search_seconds"]:
            return largest, "time bound"
        if not attempt(mb, full=False):
            return largest, "out of memory"
        largest = mb
        mb += 2
    return largest, "limit"


def section_onpolicy_sampler_memory(sizes, smoke: bool) -> dict:
    """What engine.sampling.sample allocates beyond the weights when the seed student writes
    its on-policy completions, against the memory plan's sampling group (KV cache, prefill or
    decode working set, autocast's block casts). Measured on CUDA only; elsewhere the plan
    alone is recorded (the CPU tests check the group against every tensor sample allocates)."""
    from engine.memory import SAMPLING
    from engine.model.network import autocast_context
    from engine.sampling import new_generator, sample

    device = current_device()
    rows, prompt, new = (2, 8, 8) if smoke else (8, 64, 64)
    cfg = model_config(sizes["student"], vocab=sizes["vocab"])
    plan = plan_memory(None, cfg, micro_batch=rows, seq_len=prompt + new,
                       precision="bf16-autocast", onpolicy=(prompt, new),
                       device_type=device.type)
    planned = sum(b for name, b in plan.components.items() if plan.groups[name] == SAMPLING)
    out = {"micro_batch": rows, "prompt_tokens": prompt, "new_tokens": new,
           "precision": "bf16-autocast", "plan_sampler_bytes": planned}
    student = build_ours(sizes["student"], sizes["vocab"], 2048, device, seed=0)
    prompts = torch.randint(0, sizes["valid_vocab"], (rows, prompt), device=device)

    def draw(model):
        with autocast_context(device.type, torch.bfloat16):
            return sample(model, prompts, new, valid_vocab=sizes["valid_vocab"],
                          generator=new_generator(0, device), stop_early=False)

    draw(student)  # cuBLAS workspaces and kernels exist from here on, as in a running step
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        drawn = draw(student)
        sync(device)
        measured = torch.cuda.max_memory_allocated(device) - before
        out.update(measured_sampler_bytes=measured, plan_over_measured=planned / measured)
    else:
        drawn = draw(student)
    out["generated_tokens"] = int(drawn.lengths.sum())
    del student, drawn
    free_memory(device)
    return out


def _sampler_memory_rows(sections: dict) -> list[tuple[str, str, str]]:
    body = sections.get("onpolicy_sampler_memory", {})
    if "plan_sampler_bytes" not in body:
        return []
    label = (f"memory plan / measured: on-policy sampler (mb {body['micro_batch']}, "
             f"{body['prompt_tokens']} + {body['new_tokens']} tokens)")
    if "plan_over_measured" not in body:
        return [(label, f"not measured (no GPU; plan {format_bytes(body['plan_sampler_bytes'])})",
                 "within 5%")]
    return [(label, f"x{body['plan_over_measured']:.3f} (plan "
             f"{format_bytes(body['plan_sampler_bytes'])}, measured "
             f"{format_bytes(body['measured_sampler_bytes'])})", "within 5%")]


# ----------------------------------------------------------------------------- report


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "n/a"


def _mib(n) -> str:
    return f"{n:.0f} MiB" if isinstance(n, (int, float)) else "n/a"


def _failures(sections: dict) -> list[tuple[str, str, str]]:
    return [(name, "FAILED: " + body["error"].strip().splitlines()[-1][:70], "-")
            for name, body in sections.items() if "error" in body]


def _kernel_rows(sections: dict) -> list[tuple[str, str, str]]:
    rows = []
    kc = sections.get("kernel_correctness", {})
    if "passed" in kc:
        rows.append(("kernel vs float64 reference",
                     f"{'PASS' if kc['passed'] else 'FAIL'} ({len(kc['cases'])} cases, max grad "
                     f"rel err {kc['max_grad_rel_err']:.1e})", "all pass"))
    hc = sections.get("head_correctness", {})
    if "passed" in hc:
        rows.append(("fused heads bf16 vs float64 reference",
                     f"{'PASS' if hc['passed'] else 'FAIL'} ({len(hc['cases'])} cases, largest "
                     f"mb {hc['largest_micro_batch']}, max rel err {hc['max_rel_err']:.1e})",
                     "all pass"))
    rows += [(name, "skipped: " + body["skipped"], "-") for name, body in sections.items()
             if "correctness gate" in body.get("skipped", "")]
    for n, speed in sections.get("kernel_speed", {}).items():
        if isinstance(speed, dict) and "error" in speed:
            rows.append((f"kernel speed {n} tokens", "FAILED: " + speed["error"][:70], "-"))
        if not isinstance(speed, dict) or "variants" not in speed:
            continue
        v = speed["variants"]
        best = min(("ours", "ours_inplace"), key=lambda k: v[k]["median_ms"] if k in v else 1e30)
        ours = v[best]
        rows.append((f"kernel {speed['n_tokens']}x{speed['vocab']} {speed['dtype']}",
                     f"{ours['median_ms']:.3f} ms, {ours['fraction_of_copy'] * 100:.0f}% of copy "
                     f"bw, x{ours['speedup_vs_eager']:.1f} eager, x"
                     f"{v['naive_compiled']['median_ms'] / ours['median_ms']:.1f} compiled",
                     ">= 3x eager"))
        if "kernel" in v:  # the kernel alone: the bandwidth target (issue 24)
            rows.append((f"kernel alone {speed['n_tokens']}x{speed['vocab']} {speed['dtype']}",
                         f"{v['kernel']['median_ms']:.3f} ms, "
                         f"{v['kernel']['fraction_of_copy'] * 100:.0f}% of copy bw",
                         ">= 80% copy bw"))
    div = sections.get("divergences", {})
    if "rows" in div:
        worst = max(div["rows"], key=lambda k: div["rows"][k]["vs_forward_kl"])
        rows.append((f"divergences {div['n_tokens']}x{div['vocab']} {div['dtype']}",
                     f"worst x{div['max_vs_forward_kl']:.2f} of forward_kl ({worst}, "
                     f"{div['rows'][worst]['median_ms']:.3f} ms)", "<= 1.2x"))
    return rows


def _head_rows(sections: dict) -> list[tuple[str, str, str]]:
    head = sections.get("head", {})
    variants = head.get("variants", {})
    rows = []
    if "fused_vs_matmuls" in head:
        fused, matmuls = variants["fused"], variants["matmuls"]
        rows.append(("head + loss fwd+bwd vs its 4 matmuls",
                     f"x{head['fused_vs_matmuls']:.2f} ({fused['median_ms']:.2f} vs "
                     f"{matmuls['median_ms']:.2f} ms; fastest chunk {head.get('best_chunk')})",
                     "<= 1.25x"))
        epilogue = variants.get("epilogue", {})
        if "median_ms" in epilogue:
            rows.append(("head + loss, epilogue (no logits) vs fused and its 4 matmuls",
                         f"{epilogue['median_ms']:.2f} vs {fused['median_ms']:.2f} vs "
                         f"{matmuls['median_ms']:.2f} ms, {_mib(epilogue['peak_mib'])} vs "
                         f"{_mib(fused['peak_mib'])}", "<= 1.25x matmuls"))
        unfused = variants.get("unfused", {})
        if "median_ms" in unfused:
            rows.append(("head + loss: fused vs head matmuls + kd_loss",
                         f"{fused['median_ms']:.2f} vs {unfused['median_ms']:.2f} ms, "
                         f"{_mib(fused['peak_mib'])} vs {_mib(unfused['peak_mib'])}", "-"))
    if head.get("liger") == "absent":
        rows.append(("Liger LigerFusedLinearJSDLoss", "skipped: liger_kernel is not installed",
                     "-"))
    elif "median_ms" in variants.get("liger", {}) and "median_ms" in variants.get(
            "fused_full_vocab", {}):
        ours, liger = variants["fused_full_vocab"], variants["liger"]
        rows.append(("ours vs Liger (same objective)",
                     f"{ours['median_ms']:.2f} vs {liger['median_ms']:.2f} ms, "
                     f"{_mib(ours['peak_mib'])} vs {_mib(liger['peak_mib'])}",
                     "faster and leaner"))
    return rows


def _plan_row(name: str, body: dict) -> tuple[str, str, str] | None:
    if "plan_over_measured" not in body:
        return None
    planned = _gib(body["plan_allocated_peak_bytes"])
    return (f"memory plan / measured: {name}",
            f"allocated x{body['plan_over_measured']:.3f} ({planned}), card "
            f"x{body['plan_total_over_measured']:.3f}, reserved/allocated "
            f"{body['reserved_over_allocated']:.2f}", "within 5%")


def _sampling_rows(body: dict) -> list[tuple[str, str, str]]:
    """Our sampler against transformers' generate: tokens/s (medians) and their ratio."""
    if "skipped" in body:
        return [("sampling: ours / transformers generate", "skipped: " + body["skipped"], "-")]
    if "ratio_of_medians" not in body:
        return []
    med = body["median_tokens_per_s"]
    return [("sampling: ours / transformers generate",
             f"x{body['ratio_of_medians']:.2f} ({med['ours']:,.0f} vs "
             f"{med['transformers']:,.0f} tokens/s, greedy equal in "
             f"{100 * body['greedy_token_agreement']:.0f}%)", "- (CPU: >= 1.5x)")]


def _cache_rows(body: dict) -> list[tuple[str, str, str]]:
    """The teacher cache's rows: its kernel's correctness, its step against the online one."""
    if "correctness" not in body:
        return []
    worst = max(row["grad_rel_err"] for row in body["correctness"])
    rows = [("teacher cache loss vs float64 reference",
             f"{'PASS' if body['passed'] else 'FAIL'} ({len(body['correctness'])} cases, max "
             f"grad rel err {worst:.1e})", "all pass")]
    if "speedup" in body:
        rows.append(("seed step from a top-64 cache / online step",
                     f"x{body['speedup']:.2f} ({body['cache']['tokens_per_s']:,.0f} vs "
                     f"{body['online']['tokens_per_s']:,.0f} tokens/s)", ">= 1.5x"))
    return rows


def _cache_build_rows(body: dict) -> list[tuple[str, str, str]]:
    """Each cache build's steady tokens/s against the teacher's forward on the device."""
    forward = sum(body.get("teacher_forward_tokens_per_s", [])) / 2
    return [(f"teacher cache build, {name} / teacher forward",
             f"x{build['vs_teacher_forward']:.2f} ({build['tokens_per_s']:,.0f} vs "
             f"{forward:,.0f} tokens/s, {build['bytes_per_token']} B/token)", ">= 0.9x")
            for name, build in body.get("builds", {}).items()]


def _step_rows(sections: dict) -> list[tuple[str, str, str]]:
    rows = []
    labels = {"seed_recipe": "seed step, eager, fused head",
              "seed_recipe_logits": "seed step, eager, full logits",
              "seed_recipe_compiled": "seed step, compiled, fused head"}
    for key, label in labels.items():
        body = sections.get(key, {})
        if "tokens_per_s" in body:
            mfu = f", MFU {body['mfu'] * 100:.1f}%" if body.get("mfu") else ""
            rows.append((label, f"{body['tokens_per_s']:,.0f} tokens/s{mfu}, peak "
                         f"{_gib(body.get('peak_allocated_bytes'))}", "-"))
    seed = sections.get("seed_recipe", {})
    if "plan_largest_micro_batch_12gib" in seed:
        rows.append(("largest mb in 12 GiB (plan)",
                     f"{seed['plan_largest_micro_batch_12gib']} (checkpointing: "
                     f"{seed['plan_largest_micro_batch_12gib_checkpointing']})", ">= 24"))
    rows += _sampling_rows(sections.get("sampling", {}))
    rows += _cache_rows(sections.get("teacher_cache", {}))
    rows += _cache_build_rows(sections.get("teacher_cache_build", {}))
    hf = sections.get("transformers", {})
    if "skipped" in hf:
        rows.append(("transformers step", "skipped: " + hf["skipped"], "-"))
    elif "tokens_per_s" in hf and "tokens_per_s" in seed:
        mem = ""
        if hf.get("peak_allocated_bytes") and seed.get("peak_allocated_bytes"):
            mem = (f", peak memory {_gib(seed['peak_allocated_bytes'])} vs "
                   f"{_gib(hf['peak_allocated_bytes'])}")
        rows.append(("ours eager / transformers step (mb 2)",
                     f"x{seed['tokens_per_s'] / hf['tokens_per_s']:.2f} tokens/s{mem}", ">= 1.5x"))
    return rows


def _capped_rows(sections: dict) -> list[tuple[str, str, str]]:
    capped = sections.get("capped_12gib", {})
    if "seed_micro_batch_fits" not in capped:
        return []
    attempts = capped.get("attempts", [])
    first = attempts[0] if attempts else {}
    rows = [("seed mb under 12 GiB cap", ("fits" if capped["seed_micro_batch_fits"] else
                                          "OUT OF MEMORY")
             + f", peak {_gib(first.get('peak_allocated_bytes'))}", "fits"),
            ("largest mb under 12 GiB cap (measured)",
             f"{capped['measured_largest_micro_batch']} (stopped: {capped['search_stopped']})",
             ">= 24")]
    best = [a for a in attempts if a.get("ok") and a.get("compiled")]
    if best:
        mfu = f", MFU {best[-1]['mfu'] * 100:.1f}%" if best[-1].get("mfu") else ""
        rows.append((f"best under 12 GiB: compiled, mb {best[-1]['micro_batch']}",
                     f"{best[-1]['tokens_per_s']:,.0f} tokens/s{mfu}", ">= 500,000, MFU >= 35%"))
    return rows


def _fsdp_rows(sections: dict) -> list[tuple[str, str, str]]:
    fsdp = sections.get("fsdp", {})
    rows: list[tuple[str, str, str]] = []
    seed, capped = fsdp.get("seed", {}), fsdp.get("capped", {})
    if "fsdp_over_plain_tokens_per_s" in seed:
        speeds = f"{seed['fsdp']['tokens_per_s']:,.0f} vs {seed['plain']['tokens_per_s']:,.0f}"
        rows.append(("FSDP x1 / plain seed step tokens/s",
                     f"x{seed['fsdp_over_plain_tokens_per_s']:.2f} ({speeds})",
                     f">= {seed['target_ratio']:.2f}"))
    if "plan_allocated_peak_bytes" in capped:
        pair = capped["pair"]
        rows.append((f"largest 12 GiB pair {pair['teacher'][7:]} -> {pair['student'][7:]} "
                     f"({pair['precision']}, mb {pair['micro_batch']}): measured / plan",
                     f"{_gib(capped.get('peak_allocated_bytes'))} / "
                     f"{_gib(capped['plan_allocated_peak_bytes'])}", "within 5%"))
    return rows


def _onpolicy_rows(sections: dict) -> list[tuple[str, str, str]]:
    body = sections.get("on_policy_step", {})
    if "on_over_off_step_time" not in body:
        return []
    window = f"{body['off_policy']['micro_batch']} x {body['off_policy']['seq_len']}"
    return [(f"on-policy / off-policy step time ({window})",
             f"x{body['on_over_off_step_time']:.2f} ({body['on_policy']['tokens_per_s']:,.0f} "
             f"vs {body['off_policy']['tokens_per_s']:,.0f} tokens/s, sampling "
             f"{body['sampling_share']:.0%} of the step)", "-")]


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(check, measured, target) rows for the final table."""
    sections = report["sections"]
    rows = _failures(sections) + _kernel_rows(sections) + _head_rows(sections)
    rows += _step_rows(sections) + _onpolicy_rows(sections) + _capped_rows(sections)
    rows += _fsdp_rows(sections) + _sampler_memory_rows(sections)
    configs = [(name, sections.get(name, {})) for name in
               ("seed_recipe", "seed_recipe_logits", "seed_recipe_compiled")]
    configs += [(f"capped mb {a['micro_batch']}{' compiled' if a.get('compiled') else ''}", a)
                for a in sections.get("capped_12gib", {}).get("attempts", [])]
    rows += [row for row in (_plan_row(name, body) for name, body in configs) if row]
    return rows


def format_summary(report: dict) -> str:
    rows = summary_rows(report)
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    lines = [f"GPU suite summary - device: {report['device']} ({report['mode']})",
             f"{'check':<{w0}}{'measured':<{w1}}target", "-" * (w0 + w1 + 28)]
    lines += [f"{a:<{w0}}{b:<{w1}}{c}" for a, b, c in rows]
    lines.append(f"total {report['wall_s']:.0f} s; JSON: {report['json_path']}")
    return "\n".join(lines)


@dataclasses.dataclass(frozen=True)
class Section:
    """One named part of the suite: run(sizes, smoke, out_dir) -> its JSON body; its time limit
    on a GPU (four times that in smoke mode, on a shared CPU); gates run first in every call."""

    run: Any
    timeout_s: int
    gate: bool = False


def _plain(fn):
    return lambda sizes, smoke, out_dir: fn(sizes, smoke)


# The suite's sections in the order they run. A new row is one entry here (and, for its
# summary line, one function beside _kernel_rows).
SECTIONS: dict[str, Section] = {
    "kernel_correctness": Section(_plain(section_kernel_correctness), 120, gate=True),
    "head_correctness": Section(_plain(section_head_correctness), 150, gate=True),
    "kernel_speed": Section(_plain(section_kernel_speed), 90),
    "divergences": Section(_plain(section_divergences), 60),
    "head": Section(_plain(section_head), 120),
    "seed_recipe": Section(_plain(section_seed_recipe), 60),
    "seed_recipe_logits": Section(_plain(section_seed_recipe_logits), 60),
    "seed_recipe_compiled": Section(_plain(section_seed_recipe_compiled), 150),
    "teacher_cache": Section(_plain(section_teacher_cache), 90),
    "teacher_cache_build": Section(_plain(section_teacher_cache_build), 120),
    "transformers": Section(_plain(section_transformers), 60),
    "on_policy_step": Section(_plain(section_on_policy_step), 90),
    "sampling": Section(section_sampling, 90),
    "capped_12gib": Section(section_capped, 200),
    "fsdp": Section(section_fsdp, 240),
    "onpolicy_sampler_memory": Section(_plain(section_onpolicy_sampler_memory), 60),
}


class SectionTimeout(Exception):
    """A section ran past its time limit (raised in the main thread by SIGALRM)."""


def _on_alarm(signum, frame):
    raise SectionTimeout("the section ran past its time limit")


def select_sections(only: str | None) -> list[str]:
    """The sections a call runs, in SECTIONS order: the gates, then those --only names (all
    without --only). ValueError naming an unknown section."""
    if only is None:
        return list(SECTIONS)
    wanted = [name.strip() for name in only.split(",") if name.strip()]
    unknown = [name for name in wanted if name not in SECTIONS]
    if unknown:
        raise ValueError(f"--only: unknown section(s) {', '.join(unknown)} (see --list)")
    return [name for name, sec in SECTIONS.items() if sec.gate or name in wanted]


def run_section(name: str, sizes, smoke: bool, out_dir: Path) -> dict:
    """One section under its time limit (SIGALRM: Python code and waits on children stop at
    it); a failure or a timeout becomes an error record."""
    section = SECTIONS[name]
    limit = section.timeout_s * (4 if smoke else 1)
    t0 = time.perf_counter()
    previous = signal.signal(signal.SIGALRM, _on_alarm)
    signal.alarm(limit)
    try:
        body = section.run(sizes, smoke, out_dir)
    except Exception as exc:  # guarded: record and go on to the next section
        body = error_record(exc)
        if isinstance(exc, SectionTimeout):
            body["error"] = f"SectionTimeout: {name} ran past its limit of {limit} s"
        print(body["traceback"], file=sys.stderr, flush=True)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    body["section_seconds"] = round(time.perf_counter() - t0, 2)
    body["time_limit_s"] = limit
    return body


def _start_budget(seconds: float | None, report: dict, json_path: Path) -> None:
    """At `seconds` of wall clock, write what the call has and exit 124 (a daemon timer), so
    a section stuck in a device call cannot take the call past its budget."""
    if not seconds:
        return

    def expire():
        report["budget_expired_s"] = seconds
        try:
            write_json(json_path, json.loads(json.dumps(report, default=str)))
        finally:
            print(f"gpu_suite: the call's budget of {seconds:.0f} s ran out; JSON: {json_path}",
                  file=sys.stderr, flush=True)
            os._exit(124)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


def _parse_args(argv):
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_suite",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    parser.add_argument("--list", action="store_true", help="name the sections and exit")
    parser.add_argument("--only", default=None,
                        help="comma-separated sections to run (the gates always run first)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="wall-clock budget of the call (default 510 on a GPU, none in "
                             "smoke mode)")
    parser.add_argument("--worker-capped", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-used", type=int, default=0, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def _list_sections() -> int:
    for name, section in SECTIONS.items():
        gate = " (gate: always runs first)" if section.gate else ""
        print(f"{name:<22} limit {section.timeout_s:>4} s{gate}")
    return 0


def _header(args, sizes, device, json_path) -> dict:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"device": device_name(device), "mode": "smoke" if args.smoke else "full",
            "torch": torch.__version__, "triton": triton_version,
            "python": platform.python_version(), "cuda": torch.version.cuda,
            "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"), "sizes": sizes,
            "only": args.only, "sections": {}, "json_path": str(json_path)}


def _skip_after_gate(report: dict, failed_gate: str, rest: list[str]) -> None:
    for name in rest:
        report["sections"][name] = {"skipped": f"correctness gate {failed_gate} failed"}
    print(f"\n!!! CORRECTNESS FAILED in {failed_gate}: nothing was timed; see "
          f"{report['json_path']}\n", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.list:
        return _list_sections()
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)  # as engine.train
    sizes = SMOKE if args.smoke else FULL
    if args.smoke and not torch.cuda.is_available():
        # Tiny CPU work: intra-op threads only contend with each other (and with CI).
        torch.set_num_threads(1)
    if args.worker_capped:
        return capped_worker(sizes, args.smoke, Path(args.worker_capped), args.parent_used)
    try:
        names = select_sections(args.only)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    started = time.perf_counter()
    device = current_device()
    print(f"device: {device_name(device)}", flush=True)
    out_dir = Path(args.out) if args.out else (DEFAULT_SMOKE_OUT if args.smoke else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / ("gpu_suite_smoke.json" if args.smoke else "gpu_suite.json")
    report = _header(args, sizes, device, json_path)
    print(f"torch {report['torch']}, triton {report['triton']}, python {report['python']}, "
          f"mode {report['mode']}, sections {', '.join(names)}", flush=True)
    budget = args.budget_s if args.budget_s is not None else (None if args.smoke else 510)
    _start_budget(budget, report, json_path)

    for index, name in enumerate(names):
        print(f"== {name} ...", flush=True)
        body = run_section(name, sizes, args.smoke, out_dir)
        report["sections"][name] = body
        print(f"== {name}: {'FAILED' if 'error' in body else 'done'} in "
              f"{body['section_seconds']:.1f} s", flush=True)
        free_memory(device)
        gate_failed = SECTIONS[name].gate and ("error" in body or not body.get("passed"))
        if gate_failed:
            _skip_after_gate(report, name, names[index + 1:])
        write_json(json_path, report)  # after every section, so a crash keeps what ran
        if gate_failed:
            break

    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(json_path, report)
    print()
    print(format_summary(report))
    failed = [n for n, b in report["sections"].items()
              if "error" in b or b.get("passed") is False]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
