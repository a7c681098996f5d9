"""dist.strategy, applied once: the object that says how this run is spread over its ranks.

`build_strategy(config, info)` picks one of three kinds at setup; the loop and the step only
call its methods, never ask which kind it is:

    Strategy  one process: the models as built, whole-model checkpoints and export
              (engine/train/checkpoint.py, export.py).
    DDP       whole replicas on every rank, the student's forward under DDP (gradients summed
              over ranks); rank 0 writes; every rank validates its share of the val split.
    FSDP      the student sharded with FSDP2 as it is loaded, the teacher sharded or
              replicated per dist.teacher (engine/train/fsdp.py; "auto" asks the per-GPU
              memory plan and logs why); no autocast (MixedPrecisionPolicy casts); the head
              loss inside the root's forward; every rank writes its checkpoint shards
              (sharded_checkpoint.py), gathers the export (gathered_export.py) and scores the
              same val batches.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel

from engine import dist
from engine.memory import format_bytes
from engine.model.config import GPTNeoXConfig
from engine.model.network import GPTNeoX
from engine.precision import dtype_of, precision_dtypes
from engine.train import checkpoint as ckpt
from engine.train import fsdp
from engine.train.config import Config, memory_budget_bytes
from engine.train.export import export_student
from engine.train.gathered_export import export_sharded_student
from engine.train.setup import (
    build_student,
    build_teacher,
    compile_choice,
    device_memory_bytes,
    memory_planner,
    plan_micro_batch,
)
from engine.train.sharded_checkpoint import load_sharded_checkpoint, save_sharded_checkpoint
from engine.train.step import ONE_PROCESS, StepHooks


class Strategy:
    """One process: everything as built, one rank that does all the writing."""

    teacher_sharded = False

    def __init__(self, config: Config, info: dist.DistInfo):
        self.config, self.info = config, info
        self.weight_dtype, self.autocast_dtype = precision_dtypes(config.precision)

    def build_models(self, log) -> tuple[GPTNeoX, GPTNeoX | None]:
        """(student, teacher or None) as this rank holds them."""
        device = self.info.device
        return (build_student(self.config, device, self.weight_dtype),
                build_teacher(self.config, device))

    def plan_micro_batch(self, teacher_cfg, student_cfg) -> tuple[int, int, int | None, str]:
        """setup.plan_micro_batch for the models as this rank holds them (after build_models)."""
        return plan_micro_batch(self.config, teacher_cfg, student_cfg, self.info.device,
                                world_size=self.info.world_size,
                                teacher_sharded=self.teacher_sharded)

    def _compile(self, model: torch.nn.Module, sharded: bool) -> torch.nn.Module:
        if not compile_choice(self.config, self.info.device)[0]:
            return model
        return fsdp.compile_blocks(model) if sharded else torch.compile(model)

    def wrap_student(self, student: GPTNeoX) -> torch.nn.Module:
        """What runs the student's forward: the student, compiled when asked."""
        return self._compile(student, sharded=False)

    def wrap_teacher(self, teacher: GPTNeoX | None) -> torch.nn.Module | None:
        """What runs the teacher's forward: the teacher, compiled when the student is."""
        return None if teacher is None else self._compile(teacher, self.teacher_sharded)

    # The step's head loss, clip and sum over ranks; the first non-finite weight (same
    # verdict on every rank); a checkpoint's loading into the live student and optimizer.
    step_hooks = ONE_PROCESS
    first_non_finite = staticmethod(ckpt.first_non_finite)
    load_checkpoint = staticmethod(ckpt.load_checkpoint)

    def save_checkpoint(self, out_dir: Path, step: int, **state) -> Path | None:
        """Write checkpoint `step` (call on every rank); the writer returns its path. Rank 0
        writes: under DDP every rank holds the same weights."""
        return ckpt.save_checkpoint(out_dir, step, **state) if self.info.is_main else None

    def export(self, student: GPTNeoX, export_dir: Path, **kwargs) -> Path | None:
        """The student as a Hugging Face folder (call on every rank; rank 0 writes)."""
        return export_student(student, export_dir, **kwargs) if self.info.is_main else None

    def validation_share(self) -> tuple[int, int, bool]:
        """(rank, world size) splitting the val batches, and whether to sum over ranks."""
        return self.info.rank, self.info.world_size, self.info.distributed

    def gathered_root(self, *models):
        """A context with the heads of sharded models whole (nothing to do unsharded)."""
        return contextlib.nullcontext()

    # What a teacher signal wraps a model's head use in: none where nothing is sharded.
    head_gathered = None


class DDP(Strategy):
    """Whole replicas on every rank; the student's forward under DistributedDataParallel."""

    step_hooks = StepHooks(all_reduce_sum=dist.all_reduce_sum)

    def wrap_student(self, student: GPTNeoX) -> torch.nn.Module:
        info = self.info
        model = DistributedDataParallel(
            student,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
        # Each rank's loss is already divided by the global token count, so gradients must
        # be summed over ranks, not averaged (DDP's default divides by the world size).
        model.register_comm_hook(state=None, hook=dist.allreduce_sum_hook)
        return self._compile(model, sharded=False)


class FSDP(Strategy):
    """The student sharded over the ranks (FSDP2), the teacher sharded or replicated."""

    def __init__(self, config: Config, info: dist.DistInfo):
        super().__init__(config, info)
        self.autocast_dtype = None  # the mixed precision policy gathers bf16 weights

    def build_models(self, log) -> tuple[GPTNeoX, GPTNeoX | None]:
        config, info, d = self.config, self.info, self.config.dist
        mesh = dist.device_mesh(info)

        def shard_student(model: GPTNeoX) -> GPTNeoX:
            policy = fsdp.mixed_precision_policy(config.precision)
            return fsdp.shard_model(model, mesh, mp_policy=policy, cpu_offload=d.cpu_offload,
                                    reshard_after_forward=d.reshard_after_forward)

        host = torch.device("cpu")
        student = fsdp.build_sharded(info, lambda: build_student(config, host, self.weight_dtype),
                                     shard=shard_student, dtype=self.weight_dtype,
                                     host_weights=d.cpu_offload)
        student.set_activation_checkpointing(config.runtime.activation_checkpointing)
        student.train()
        if not config.teacher.path:
            return student, None
        self.teacher_sharded, why = teacher_placement(config, info)
        log(f"teacher: {why}")
        if not self.teacher_sharded:
            return student, build_teacher(config, info.device)
        teacher = fsdp.build_sharded(info, lambda: build_teacher(config, host),
                                     shard=lambda m: fsdp.shard_model(m, mesh),
                                     dtype=dtype_of(config.teacher.dtype))
        teacher.requires_grad_(False)
        return student, teacher.eval()

    def wrap_student(self, student: GPTNeoX) -> torch.nn.Module:
        return self._compile(student, sharded=True)

    # The head loss inside the root's forward; collective clip and finite check; every rank
    # writes its shards of a checkpoint and gathers the export (rank 0 writes that).
    step_hooks = StepHooks(head_loss=fsdp.head_loss, clip_grad_norm=fsdp.clip_grad_norm,
                           all_reduce_sum=dist.all_reduce_sum)
    first_non_finite = staticmethod(fsdp.first_non_finite)
    save_checkpoint = staticmethod(save_sharded_checkpoint)
    load_checkpoint = staticmethod(load_sharded_checkpoint)
    export = staticmethod(export_sharded_student)
    gathered_root = head_gathered = staticmethod(fsdp.gathered_root)

    def validation_share(self) -> tuple[int, int, bool]:
        # Every rank scores the same batches (the ones DDP's ranks share out), so their
        # forwards, and the collectives inside them, stay in step.
        return 0, 1, False


def init_distributed(config: Config) -> dist.DistInfo:
    """torch.distributed for this process (engine.dist); FSDP needs a process group even for
    one process (its mesh), so dist.strategy=fsdp makes a group of one."""
    return dist.init_distributed(config.device, group_of_one=config.dist.strategy == "fsdp")


def build_strategy(config: Config, info: dist.DistInfo) -> Strategy:
    """The run's strategy: FSDP per dist.strategy=fsdp, DDP across several ranks, else one."""
    if config.dist.strategy == "fsdp":
        return FSDP(config, info)
    return DDP(config, info) if info.distributed else Strategy(config, info)


# ----------------------------------------------------------------------------- placement


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
