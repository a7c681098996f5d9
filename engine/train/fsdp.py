"""dist.strategy = "fsdp": torch's FSDP2 (`fully_shard`) for the student and, when it does not
fit replicated, for the frozen teacher.

Groups: every transformer block is one FSDP group, the input embedding another, and the root
(the student itself) holds the final LayerNorm and the head. A group's weights are gathered
just before its forward and freed after it (dist.reshard_after_forward), gathered again for
its backward, and its gradients reduce-scattered right after; every rank keeps 1/N of the
weights, gradients and AdamW state.

Precision (MixedPrecisionPolicy), per training precision:
  bf16-autocast  fp32 sharded master weights and AdamW state, bf16 gathered weights and
                 compute, gradients reduced and accumulated in fp32; autocast stays on so
                 LayerNorm, softmax and the loss run in fp32 as under DDP. Unlike DDP the
                 residual stream is bf16 (the embedding's weight is gathered in bf16).
  bf16-pure      bf16 everywhere, gradients reduced in bf16 (as DDP does).
  fp32           no policy: fp32 everywhere.
Block inputs are not cast (cast_forward_inputs=False): the rotary cos/sin tables stay fp32.

Gradients are *summed* over ranks, as under DDP: every rank's loss is already divided by the
valid tokens of the whole window across ranks (engine/train/step.py). Gradient accumulation
reduce-scatters after every micro-batch: FSDP is chosen for memory, and skipping the
reduce-scatter (set_requires_gradient_sync(False)) would keep the whole unsharded gradient,
in fp32 under bf16-autocast, on every rank until the window ends: more than the sharded
weights, gradients and moments together. The price is one reduce-scatter per micro-batch
instead of one per window.

Loading: rank 0 builds the full model on the host (engine.model.hf_io.load_pretrained, with
its checks, or fresh weights from run.seed), the other ranks build it on the meta device, and
torch.distributed.checkpoint.state_dict.set_model_state_dict sends each tensor from rank 0
into every rank's shard: no GPU ever holds the whole model.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import (
    CPUOffloadPolicy,
    FSDPModule,
    MixedPrecisionPolicy,
    OffloadPolicy,
    fully_shard,
)
from torch.distributed.tensor import DTensor

from engine import dist
from engine.model.network import GPTNeoX, model_device, unwrap_model
from engine.precision import precision_dtypes

# ----------------------------------------------------------------------------- wrapping


def mixed_precision_policy(precision: str) -> MixedPrecisionPolicy:
    """The FSDP2 policy of a training precision (module docstring)."""
    _, autocast_dtype = precision_dtypes(precision)
    if autocast_dtype is None:  # fp32, bf16-pure: gather, compute and reduce in the weights' dtype
        return MixedPrecisionPolicy(cast_forward_inputs=False)
    return MixedPrecisionPolicy(param_dtype=autocast_dtype, reduce_dtype=torch.float32,
                                cast_forward_inputs=False)


def shard_model(model: GPTNeoX, mesh, *, mp_policy: MixedPrecisionPolicy | None = None,
                reshard_after_forward: bool = True, cpu_offload: bool = False) -> GPTNeoX:
    """fully_shard each block, the input embedding, then the root (in place; returns `model`).

    The root is resharded after its forward too: a forward without a backward (validation,
    the frozen teacher) then leaves nothing gathered, at the cost of gathering the final
    LayerNorm and the head again for the backward.
    """
    offload = (CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload
               else OffloadPolicy())
    kwargs = dict(mesh=mesh, offload_policy=offload,
                  mp_policy=mp_policy or MixedPrecisionPolicy(cast_forward_inputs=False))
    for block in model.gpt_neox.layers:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kwargs)
    embedding = fully_shard(model.gpt_neox.embed_in, reshard_after_forward=True, **kwargs)
    if hasattr(embedding, "set_unshard_in_backward"):
        # The embedding's backward needs the token ids, not its weight: no gather for it.
        embedding.set_unshard_in_backward(False)
    fully_shard(model, reshard_after_forward=True, **kwargs)
    sum_gradients_over_ranks(model)
    return model


def sum_gradients_over_ranks(model: torch.nn.Module) -> None:
    """Reduce gradients with a plain sum (FSDP2 averages over ranks by default)."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_gradient_divide_factor(1.0)
            if hasattr(module, "set_force_sum_reduction_for_comms"):
                # A SUM collective instead of PREMUL_SUM(1.0), which gloo does not have.
                module.set_force_sum_reduction_for_comms(True)


def is_sharded(model: torch.nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def head_loss(student, input_ids, loss_fn):
    """loss_fn(final hidden states, head weight) of a sharded student's forward on input_ids,
    run inside the root's forward: the head weight is whole only there, and its gradient then
    takes FSDP's reduce-scatter."""
    return student(input_ids, head_loss=loss_fn)


def compile_blocks(model: GPTNeoX) -> GPTNeoX:
    """runtime.compile under FSDP: torch.compile each block's forward, as torchtitan does.

    FSDP's gather and reduce hooks stay outside the compiled code, and the root's forward,
    which may run the fused loss through a new function every call, stays eager.
    """
    for block in model.gpt_neox.layers:
        block.forward = torch.compile(block.forward)
    return model


# ----------------------------------------------------------------------------- loading


def rank0_builds(info: dist.DistInfo, build: Callable[[], GPTNeoX]) -> GPTNeoX | None:
    """`build()` on rank 0 only; a failure there is raised on every rank (same message)."""
    model, error = None, None
    if info.is_main:
        try:
            model = build()
        except ValueError as exc:  # CheckpointError, ConfigError: user errors, named
            error = exc
    message = dist.all_gather_object(None if error is None else str(error))[0]
    if error is not None:
        raise error
    if message is not None:
        raise ValueError(message)
    return model


def build_sharded(info: dist.DistInfo, build: Callable[[], GPTNeoX], *,
                  shard: Callable[[GPTNeoX], GPTNeoX], dtype: torch.dtype,
                  host_weights: bool = False) -> GPTNeoX:
    """A sharded GPTNeoX whose weights are rank 0's `build()` (a full model on the host).

    `shard` applies fully_shard to a meta-device copy; `host_weights` (CPU offload) keeps the
    shards in host memory while buffers (the rotary tables) go to the device.
    """
    full = rank0_builds(info, build)
    config = dist.all_gather_object(full.config if full is not None else None)[0]
    with torch.device("meta"):
        model = GPTNeoX(config).to(dtype)
    shard(model)
    model.to_empty(device="cpu" if host_weights else info.device)
    model.rotary.rebuild(info.device)
    state = full.state_dict() if full is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True,
                                                                broadcast_from_rank0=True))
    del full, state
    with torch.no_grad():
        # One token through the root's forward: FSDP sets up its root state on the first root
        # forward, and scoring calls hidden_states (not forward) before any training step.
        model(torch.zeros(1, 1, dtype=torch.long, device=info.device))
    reshard_all(model)
    return model


def reshard_all(model: torch.nn.Module | None) -> None:
    """Free every gathered FSDP group of `model` (a no-op for a model that is not sharded).

    With dist.reshard_after_forward=false a forward without a backward (the priming forward
    above, validation, the watched tasks) leaves the blocks gathered, and while a group is
    gathered its module holds the *unsharded* tensors as its parameters: an optimizer built
    then, a clip, the non-finite check or a checkpoint would see those instead of the
    sharded DTensors the optimizer steps (the run would part from the unsharded one from
    step 2, and a save would fail). A training step reshards them itself (after each group's
    backward).
    """
    if model is None:
        return
    for module in unwrap_model(model).modules():
        if isinstance(module, FSDPModule):
            module.reshard()


# ----------------------------------------------------------------------------- the step


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ that also takes FSDP's DTensor gradients: the global
    norm over every rank's shards, as a plain 0-dim tensor."""
    parameters = [p for p in parameters if p.grad is not None]
    grads = [p.grad for p in parameters]
    total = torch.nn.utils.get_total_norm(grads)
    if isinstance(total, DTensor):
        total = total.full_tensor()  # the shards' partial norms, reduced over ranks
    if math.isfinite(max_norm):  # no clipping (optim.grad_clip 0): no pass over the gradients
        torch.nn.utils.clip_grads_with_norm_(parameters, max_norm, total)
    return total


def first_non_finite(model: torch.nn.Module) -> str | None:
    """The name of the first parameter holding a NaN or inf on any rank, or None.

    Collective under FSDP (every rank checks its shards, the flags are summed); the plain
    engine.train.checkpoint.first_non_finite otherwise.
    """
    reshard_all(model)  # the sharded parameters, not gathered copies
    names, params = zip(*model.named_parameters(), strict=True)
    local = [p.to_local() if isinstance(p, DTensor) else p for p in params]
    bad = torch.stack([(~torch.isfinite(p)).any() for p in local]).to(torch.float32)
    bad = dist.all_reduce_sum(bad.to(model_device(model))).cpu()
    hits = bad.nonzero()
    return names[int(hits[0])] if len(hits) else None


@contextlib.contextmanager
def gathered_root(*models: torch.nn.Module | None) -> Iterator[None]:
    """The root group (final LayerNorm + head) of every sharded model among `models` gathered
    for the duration (FSDPModule.unshard), and freed after; models that are not sharded are
    left alone.

    For code that uses those weights outside the root's forward, without gradients: scoring
    through hidden_states + embed_out, and the frozen teacher's head in the fused loss. (The
    student's trained head is used inside its forward instead, so its gradient is reduced.)
    On exit every group of those models is freed, the blocks too: forwards without a
    backward inside leave them gathered under dist.reshard_after_forward=false (reshard_all).
    """
    present = [unwrap_model(m) for m in models if m is not None]
    sharded = [m for m in present if is_sharded(m)]
    for model in sharded:
        model.unshard()
    try:
        yield
    finally:
        for model in sharded:
            reshard_all(model)
