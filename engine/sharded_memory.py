"""The memory plan of one GPU among N under FSDP (dist.strategy = "fsdp").

engine.memory plans one GPU holding everything. Under FSDP2 (engine/train/fsdp.py) a GPU holds
1/N of the student's weights, gradients and AdamW moments (each parameter's first dimension
rounded up to a multiple of N, as fully_shard pads it), the whole teacher or 1/N of it, and on
top the groups gathered at the peak:

  * the root (final LayerNorm + head), gathered from the loss until the backward has passed it;
  * with dist.reshard_after_forward two blocks (the one in backward and the one prefetched),
    without it every block, gathered since its forward;
  * one block's gradients in the reduce dtype, the reduce-scatter's input;
  * with a sharded teacher and the fused head, the teacher's head, gathered for the loss.

Activations, loss buffers and the on-policy sampler's memory are the single-GPU plan's, in
the dtype the step computes in: under bf16-autocast FSDP gathers bf16 weights and the step
runs without autocast (MixedPrecisionPolicy does the casting), so those buffers are those of
bf16-pure (the sampler's KV cache too: it takes the gathered weights' dtype). On CUDA a
multi-GPU run adds NCCL's own buffers, outside the caching allocator.

This is a plan, checked on the CPU against the shards a 2-rank gloo run holds; no multi-GPU
measurement backs it yet (see README, "On paper").
"""

from __future__ import annotations

import math

from engine.memory import (
    SAMPLING,
    MemoryPlan,
    parameter_count,
    plan_memory,
)
from engine.precision import compute_dtype, precision_dtypes

# NCCL's communicator buffers per GPU (channels x peers x NCCL_BUFFSIZE, outside the caching
# allocator): a conservative round number for one node of 8, not a measurement.
NCCL_BUFFER_BYTES = 512 * 2**20


def parameter_shapes(cfg) -> list[tuple[int, ...]]:
    """Every parameter's shape, in the module's order (embedding, blocks, final norm, head)."""
    h, i, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    block = [(h,), (h,), (h,), (h,), (3 * h, h), (3 * h,), (h, h), (h,), (i, h), (i,), (h, i), (h,)]
    return [(v, h)] + block * cfg.num_layers + [(h,), (h,), (v, h)]


def sharded_numel(shapes, world_size: int) -> int:
    """Elements of the largest shard: rank 0's, each first dimension padded to N rows."""
    return sum(math.ceil(s[0] / world_size) * math.prod(s[1:]) for s in shapes)


def block_numel(cfg) -> int:
    shapes = parameter_shapes(cfg)
    return sum(math.prod(s) for s in shapes[1:13])


def head_numel(cfg) -> int:
    """The root group: final LayerNorm and head (the embedding is a group of its own)."""
    return cfg.vocab_size * cfg.hidden_size + 2 * cfg.hidden_size


def _student_components(cfg, *, world_size: int, precision: str, reshard_after_forward: bool,
                        cpu_offload: bool) -> list[tuple[str, int]]:
    weight, _ = precision_dtypes(precision)
    master = weight.itemsize
    gathered = compute_dtype(precision).itemsize
    share = sharded_numel(parameter_shapes(cfg), world_size)
    name = "fp32" if master == 4 else "bf16"
    out = []
    if not cpu_offload:
        out += [(f"student weights ({name}, 1/{world_size} shard)", master * share),
                (f"student gradients ({name}, 1/{world_size} shard)", master * share),
                (f"AdamW moments m, v ({name}, 1/{world_size} shard)", 2 * master * share)]
    blocks = 2 if reshard_after_forward else cfg.num_layers
    blocks = min(blocks, cfg.num_layers)
    out += [("gathered: final LayerNorm + head", gathered * head_numel(cfg)),
            (f"gathered: {blocks} block(s)", gathered * blocks * block_numel(cfg)),
            ("reduce-scatter input: one block's gradients", master * block_numel(cfg))]
    return out


def _teacher_components(cfg, *, world_size: int, sharded: bool, teacher_bytes: int,
                        fused_head: bool) -> list[tuple[str, int]]:
    name = "bf16" if teacher_bytes == 2 else "fp32"
    if not sharded:
        return [(f"teacher weights ({name}, replicated)",
                 teacher_bytes * parameter_count(cfg)["total"])]
    out = [(f"teacher weights ({name}, 1/{world_size} shard)",
            teacher_bytes * sharded_numel(parameter_shapes(cfg), world_size))]
    if fused_head:
        out.append(("teacher head gathered for the fused loss", teacher_bytes * head_numel(cfg)))
    return out


def plan_sharded_memory(
    teacher_cfg,
    student_cfg,
    *,
    world_size: int,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16-autocast",
    activation_checkpointing: bool = False,
    teacher_sharded: bool = True,
    reshard_after_forward: bool = True,
    cpu_offload: bool = False,
    teacher_dtype_bytes: int | None = None,
    **plan_kwargs,
) -> MemoryPlan:
    """The per-GPU plan of one micro-step on `world_size` GPUs (module docstring).

    `plan_kwargs` go to engine.memory.plan_memory (in_place_loss_gradient, attention,
    fused_head, ...), whose activation and loss components are reused unchanged.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    step_precision = "bf16-pure" if precision == "bf16-autocast" else precision
    single = plan_memory(teacher_cfg, student_cfg, micro_batch=micro_batch, seq_len=seq_len,
                         precision=step_precision, teacher_dtype_bytes=teacher_dtype_bytes,
                         activation_checkpointing=activation_checkpointing, **plan_kwargs)
    plan = MemoryPlan(micro_batch, seq_len, precision, activation_checkpointing,
                      single.fused_head)
    add = plan.add
    for name, nbytes in _student_components(
            student_cfg, world_size=world_size, precision=precision,
            reshard_after_forward=reshard_after_forward, cpu_offload=cpu_offload):
        add(name, nbytes, "student")
    if teacher_cfg is not None:
        teacher_bytes = teacher_dtype_bytes or compute_dtype(precision).itemsize
        for name, nbytes in _teacher_components(
                teacher_cfg, world_size=world_size, sharded=teacher_sharded,
                teacher_bytes=teacher_bytes, fused_head=single.fused_head):
            add(name, nbytes, "teacher")
    for name, nbytes in single.components.items():
        if single.groups[name] in ("activations", "loss", SAMPLING):
            add(name, nbytes, single.groups[name])
    if plan_kwargs.get("device_type", "cuda") == "cuda":
        plan.add_card_overhead()
        if world_size > 1:
            add("NCCL communicator buffers", NCCL_BUFFER_BYTES, "overhead")
    plan.flops_per_token = single.flops_per_token
    return plan


def group_totals(plan: MemoryPlan) -> dict[str, int]:
    """Bytes per group (student, teacher, activations, loss, overhead) and their total."""
    totals: dict[str, int] = {}
    for name, nbytes in plan.components.items():
        totals[plan.groups[name]] = totals.get(plan.groups[name], 0) + nbytes
    totals["total"] = plan.total
    return totals
