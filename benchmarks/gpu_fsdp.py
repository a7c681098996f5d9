"""FSDP on one GPU, and the largest Pythia pair a 12 GiB card holds: the GPU suite's FSDP rows.

    python -m benchmarks.gpu_fsdp --part seed   --out FILE [--smoke]
    python -m benchmarks.gpu_fsdp --part capped --out FILE [--smoke]

`seed`: the seed step (random pythia-160m teacher / pythia-70m student, micro-batch 2 x 2048,
bf16-autocast, the engine's own train_step: clipping, the window normaliser, fused AdamW) with
the plain student (what DDP runs on one GPU) and with the student under FSDP2 at world size 1
(engine.train.fsdp: per-block fully_shard, bf16 mixed-precision policy, a process group of
this process alone); tokens/s of both, their ratio (target >= 0.9) and the peaks.

`capped`: in a process capped to a 12 GiB card (minus the plan's CUDA context), the largest
pair that `neox-distill memplan --ladder` says fits one 12 GiB GPU (by parameters of both
models), with random weights of the exact Pythia shapes and the ladder's precision,
micro-batch and activation checkpointing: a few optimizer steps, the measured allocated peak
against the plan's (target: within 5%).

Each part writes one JSON object to FILE; benchmarks/gpu_suite.py runs both as subprocesses
(a process group and a memory cap are process-wide). `--smoke` runs the same code at tiny
sizes on any device (CPU in the tests).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    FULL,
    SMOKE,
    build_ours,
    build_pair,
    cap_memory_to,
    current_device,
    device_name,
    error_record,
    free_memory,
    make_batch,
    model_config,
    sync,
    write_json,
)
from engine import dist
from engine.commands.ladder import ladder
from engine.kernels.loss_spec import LossSpec
from engine.memory import CUDA_CONTEXT_BYTES, parameter_count, plan_memory
from engine.model.config import pythia_config
from engine.model.network import GPTNeoX
from engine.precision import precision_dtypes
from engine.train import fsdp
from engine.train.step import ONE_PROCESS, StepHooks, train_step
from engine.train.teacher_signal import LiveTeacher, NoTeacher

CARD_BYTES = 12 * 2**30
TARGET_RATIO = 0.9  # FSDP tokens/s against the plain step's, at world size 1
TARGET_PLAN_ERROR = 0.05


def _loss_spec(valid_vocab: int) -> LossSpec:
    return LossSpec(alpha=0.5, temperature=2.0, valid_vocab=valid_vocab, backend="auto")


def time_steps(student, teacher, sizes, device, *, autocast_dtype, micro_batch=None,
               windows=None, sharded=False) -> dict[str, Any]:
    """Warm-up windows, then timed optimizer steps of the engine's train_step (`sharded`:
    with the FSDP strategy's head loss and clip, as a dist.strategy=fsdp run steps)."""
    mb = micro_batch or sizes["micro_batch"]
    accum = sizes["accum"]
    window = [make_batch(mb, sizes["seq_len"], sizes["valid_vocab"], device, seed=i)
              for i in range(accum)]
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, **kwargs)
    spec = _loss_spec(sizes["valid_vocab"])
    gathered = fsdp.gathered_root if sharded else None
    signal = LiveTeacher(teacher, gathered) if teacher is not None else NoTeacher()
    hooks = StepHooks(head_loss=fsdp.head_loss, clip_grad_norm=fsdp.clip_grad_norm,
                      all_reduce_sum=dist.all_reduce_sum) if sharded else ONE_PROCESS

    def step():
        return train_step(student, student, signal, optimizer, window, spec=spec,
                          autocast_dtype=autocast_dtype, max_grad_norm=1.0, lr=1e-4,
                          stop_requested=False, hooks=hooks)

    for _ in range(max(1, sizes["warmup"] // accum)):
        step()
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    count = windows or max(1, sizes["steps"] // accum)
    started = time.perf_counter()
    results = [step() for _ in range(count)]
    sync(device)
    seconds = time.perf_counter() - started
    out = {"micro_batch": mb, "seq_len": sizes["seq_len"], "optimizer_steps": count,
           "tokens_per_s": count * accum * mb * sizes["seq_len"] / seconds,
           "losses": [r.loss for r in results],
           "finite": all(r.applied for r in results)}
    if device.type == "cuda":
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
    return out


def seed_part(sizes, smoke: bool) -> dict[str, Any]:
    """The seed step plain and under FSDP at world size 1."""
    device = current_device()
    info = dist.init_distributed(device.type, group_of_one=True)
    teacher, student = build_pair(build_ours, sizes, device)
    plain = time_steps(student, teacher, sizes, device, autocast_dtype=torch.bfloat16)
    del student
    free_memory(device)
    _, student = build_pair(build_ours, sizes, device)  # the same seeds: the same weights
    fsdp.shard_model(student, dist.device_mesh(info),
                     mp_policy=fsdp.mixed_precision_policy("bf16-autocast"))
    sharded = time_steps(student, teacher, sizes, device, autocast_dtype=None, sharded=True)
    dist.teardown()
    ratio = sharded["tokens_per_s"] / plain["tokens_per_s"]
    return {"device": device_name(device), "plain": plain, "fsdp": sharded,
            "fsdp_over_plain_tokens_per_s": ratio, "target_ratio": TARGET_RATIO,
            "meets_target": ratio >= TARGET_RATIO}


def largest_one_gpu_pair() -> dict[str, Any]:
    """The ladder's one-GPU row at 12 GiB with the most parameters in both models."""
    rows = [r for r in ladder([CARD_BYTES]) if r["gpus"] == 1]
    return max(rows, key=lambda r: sum(parameter_count(pythia_config(r[k]))["total"]
                                       for k in ("teacher", "student")))


def random_model(name: str, sizes, device, dtype: torch.dtype, seed: int) -> GPTNeoX:
    """Random weights of a named shape, made on the device in `dtype` (a 2.8b teacher made in
    fp32 first would not fit the card it is meant to show fits)."""
    torch.manual_seed(seed)
    config = model_config(name, vocab=sizes["vocab"], max_positions=max(sizes["seq_len"], 2048))
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return GPTNeoX(config)
    finally:
        torch.set_default_dtype(default)


def capped_part(sizes, smoke: bool) -> dict[str, Any]:
    """The largest one-GPU pair at 12 GiB: measured allocated peak against the plan."""
    device = current_device()
    result: dict[str, Any] = {"device": device_name(device),
                              "cap_bytes": cap_memory_to(device, CARD_BYTES, CUDA_CONTEXT_BYTES)}
    row = (dict(teacher=sizes["teacher"], student=sizes["student"], precision="bf16-autocast",
                activation_checkpointing=True, micro_batch=sizes["micro_batch"])
           if smoke else largest_one_gpu_pair())
    weight_dtype, autocast_dtype = precision_dtypes(row["precision"])
    teacher = random_model(row["teacher"], sizes, device, torch.bfloat16, seed=1).eval()
    teacher.requires_grad_(False)
    student = random_model(row["student"], sizes, device, weight_dtype, seed=0).train()
    student.set_activation_checkpointing(row["activation_checkpointing"])
    plan = plan_memory(teacher.config, student.config, micro_batch=row["micro_batch"],
                       seq_len=sizes["seq_len"], precision=row["precision"],
                       activation_checkpointing=row["activation_checkpointing"],
                       teacher_dtype_bytes=2)
    result["pair"] = {k: row[k] for k in ("teacher", "student", "precision",
                                          "activation_checkpointing", "micro_batch")}
    result["plan_allocated_peak_bytes"] = plan.allocated_peak
    result.update(time_steps(student, teacher, {**sizes, "accum": 1}, device,
                             autocast_dtype=autocast_dtype, micro_batch=row["micro_batch"],
                             windows=2))
    if "peak_allocated_bytes" in result:
        error = plan.allocated_peak / result["peak_allocated_bytes"] - 1
        result.update(plan_error=error, target_plan_error=TARGET_PLAN_ERROR,
                      meets_target=abs(error) <= TARGET_PLAN_ERROR)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu_fsdp", description=__doc__)
    parser.add_argument("--part", choices=("seed", "capped"), required=True)
    parser.add_argument("--out", required=True, help="JSON file for the result")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    part = seed_part if args.part == "seed" else capped_part
    try:
        result = part(sizes, args.smoke)
        status = 0
    except Exception as exc:  # recorded for the suite's summary, with the traceback
        result, status = error_record(exc), 1
    write_json(Path(args.out), result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, (dict, list))}))
    return status


if __name__ == "__main__":
    sys.exit(main())
