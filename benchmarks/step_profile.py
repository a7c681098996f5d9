"""Where the time of one distillation micro-step goes, ours beside transformers' (CUDA).

    python3 -m benchmarks.step_profile [--out DIR] [--smoke]

The GPU suite gives one tokens/s figure per engine; this says why: a torch.profiler table of
the heaviest kernels for a few micro-steps of each engine (ours with the fused head, the
default, and with full logits), the GPU-busy fraction (kernel time over wall time: a step far
below 1 is launch-bound). The compiled step's tokens/s is in the GPU suite.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks import common
from engine.kernels.constants import IGNORE_INDEX

PROFILED_MICRO_STEPS = 4


def profile_engine(build, micro_step, sizes, device) -> dict:
    """Kernel table and GPU-busy fraction over a few micro-steps after a warm-up."""
    from torch.profiler import ProfilerActivity, profile

    teacher, student = common.build_pair(build, sizes, device)
    batch = common.make_batch(sizes["micro_batch"], sizes["seq_len"], sizes["valid_vocab"],
                              device, 0)
    normalizer = float((batch["labels"] != IGNORE_INDEX).sum())
    for _ in range(2):
        micro_step(student, teacher, batch, sizes["valid_vocab"], normalizer)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(PROFILED_MICRO_STEPS):
            micro_step(student, teacher, batch, sizes["valid_vocab"], normalizer)
        if device.type == "cuda":
            torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    events = prof.key_averages()
    table = None
    sort_keys = ("self_device_time_total", "self_cuda_time_total") if device.type == "cuda" \
        else ("self_cpu_time_total",)
    for sort_key in sort_keys:  # the key's name changed across torch releases
        try:
            table = events.table(sort_by=sort_key, row_limit=18, max_name_column_width=60)
            break
        except (AttributeError, KeyError, ValueError):
            continue
    gpu_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in events)
    del teacher, student
    common.free_memory(device)
    return {
        "wall_ms_per_micro_step": wall * 1e3 / PROFILED_MICRO_STEPS,
        "kernel_ms_per_micro_step": gpu_us / 1e3 / PROFILED_MICRO_STEPS,
        "gpu_busy_fraction": (gpu_us / 1e6) / wall if wall > 0 else None,
        "table": table,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on any device")
    args = parser.parse_args(argv)
    sizes = common.SMOKE if args.smoke else common.FULL
    device = common.current_device()
    print(f"device: {common.device_name(device)}", flush=True)
    report: dict = {"device": common.device_name(device), "smoke": args.smoke}
    jobs = {
        "ours": lambda: profile_engine(common.build_ours, common.ours_micro_step, sizes, device),
        "ours_logits": lambda: profile_engine(common.build_ours, common.logits_micro_step,
                                              sizes, device),
        "transformers": lambda: profile_engine(common.build_transformers,
                                               common.transformers_micro_step, sizes, device),
    }
    for name, job in jobs.items():
        try:
            report[name] = job()
        except Exception as exc:
            report[name] = common.error_record(exc)
        row = report[name]
        if "table" in row:
            print(f"\n== {name}: {row['wall_ms_per_micro_step']:.2f} ms wall, "
                  f"{row['kernel_ms_per_micro_step']:.2f} ms of kernels per micro-step "
                  f"(GPU busy {row['gpu_busy_fraction'] or 0:.0%})\n{row['table']}", flush=True)
        else:
            print(f"\n== {name}: {json.dumps({k: v for k, v in row.items() if k != 'traceback'})}",
                  flush=True)
    name = "step_profile_smoke.json" if args.smoke else "step_profile.json"
    common.write_json(args.out / name, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
