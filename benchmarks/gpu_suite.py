"""The GPU validation suite: everything the engine promises on a GPU, in one short call.

    python3 -m benchmarks.gpu_suite [--out DIR] [--smoke]

Sections (each guarded: a failure is recorded with its traceback and the others still run):
  1. kernel correctness on the device (benchmarks.common.gpu_correctness)
  2. kernel speed at 4096 and 16384 tokens x 50304 bf16 (benchmarks.common.gpu_speed)
  3. the seed recipe end to end with random-weight pythia-160m teacher / pythia-70m student
     (engine.model.GPTNeoX): micro-batch 2 x 2048, bf16 autocast, fused AdamW, timed
     micro-steps through engine.train.step.distill_micro_step + optimizer steps: tokens/s,
     MFU, peak memory and the memory plan's prediction; then, in a fresh subprocess capped with
     torch.cuda.set_per_process_memory_fraction to a 12 GiB card, the same step and the
     largest micro-batch that runs (mb = 2, 4, 6, ... until out of memory, bounded in time)
  4. the same step through transformers' GPTNeoXForCausalLM with the naive loss, for the ratio
  (and the seed step again with both models under torch.compile, the engine's runtime.compile)
The summary table is printed last; everything is also written to DIR/gpu_suite.json.

`--smoke` runs every code path at tiny sizes on whatever device there is (CPU in CI) in about
a minute (kernel speed once: at smoke size both token counts are the same 64 tokens), so the
real run cannot die of a typo. Needs only torch (+ triton on a GPU); transformers is optional
(section 4 is skipped without it); zstandard is never imported.
"""

from __future__ import annotations

import argparse
import json
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
    gpu_correctness,
    gpu_speed,
    make_batch,
    ours_micro_step,
    sync,
    transformers_micro_step,
    write_json,
)
from engine.memory import CUDA_CONTEXT_BYTES, largest_micro_batch, plan_memory
from engine.metrics import peak_flops
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
                  warmup=None, steps=None) -> dict:
    """Warm up, then time sizes['steps'] micro-steps with an optimizer step every accum."""
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
        out["non_allocator_bytes"] = int(total - free - torch.cuda.memory_reserved(device))
    return out


# ----------------------------------------------------------------------------- sections


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


def section_seed_recipe(sizes, smoke: bool) -> dict:
    device = current_device()
    teacher, student = build_pair(build_ours, sizes, device)
    result = time_training(student, teacher, ours_micro_step, sizes, device)
    plan = plan_memory(teacher.config, student.config, micro_batch=sizes["micro_batch"],
                       seq_len=sizes["seq_len"], precision="bf16-autocast")
    flops = plan.flops_per_token
    peak = _peak_flops(device)
    result.update(
        device=device_name(device),
        flops_per_token=flops,
        mfu=result["tokens_per_s"] * flops / peak if peak else None,
        peak_flops=peak,
        plan_allocated_peak_bytes=plan.allocated_peak,
        plan_total_bytes=plan.total,
        plan_largest_micro_batch_12gib=largest_micro_batch(
            teacher.config, student.config, seq_len=sizes["seq_len"], budget_bytes=CARD_BYTES),
        plan_largest_micro_batch_12gib_checkpointing=largest_micro_batch(
            teacher.config, student.config, seq_len=sizes["seq_len"], budget_bytes=CARD_BYTES,
            activation_checkpointing=True),
    )
    if "peak_allocated_bytes" in result:
        result["plan_over_measured"] = plan.allocated_peak / result["peak_allocated_bytes"]
    del teacher, student
    free_memory(device)
    return result


def section_seed_recipe_compiled(sizes, smoke: bool) -> dict:
    """The seed step with student and teacher under torch.compile (the engine's
    runtime.compile option): models this small are launch-bound in eager mode."""
    device = current_device()
    teacher, student = build_pair(build_ours, sizes, device)
    result = time_training(torch.compile(student), torch.compile(teacher), ours_micro_step,
                           sizes, device)
    del teacher, student
    free_memory(device)
    return result


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
    """Run the capped measurements in a fresh process so the cap and allocator start clean."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        result_path = Path(tmp) / "capped.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--worker-capped", str(result_path)]
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
        return result


def _is_oom(exc: BaseException) -> bool:
    """Out of memory as torch, cuBLAS or Triton report it."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "alloc_failed" in text


def capped_worker(sizes, smoke: bool, result_path: Path) -> int:
    """In a fresh process: cap the allocator to a 12 GiB card, run the seed step, then find
    the largest micro-batch (2, 4, 6, ...) that still runs a window without running out."""
    device = current_device()
    result: dict[str, Any] = {"device": device_name(device)}
    if device.type == "cuda":
        # The driver's context lives outside the allocator but inside the card's 12 GiB.
        cap = CARD_BYTES - CUDA_CONTEXT_BYTES
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
        result.update(cap_bytes=cap, cap_note="12 GiB card minus the plan's CUDA context reserve")
    else:
        result["cap_note"] = "no cap on CPU (smoke): the code path only"

    teacher, student = build_pair(build_ours, sizes, device)
    attempts = []

    def attempt(mb: int, *, full: bool) -> bool:
        """One measured run at micro-batch mb (the search uses one window of warm-up and one
        timed window: enough to allocate everything a longer run would)."""
        student.zero_grad(set_to_none=True)
        free_memory(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        short = {} if full else {"warmup": sizes["accum"], "steps": sizes["accum"]}
        try:
            row = time_training(student, teacher, ours_micro_step, sizes, device, micro_batch=mb,
                                **short)
            attempts.append({"micro_batch": mb, "ok": True, **row})
            return True
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
            if not _is_oom(exc):
                raise
            attempts.append({"micro_batch": mb, "ok": False, "oom": True,
                             "error": str(exc).splitlines()[0][:300]})
            return False
        finally:
            student.zero_grad(set_to_none=True)
            free_memory(device)

    result["seed_micro_batch_fits"] = attempt(sizes["micro_batch"], full=True)
    started = time.perf_counter()
    largest = sizes["micro_batch"] if result["seed_micro_batch_fits"] else 0
    mb = sizes["micro_batch"] + 2
    stopped = "limit"
    while mb <= sizes["search_max_mb"]:
        if time.perf_counter() - started > sizes["search_seconds"]:
            stopped = "time bound"
            break
        if not attempt(mb, full=False):
            stopped = "out of memory"
            break
        largest = mb
        mb += 2
    result.update(attempts=attempts, measured_largest_micro_batch=largest, search_stopped=stopped)
    write_json(result_path, result)
    return 0


# ----------------------------------------------------------------------------- report


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "n/a"


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(check, measured, target) rows for the final table."""
    rows: list[tuple[str, str, str]] = []
    sec = report["sections"]
    for name, body in sec.items():
        if "error" in body:
            rows.append((name, "FAILED: " + body["error"].strip().splitlines()[-1][:70], "-"))
    kc = sec.get("kernel_correctness", {})
    if "passed" in kc:
        rows.append(("kernel vs float64 reference",
                     f"{'PASS' if kc['passed'] else 'FAIL'} ({len(kc['cases'])} cases, max grad "
                     f"rel err {kc['max_grad_rel_err']:.1e})", "all pass"))
    for n, speed in sec.get("kernel_speed", {}).items():
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
                     ">= 80% copy bw, >= 3x eager"))
    seed = sec.get("seed_recipe", {})
    if "tokens_per_s" in seed:
        mfu = f", MFU {seed['mfu'] * 100:.1f}%" if seed.get("mfu") else ""
        rows.append(("seed step tokens/s", f"{seed['tokens_per_s']:,.0f}{mfu}",
                     ">= 250,000 (H100)"))
        rows.append(("seed peak memory (measured / plan)",
                     f"{_gib(seed.get('peak_allocated_bytes'))} / "
                     f"{_gib(seed['plan_allocated_peak_bytes'])}", "plan >= measured"))
        rows.append(("largest mb in 12 GiB (plan)",
                     f"{seed['plan_largest_micro_batch_12gib']} (checkpointing: "
                     f"{seed['plan_largest_micro_batch_12gib_checkpointing']})", ">= 2"))
    compiled = sec.get("seed_recipe_compiled", {})
    if "tokens_per_s" in compiled:
        rows.append(("seed step tokens/s, torch.compile", f"{compiled['tokens_per_s']:,.0f}",
                     ">= 250,000 (H100)"))
    capped = sec.get("capped_12gib", {})
    if "seed_micro_batch_fits" in capped:
        first = capped["attempts"][0] if capped.get("attempts") else {}
        rows.append(("seed mb under 12 GiB cap",
                     ("fits" if capped["seed_micro_batch_fits"] else "OUT OF MEMORY")
                     + f", peak {_gib(first.get('peak_allocated_bytes'))}", "fits"))
        rows.append(("largest mb under cap (measured)",
                     f"{capped['measured_largest_micro_batch']} (stopped: "
                     f"{capped['search_stopped']})", "-"))
    hf = sec.get("transformers", {})
    if "skipped" in hf:
        rows.append(("transformers step", "skipped: " + hf["skipped"], "-"))
    elif "tokens_per_s" in hf and "tokens_per_s" in seed:
        ratio = seed["tokens_per_s"] / hf["tokens_per_s"]
        mem = ""
        if hf.get("peak_allocated_bytes") and seed.get("peak_allocated_bytes"):
            mem = (f", peak memory {_gib(seed['peak_allocated_bytes'])} vs "
                   f"{_gib(hf['peak_allocated_bytes'])}")
        rows.append(("ours / transformers step", f"x{ratio:.2f} tokens/s{mem}", ">= 1.5x"))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_suite",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device, < 2 min")
    parser.add_argument("--worker-capped", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.smoke and not torch.cuda.is_available():
        # Tiny CPU work: intra-op threads only contend with each other (and with CI).
        torch.set_num_threads(1)

    if args.worker_capped:
        return capped_worker(sizes, args.smoke, Path(args.worker_capped))

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
        "sizes": sizes,
        "sections": {},
        "json_path": str(json_path),
    }
    print(f"torch {torch.__version__}, triton {triton_version}, python "
          f"{platform.python_version()}, mode {report['mode']}", flush=True)

    sections = [
        ("kernel_correctness", lambda: section_kernel_correctness(sizes, args.smoke)),
        ("kernel_speed", lambda: section_kernel_speed(sizes, args.smoke)),
        ("seed_recipe", lambda: section_seed_recipe(sizes, args.smoke)),
        ("seed_recipe_compiled", lambda: section_seed_recipe_compiled(sizes, args.smoke)),
        ("transformers", lambda: section_transformers(sizes, args.smoke)),
        ("capped_12gib", lambda: section_capped(sizes, args.smoke, out_dir)),
    ]
    for name, run in sections:
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            body = run()
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
