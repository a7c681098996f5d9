"""The GPU validation suite: everything the engine promises on a GPU, in one short call.

    python3 -m benchmarks.gpu_suite [--out DIR] [--smoke]

Sections (each guarded: a failure is recorded with its traceback and the others still run):
  kernel_correctness  the loss kernel against the float64 reference on the device
  kernel_speed        the loss kernel at 4096 and 16384 tokens x 50304 bf16
  divergences         the loss kernel per divergence against forward_kl (target <= 1.2x)
  head                the fused heads + loss at the seed shapes against its own four matmuls
                      (target <= 1.25x), the unfused path, a chunk sweep, and Liger-Kernel's
                      LigerFusedLinearJSDLoss side by side (skipped without liger_kernel)
  seed_recipe         the seed step (random pythia-160m teacher / pythia-70m student,
                      micro-batch 2 x 2048, bf16 autocast, fused AdamW, fused head) eager:
                      tokens/s, MFU, peak memory against the memory plan
  seed_recipe_logits  the same with full logits (loss.fused_head = false)
  seed_recipe_compiled  the same fused step with both models under torch.compile
  transformers        the step through GPTNeoXForCausalLM + the naive loss (target: ours eager
                      >= 1.5x)
  capped_12gib        a fresh process capped to a 12 GiB card: the seed step, the largest
                      micro-batch that runs (target >= 24), and that micro-batch compiled, the
                      best configuration that fits (target >= 500k tokens/s, MFU >= 35%)
Every configuration that trains records the memory plan beside its measured peaks (allocated,
and reserved + memory outside the allocator). The summary table is printed last; everything is
also written to DIR/gpu_suite.json. Sizes keep the whole run within ~8 minutes on an H200.

`--smoke` runs every code path at tiny sizes on whatever device there is (CPU in CI), so the
real run cannot die of a typo. Needs only torch (+ triton on a GPU); transformers and
liger_kernel are optional (their rows are skipped without them); zstandard is never imported.
The suite starts the CUDA allocator the way engine.train does (expandable segments unless
PYTORCH_CUDA_ALLOC_CONF is set), so its memory figures are the engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    FULL,
    REPO_ROOT,
    RESULTS_DIR,
    SMOKE,
    build_ours,
    build_pair,
    build_transformers,
    current_device,
    device_name,
    error_record,
    free_memory,
    logits_micro_step,
    make_batch,
    model_config,
    ours_micro_step,
    sync,
    transformers_micro_step,
    write_json,
)
from benchmarks.gpu_sections import (
    section_divergences,
    section_head,
    section_kernel_correctness,
    section_kernel_speed,
)
from benchmarks.gpu_summary import format_summary
from engine.memory import CUDA_CONTEXT_BYTES, largest_micro_batch, plan_memory
from engine.metrics import peak_flops
from engine.train.setup import CUDA_ALLOC_CONF
from kernels.constants import IGNORE_INDEX

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


# ----------------------------------------------------------------------------- sections


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
    peak = _peak_flops(device)
    result["mfu"] = result["tokens_per_s"] * result["flops_per_token"] / peak if peak else None
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
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        result_path = Path(tmp) / "capped.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--worker-capped", str(result_path),
               "--parent-used", str(parent_used)]
        if smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=sizes["worker_timeout"])
        except subprocess.TimeoutExpired as exc:
            return {"error": f"capped worker timed out after {exc.timeout} s"}
        if not result_path.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            return {"error": f"capped worker exited {proc.returncode} without a result", "log":
                    tail}
        result = json.loads(result_path.read_text())
        result["worker_seconds"] = time.perf_counter() - t0
        result["worker_returncode"] = proc.returncode
        result["parent_used_bytes"] = parent_used
        return result


def _is_oom(exc: BaseException) -> bool:
    """Out of memory as torch, cuBLAS or Triton report it."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "alloc_failed" in text


def _cap_to_card(device, result: dict) -> None:
    if device.type == "cuda":
        # The driver's context lives outside the allocator but inside the card's 12 GiB.
        cap = CARD_BYTES - CUDA_CONTEXT_BYTES
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_suite",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device, < 2 min")
    parser.add_argument("--worker-capped", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--parent-used", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)  # as engine.train
    sizes = SMOKE if args.smoke else FULL
    if args.smoke and not torch.cuda.is_available():
        # Tiny CPU work: intra-op threads only contend with each other (and with CI).
        torch.set_num_threads(1)

    if args.worker_capped:
        return capped_worker(sizes, args.smoke, Path(args.worker_capped), args.parent_used)

    started = time.perf_counter()
    device = current_device()
    print(f"device: {device_name(device)}", flush=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out_dir = Path(args.out) if args.out else (DEFAULT_SMOKE_OUT if args.smoke else RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / ("gpu_suite_smoke.json" if args.smoke else "gpu_suite.json")
    report: dict[str, Any] = {
        "device": device_name(device),
        "mode": "smoke" if args.smoke else "full",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "cuda_alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF"),
        "sizes": sizes,
        "sections": {},
        "json_path": str(json_path),
    }
    print(f"torch {torch.__version__}, triton {triton_version}, python "
          f"{platform.python_version()}, mode {report['mode']}", flush=True)

    sections = [
        ("kernel_correctness", section_kernel_correctness),
        ("kernel_speed", section_kernel_speed),
        ("divergences", section_divergences),
        ("head", section_head),
        ("seed_recipe", section_seed_recipe),
        ("seed_recipe_logits", section_seed_recipe_logits),
        ("seed_recipe_compiled", section_seed_recipe_compiled),
        ("transformers", section_transformers),
        ("capped_12gib", lambda sizes, smoke: section_capped(sizes, smoke, out_dir)),
    ]
    for name, run in sections:
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            body = run(sizes, args.smoke)
        except Exception as exc:  # guarded: record and go on to the next section
            body = error_record(exc)
            print(body["traceback"], file=sys.stderr, flush=True)
        body["section_seconds"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = body
        print(f"== {name}: {'FAILED' if 'error' in body else 'done'} in "
              f"{body['section_seconds']:.1f} s", flush=True)
        free_memory(device)
        write_json(json_path, report)  # after every section, so a crash keeps what ran

    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(json_path, report)
    print()
    print(format_summary(report))
    failed = [n for n, b in report["sections"].items() if "error" in b]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
