"""dist.strategy: which models each rank holds, and in which form.

    ddp   every rank loads the whole student and teacher (DDP wraps the student later, in
          engine.train.setup.wrap_model); the step runs under autocast per the precision.
    fsdp  the student is sharded with FSDP2 as it is loaded (engine/train/fsdp.py); the teacher
          is sharded too or replicated, per dist.teacher ("auto": replicated when the per-GPU
          memory plan with a replicated teacher fits the budget, else sharded; the choice and
          its reason are logged). MixedPrecisionPolicy casts the weights, so the step runs
          without autocast.
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine import dist
from engine.memory import format_bytes
from engine.model.config import GPTNeoXConfig
from engine.model.network import GPTNeoX
from engine.precision import dtype_of, precision_dtypes
from engine.train import fsdp
from engine.train.config import Config, memory_budget_bytes
from engine.train.setup import (
    build_student,
    build_teacher,
    device_memory_bytes,
    memory_planner,
)


def uses_fsdp(config: Config) -> bool:
    return config.dist.strategy == "fsdp"


def step_dtypes(config: Config) -> tuple[torch.dtype, torch.dtype | None]:
    """(student weight dtype, autocast dtype of the step or None). Under FSDP the mixed
    precision policy gathers bf16 weights, so no autocast is needed on top."""
    weight, autocast = precision_dtypes(config.precision)
    return weight, None if uses_fsdp(config) else autocast


def student_config(config: Config) -> GPTNeoXConfig:
    if config.student.init == "scratch":
        return config.student.scratch_model_config()
    return GPTNeoXConfig.from_json_file(Path(config.student.path) / "config.json")


def teacher_config(config: Config) -> GPTNeoXConfig | None:
    if not config.teacher.path:
        return None
    return GPTNeoXConfig.from_json_file(Path(config.teacher.path) / "config.json")


def teacher_placement(config: Config, info: dist.DistInfo) -> tuple[bool, str]:
    """(shard the teacher?, why), per dist.teacher; "auto" asks the per-GPU memory plan."""
    choice = config.dist.teacher
    if choice != "auto":
        return choice == "shard", f"dist.teacher={choice}"
    budget = memory_budget_bytes(config, device_memory_bytes(info.device))
    return choose_teacher_sharding(config, teacher_config(config), student_config(config),
                                   world_size=info.world_size, budget=budget)


def choose_teacher_sharding(config: Config, teacher_cfg, student_cfg, *, world_size: int,
                            budget: int | None) -> tuple[bool, str]:
    """dist.teacher=auto: replicate the teacher when the per-GPU plan with it whole fits the
    budget (at micro-batch 1 when the budget also picks the micro-batch), else shard it."""
    if budget is None:
        return False, "dist.teacher=auto: replicated (no memory budget on the CPU)"
    planner, plan_args = memory_planner(config, world_size=world_size, teacher_sharded=False)
    micro_batch = 1 if config.batch.memory_budget else config.batch.micro_batch
    plan = planner(teacher_cfg, student_cfg, micro_batch=micro_batch, **plan_args)
    verdict = (f"{format_bytes(plan.total)} per GPU with it replicated at micro_batch "
               f"{micro_batch}, budget {format_bytes(budget)}")
    if plan.fits(budget):
        return False, f"dist.teacher=auto: replicated ({verdict})"
    return True, f"dist.teacher=auto: sharded ({verdict})"


def build_models(config: Config, info: dist.DistInfo, log) -> tuple[GPTNeoX, GPTNeoX | None]:
    """(student, teacher or None) as this rank holds them under dist.strategy."""
    weight_dtype, _ = step_dtypes(config)
    if not uses_fsdp(config):
        return build_student(config, info.device, weight_dtype), build_teacher(config, info.device)
    mesh = dist.device_mesh(info)
    d = config.dist

    def shard_student(model: GPTNeoX) -> GPTNeoX:
        policy = fsdp.mixed_precision_policy(config.precision)
        return fsdp.shard_model(model, mesh, mp_policy=policy, cpu_offload=d.cpu_offload,
                                reshard_after_forward=d.reshard_after_forward)

    host = torch.device("cpu")
    student = fsdp.build_sharded(info, lambda: build_student(config, host, weight_dtype),
                                 shard=shard_student, dtype=weight_dtype,
                                 host_weights=d.cpu_offload)
    student.set_activation_checkpointing(config.runtime.activation_checkpointing)
    student.train()
    teacher = None
    if config.teacher.path:
        sharded, why = teacher_placement(config, info)
        log(f"teacher: {why}")
        if sharded:
            teacher = fsdp.build_sharded(info, lambda: build_teacher(config, host),
                                         shard=lambda m: fsdp.shard_model(m, mesh),
                                         dtype=dtype_of(config.teacher.dtype))
            teacher.requires_grad_(False)
            teacher.eval()
        else:
            teacher = build_teacher(config, info.device)
    return student, teacher
