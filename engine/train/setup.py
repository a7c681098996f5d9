"""Builders for a training run: models, loader, optimizer, micro-batch plan, resume, wrapping.

Each builder takes the typed configuration and returns one ready piece, so the Trainer's
__init__ (engine/train/loop.py) reads as the list of what a run is made of.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

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
from engine.train import checkpoint as ckpt
from engine.train import fsdp
from engine.train.config import AUTO, Config, ConfigError, memory_budget_bytes
from engine.train.on_policy_signal import OnPolicyTeacher
from engine.train.sharded_checkpoint import load_sharded_checkpoint
from engine.train.teacher_signal import LiveTeacher, NoTeacher, TeacherSignal

# --------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------


def earlier_results(out_dir: Path) -> list[str]:
    """What an earlier run left in out_dir besides checkpoints: its export, its metrics."""
    found = []
    if (out_dir / "final").exists():
        found.append(str(out_dir / "final"))
    metrics = out_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(str(metrics))
    return found


def prepare_run_folder(config: Config, info: dist.DistInfo) -> tuple[list[Path], bool]:
    """Check out_dir against run.resume and run.overwrite, clear debris of killed saves;
    return (the checkpoints to try resuming from, best first (empty: a fresh start), whether
    an earlier run's results are to be replaced).

    Call with the run lock held. A fresh start refuses a folder holding an earlier run's
    results unless run.overwrite is set; the caller replaces them (run_folder
    .replace_earlier_results) only once every other start-up check has passed.
    """
    out_dir = Path(config.run.out_dir)
    candidates = ckpt.resume_candidates(config.run.resume, out_dir)
    if config.run.resume == "none" and ckpt.latest_checkpoint(out_dir) is not None:
        raise ConfigError(
            f"run.resume=none: {ckpt.checkpoint_root(out_dir)} holds checkpoints; "
            "use run.resume=auto to continue, or another run.out_dir"
        )
    earlier = earlier_results(out_dir) if not candidates else []
    if earlier and not config.run.overwrite:
        raise ConfigError(
            f"run.out_dir: {out_dir} holds an earlier run ({', '.join(earlier)}) and no "
            "checkpoint to resume from; choose another run.out_dir, or set "
            "run.overwrite=true to replace its results"
        )
    if info.is_main:
        ckpt.clean_incomplete(out_dir)  # a killed save's own debris, nothing else
    dist.barrier()
    return candidates, bool(earlier)


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


def wrap_teacher(teacher: GPTNeoX | None, config: Config, device) -> torch.nn.Module | None:
    """What runs the teacher's forward: the teacher, compiled when the student is."""
    if teacher is None or not compile_choice(config, device)[0]:
        return teacher
    if fsdp.is_sharded(teacher):
        return fsdp.compile_blocks(teacher)
    return torch.compile(teacher)


def build_loss_spec(config: Config) -> LossSpec:
    """The run's LossSpec: the `loss` section and data.valid_vocab (0: the whole head), built
    once (config.validate has already checked every value, so a bad one never reaches here)."""
    loss = config.loss
    return LossSpec(alpha=loss.alpha, temperature=loss.temperature, divergence=loss.divergence,
                    beta=loss.beta, skew=loss.skew, t2_scale=loss.t2_scale,
                    valid_vocab=config.data.valid_vocab or None, backend=loss.backend,
                    fused_head=loss.fused_head)


def build_signal(teacher: torch.nn.Module | None, config: Config, info: dist.DistInfo, *,
                 accum_steps: int, autocast_dtype: torch.dtype | None) -> TeacherSignal:
    """The training step's teacher signal without a cache: the (wrapped) teacher model, with
    a share onpolicy.fraction of micro-batches written by the student, or cross-entropy alone
    (the cache's signal comes from engine.train.teacher_source)."""
    if teacher is None:
        return NoTeacher()
    on = config.onpolicy
    if on.fraction == 0:
        return LiveTeacher(teacher)
    return OnPolicyTeacher(LiveTeacher(teacher),
                           SamplingSettings.of(on, config.data.valid_vocab or None),
                           fraction=on.fraction, accum_steps=accum_steps, seed=config.run.seed,
                           rank=info.rank, device=info.device, autocast_dtype=autocast_dtype)


def wrap_model(student: GPTNeoX, config: Config, info: dist.DistInfo) -> torch.nn.Module:
    """What runs the forward: the student, under DDP across ranks, compiled when asked."""
    model: torch.nn.Module = student
    if info.distributed and config.dist.strategy == "ddp":  # fsdp: sharded when built
        model = DistributedDataParallel(
            student,
            device_ids=[info.device.index] if info.device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
        # Each rank's loss is already divided by the global token count, so gradients must
        # be summed over ranks, not averaged (DDP's default divides by the world size).
        model.register_comm_hook(state=None, hook=dist.allreduce_sum_hook)
    if compile_choice(config, info.device)[0]:
        model = fsdp.compile_blocks(model) if fsdp.is_sharded(model) else torch.compile(model)
    return model


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


def lr_at(config: Config, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant/cosine."""
    optim = config.optim
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    # The last step (index steps - 1) trains at min_lr.
    decay_steps = max(1, config.run.steps - optim.warmup_steps - 1)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


# --------------------------------------------------------------------------------------
# Resume
# --------------------------------------------------------------------------------------


def load_resume_state(
    folder: Path,
    *,
    student: GPTNeoX,
    optimizer: torch.optim.Optimizer,
    loader: BatchLoader,
    info: dist.DistInfo,
    signal: TeacherSignal | None = None,
    log=print,
) -> tuple[int, int]:
    """Load a checkpoint into the live student, optimizer, loader, RNGs and the teacher
    signal's sampler (an on-policy run's; a checkpoint of another number of ranks leaves
    each rank's sampler at its seed); return
    (step, non-finite steps in a row) as they were when it was saved.

    An FSDP student loads a sharded checkpoint (engine/train/sharded_checkpoint.py), any
    other a whole-model one. A checkpoint of another number of ranks continues on this one
    (the loader's position converted, see rescaled_loader_state).
    """
    if fsdp.is_sharded(student):
        state = load_sharded_checkpoint(folder, student=student, optimizer=optimizer)
    else:
        state = ckpt.load_checkpoint(folder, student=student, optimizer=optimizer)
    saved = state["loader_states"]
    if len(saved) == info.world_size:
        loader.load_state_dict(saved[info.rank])
        ckpt.restore_rng_state(state["rng_states"][info.rank])
        if signal is not None:
            signal.load_state_dict(state["rng_states"][info.rank])
    else:
        loader.load_state_dict(rescaled_loader_state(saved, loader, folder))
        # No rank of the saved run is this one: every rank takes rank 0's RNG streams.
        ckpt.restore_rng_state(state["rng_states"][0])
        log(f"{folder}: saved by {len(saved)} rank(s), continuing on {info.world_size}: the "
            "data continues where the saved ranks stopped (not bit-exact across world sizes)")
    return int(state["step"]), int(state.get("bad_steps", 0))


def rescaled_loader_state(states: list[dict], loader: BatchLoader, folder: Path) -> dict:
    """This rank's loader state for a checkpoint written by another number of ranks.

    The ranks deal each epoch's permutation out round-robin, micro-batch by micro-batch, so
    after `position` micro-batches each, N ranks have together consumed exactly the first
    position x micro_batch x N items of it, whatever N is. M ranks continue from the same
    item when that count is a whole number of their micro_batch x M items (always so when
    the sequences per optimizer step stay the same); otherwise the resume is refused.
    """
    first = states[0]
    if any((s["epoch"], s["position"]) != (first["epoch"], first["position"]) for s in states):
        raise ckpt.CheckpointLoadError(
            f"{folder}: its ranks' data loaders stopped at different positions; it can only "
            f"continue on {len(states)} ranks")
    consumed = first["position"] * first["micro_batch"] * len(states)
    per_batch = loader.micro_batch * loader.world_size
    if consumed % per_batch:
        raise ckpt.CheckpointLoadError(
            f"{folder}: {len(states)} rank(s) consumed {consumed} sequences of epoch "
            f"{first['epoch']}, not a multiple of this run's {loader.micro_batch} x "
            f"{loader.world_size} per micro-batch; resume on {len(states)} rank(s), or keep "
            "micro_batch x world size a divisor of that count")
    return {**first, "world_size": loader.world_size, "micro_batch": loader.micro_batch,
            "position": consumed // per_batch}


def resume(candidates: list[Path], *, log, **live) -> tuple[Path | None, int, int]:
    """(checkpoint, step, non-finite steps in a row) of the first candidate that loads.

    A damaged one (a file whose sha256 changed, non-finite weights, an unreadable state
    file) is skipped with a warning naming it and why, so resume=auto falls back to the
    newest intact checkpoint; when none is intact the run stops rather than start afresh
    over them. Every load overwrites all of the live state, so a failed attempt leaves
    nothing behind.
    """
    if not candidates:
        return None, 0, 0
    failures = []
    for folder in candidates:
        try:
            step, bad_steps = load_resume_state(folder, log=log, **live)
        except ckpt.CheckpointLoadError as exc:
            failures.append(str(exc))
            log(f"warning: not resuming from {folder}: {exc}")
            continue
        if failures:
            log(f"warning: resuming from {folder}, the newest intact checkpoint")
        return folder, step, bad_steps
    if len(candidates) == 1:
        raise ckpt.CheckpointLoadError(failures[0])
    raise ckpt.CheckpointLoadError(
        f"no intact checkpoint to resume from ({'; '.join(failures)}); move the damaged "
        "ones away to start afresh, or choose another run.out_dir"
    )
