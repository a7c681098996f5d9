"""Builders for a training run: models, loader, optimizer, micro-batch plan, loss spec.

Each builder takes the typed configuration and returns one ready piece, so the Trainer's
__init__ (engine/train/loop.py) reads as the list of what a run is made of.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from engine import dist
from engine.data.loader import BatchLoader
from engine.data.teacher_cache import CacheError, read_cache_manifest
from engine.kernels.loss_spec import LossSpec
from engine.memory import format_bytes, largest_micro_batch, plan_memory
from engine.model.hf_io import load_pretrained
from engine.model.network import GPTNeoX
from engine.on_policy import SamplingSettings
from engine.precision import dtype_bytes, dtype_of
from engine.sharded_memory import plan_sharded_memory
from engine.train.config import AUTO, Config, ConfigError, memory_budget_bytes
from engine.train.on_policy_signal import OnPolicyTeacher
from engine.train.teacher_signal import LiveTeacher, NoTeacher, TeacherSignal

# --------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------


def build_student(config: Config, device: torch.device, dtype: torch.dtype) -> GPTNeoX:
    """The trained model: a pretrained folder, or fresh weights from the scratch shape."""
    s = config.student
    if s.init == "pretrained":
        student = load_pretrained(s.path, dtype=dtype, device=device)
    else:
        torch.manual_seed(config.run.seed)  # same fresh weights for a seed, on every rank
        student = GPTNeoX(s.scratch_model_config()).to(device=device, dtype=dtype)
    if config.runtime.activation_checkpointing:
        student.set_activation_checkpointing(True)
    return student.train()


def build_teacher(config: Config, device: torch.device) -> GPTNeoX | None:
    """The frozen teacher: eval mode, no parameter requires grad (None without teacher.path)."""
    if not config.teacher.path:
        return None
    teacher = load_pretrained(config.teacher.path, dtype=dtype_of(config.teacher.dtype),
                              device=device)
    teacher.requires_grad_(False)
    return teacher.eval()


def check_compatible(config: Config, student: GPTNeoX, teacher: GPTNeoX | None) -> None:
    """Vocabularies and context lengths that the models and the data must share."""
    vocab = student.config.vocab_size
    if teacher is not None and teacher.config.vocab_size != vocab:
        _check_padded_teacher_head(config, teacher.config.vocab_size, vocab)
    if config.data.valid_vocab > vocab:
        raise ConfigError(f"data.valid_vocab={config.data.valid_vocab} exceeds vocab_size {vocab}")
    for name, model in (("student", student), ("teacher", teacher)):
        if model is not None and config.batch.seq_len > model.config.max_positions:
            raise ConfigError(
                f"batch.seq_len={config.batch.seq_len} exceeds the {name}'s max_positions "
                f"{model.config.max_positions}"
            )


def _check_padded_teacher_head(config: Config, teacher_rows: int, student_rows: int) -> None:
    """A teacher whose head has more rows than the student's (pythia-6.9b and -12b pad theirs
    to 50432 and 50688, the others to 50304, over the same 50277 tokens) teaches through its
    first rows, when data.valid_vocab says the rows beyond are padding."""
    valid = config.data.valid_vocab
    if teacher_rows > student_rows and 0 < valid <= student_rows:
        return
    fix = ("set data.valid_vocab to the real tokens (50277 for Pythia) so the padding rows "
           "beyond can be left out" if teacher_rows > student_rows else
           "use a teacher with at least as many rows as the student")
    raise ConfigError(
        f"teacher.path={config.teacher.path} has vocab_size {teacher_rows}, the student has "
        f"{student_rows}: the logits must share a vocabulary ({fix})"
    )


# The CUDA caching allocator setting the engine starts with unless the user set their own:
# growing segments instead of fixed blocks, so the large, differently sized buffers of a step
# do not strand memory between them (the fragmentation measured: benchmarks/README.md).
CUDA_ALLOC_CONF = "expandable_segments:True"


def configure_cuda_allocator(config: Config) -> None:
    """Set PYTORCH_CUDA_ALLOC_CONF before CUDA starts, unless set already or on a CPU run."""
    if config.device != "cpu":
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", CUDA_ALLOC_CONF)


def compile_choice(config: Config, device: torch.device) -> tuple[bool, str]:
    """(compile the models?, why): runtime.compile, where "auto" means on with CUDA."""
    if config.runtime.compile != AUTO:
        return bool(config.runtime.compile), f"runtime.compile={config.runtime.compile}"
    if device.type == "cuda":
        # Fewer, fused kernels for a launch-bound eager step (benchmarks/README.md, GPU suite).
        return True, "auto: CUDA, measured fastest"
    return False, "auto: off on the CPU"


def build_loss_spec(config: Config) -> LossSpec:
    """The run's LossSpec: the `loss` section and data.valid_vocab (0: the whole head), built
    once (config.validate has already checked every value, so a bad one never reaches here)."""
    loss = config.loss
    return LossSpec(alpha=loss.alpha, temperature=loss.temperature, divergence=loss.divergence,
                    beta=loss.beta, skew=loss.skew, t2_scale=loss.t2_scale,
                    valid_vocab=config.data.valid_vocab or None, backend=loss.backend,
                    fused_head=loss.fused_head)


def build_signal(teacher: torch.nn.Module | None, config: Config, info: dist.DistInfo, *,
                 accum_steps: int, autocast_dtype: torch.dtype | None,
                 gathered) -> TeacherSignal:
    """The training step's teacher signal without a cache: the (wrapped) teacher model, with
    a share onpolicy.fraction of micro-batches written by the student, or cross-entropy alone
    (the cache's signal comes from engine.train.teacher_source). `gathered` is the
    strategy's gathered_root (a sharded model's head made whole)."""
    if teacher is None:
        return NoTeacher()
    live = LiveTeacher(teacher, gathered)
    on = config.onpolicy
    if on.fraction == 0:
        return live
    return OnPolicyTeacher(live,
                           SamplingSettings.of(on, config.data.valid_vocab or None),
                           fraction=on.fraction, accum_steps=accum_steps, seed=config.run.seed,
                           rank=info.rank, device=info.device, autocast_dtype=autocast_dtype)


def describe_runtime(config: Config, device: torch.device, optimizer, memory_note: str) -> str:
    """One log line: what the engine chose for this device, and why."""
    compiled, why = compile_choice(config, device)
    if compiled and config.dist.strategy == "fsdp":
        why += "; each block under FSDP"
    fused = "fused" if optimizer.defaults.get("fused") else "unfused"
    head = "fused head + loss" if config.loss.fused_head else "full logits + kd_loss"
    allocator = ""
    if device.type == "cuda":
        allocator = f"; allocator {os.environ.get('PYTORCH_CUDA_ALLOC_CONF', 'default')}"
    return (f"runtime on {device.type}: torch.compile {'on' if compiled else 'off'} ({why}); "
            f"{fused} AdamW; {head} (loss.fused_head); {memory_note}{allocator}")


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def device_memory_bytes(device: torch.device) -> int | None:
    """The card's memory on CUDA (what batch.memory_budget="auto" fills); None elsewhere."""
    if device.type != "cuda":
        return None
    return int(torch.cuda.get_device_properties(device).total_memory)


def memory_plan_args(config: Config) -> dict[str, Any]:
    """plan_memory's keyword arguments (beside the model shapes and micro_batch) for a run."""
    return dict(
        seq_len=config.batch.seq_len,
        precision=config.precision,
        activation_checkpointing=config.runtime.activation_checkpointing,
        teacher_dtype_bytes=dtype_bytes(config.teacher.dtype),
        in_place_loss_gradient=config.loss.backend != "torch",
        fused_head=config.loss.fused_head,
        teacher_cache_width=teacher_cache_width(config),
        onpolicy=((config.onpolicy.prompt_tokens, config.onpolicy.new_tokens)
                  if config.onpolicy.fraction > 0 else None),
    )


def memory_planner(config: Config, *, world_size: int = 1, teacher_sharded: bool = False):
    """(plan function, its arguments beside the shapes and micro_batch): one GPU's plan
    (engine.memory), or under dist.strategy=fsdp the plan of one GPU among `world_size`
    (engine.sharded_memory)."""
    if config.dist.strategy != "fsdp":
        return plan_memory, memory_plan_args(config)
    return plan_sharded_memory, dict(memory_plan_args(config), world_size=world_size,
                                     teacher_sharded=teacher_sharded,
                                     reshard_after_forward=config.dist.reshard_after_forward,
                                     cpu_offload=config.dist.cpu_offload)


def teacher_cache_width(config: Config) -> int:
    """Entries per position of teacher.cache (0 without one): from its manifest, or, for a
    plan made before the cache exists, the README's example (64; the targets take ~0.5 KB per
    token either way, small beside what the missing teacher frees)."""
    if not config.teacher.cache:
        return 0
    try:
        return int(read_cache_manifest(Path(config.teacher.cache))["width"])
    except (CacheError, KeyError, TypeError, ValueError):
        return 64


def plan_micro_batch(config: Config, teacher_cfg, student_cfg, device: torch.device, *,
                     world_size: int = 1,
                     teacher_sharded: bool = False) -> tuple[int, int, int | None, str]:
    """(micro_batch, accum_steps, predicted peak bytes, a note saying what was chosen and why)
    honouring batch.memory_budget ("auto": the device's memory on CUDA, none on the CPU).

    The budget picks the largest micro-batch the memory plan fits, among the divisors of the
    sequences per step, so the accumulation steps change but the tokens per step do not.
    Under FSDP the plan is per GPU, for `world_size` GPUs and the teacher as placed.
    """
    mb, accum = config.batch.micro_batch, config.batch.accum_steps
    setting = config.batch.memory_budget
    budget = memory_budget_bytes(config, device_memory_bytes(device))
    if budget is None:
        return mb, accum, None, f"no memory budget ({setting or 'none'}): micro_batch {mb} as set"
    planner, plan_args = memory_planner(config, world_size=world_size,
                                        teacher_sharded=teacher_sharded)
    largest = largest_micro_batch(teacher_cfg, student_cfg, budget_bytes=budget,
                                  planner=planner, **plan_args)
    if largest < 1:
        raise ConfigError(
            f"batch.memory_budget={setting}: not even one sequence of "
            f"{config.batch.seq_len} tokens fits in {format_bytes(budget)} (try "
            "runtime.activation_checkpointing=true)"
        )
    sequences = mb * accum
    new_mb = max(d for d in range(1, min(largest, sequences) + 1) if sequences % d == 0)
    new_accum = sequences // new_mb
    predicted = planner(teacher_cfg, student_cfg, micro_batch=new_mb, **plan_args)
    source = "the device's memory" if setting.strip().lower() == AUTO else setting
    note = (f"memory budget {format_bytes(budget)} ({source}): largest micro-batch {largest}, "
            f"using micro_batch={new_mb} x accum_steps={new_accum} (was {mb} x {accum}), "
            f"predicted peak {format_bytes(predicted.allocated_peak)}")
    return new_mb, new_accum, predicted.allocated_peak, note


def build_train_loader(config: Config, dataset, micro_batch: int, info) -> BatchLoader:
    """This rank's share of the training items, reshuffled every epoch from run.seed."""
    loader = BatchLoader(
        dataset,
        micro_batch,
        seed=config.run.seed,
        rank=info.rank,
        world_size=info.world_size,
        split="train",
        val_fraction=config.data.val_fraction,
    )
    if len(loader) == 0:
        raise ConfigError(
            f"data.path={config.data.path}: no full training micro-batch of {micro_batch} x "
            f"{config.batch.seq_len} tokens for rank {info.rank} of {info.world_size}"
        )
    return loader


# --------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------


def build_optimizer(config: Config, model: torch.nn.Module, device: torch.device):
    """AdamW; weight decay only on matrices (not biases, LayerNorms); fused when allowed.

    The fused implementation exists for CUDA and (torch >= 2.4) the CPU, where it is several
    times faster (see benchmarks/README.md); older builds fall back to the default.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = dict(
        lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps
    )
    if config.optim.fused and device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass  # no fused kernel for this device/dtype in this torch build
    return torch.optim.AdamW(groups, **kwargs)
