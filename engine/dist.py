"""torch.distributed plumbing for `torchrun ... -m engine.train`: init, rank helpers, teardown.

Everything collective goes through the helpers here so that a failure (most often: another
rank died) surfaces as one clear error naming this rank, instead of a hang or a bare
gloo/NCCL message. The process-group timeout bounds how long a collective may wait for a
dead peer; NCCL's async error handling turns that timeout into an exception.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 600


class DistributedError(RuntimeError):
    """A collective failed or timed out, usually because another rank died."""


@dataclass(frozen=True)
class DistInfo:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def resolve_device(preference: str, local_rank: int = 0) -> torch.device:
    """'auto' -> this rank's GPU when CUDA is available, else the CPU."""
    if preference not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {preference!r}")
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ValueError("device = 'cuda' but torch sees no CUDA device")
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init_distributed(device: str = "auto", timeout_s: float | None = None, *,
                     group_of_one: bool = False) -> DistInfo:
    """Join the process group described by torchrun's environment (RANK, WORLD_SIZE, ...).

    Without those variables (or with WORLD_SIZE=1) this is a single process and nothing is
    initialised, unless `group_of_one` asks for a process group of this process alone (FSDP
    needs one even on one rank). NCCL serves CUDA, gloo the CPU. The timeout
    (NEOX_DIST_TIMEOUT_S or 600 s) bounds every collective, so a dead rank makes the survivors
    fail instead of hang.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", rank)
    target = resolve_device(device, local_rank)
    if world_size <= 1:
        if group_of_one and not dist.is_initialized():
            _init_group_of_one(target)
        return DistInfo(0, 0, 1, target)
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is outside WORLD_SIZE={world_size}")
    if dist.is_initialized():
        return DistInfo(dist.get_rank(), local_rank, dist.get_world_size(), target)
    if timeout_s is None:
        timeout_s = float(os.environ.get("NEOX_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    backend = "nccl" if target.type == "cuda" else "gloo"
    if backend == "nccl":
        # Turn a stuck NCCL collective into an exception once the timeout passes.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(target)
    try:
        dist.init_process_group(
            backend=backend,
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
    except Exception as exc:
        raise DistributedError(
            f"rank {rank}/{world_size}: could not join the {backend} process group at "
            f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} ({exc})"
        ) from exc
    return DistInfo(rank, local_rank, world_size, target)


def _init_group_of_one(device: torch.device) -> None:
    """A process group holding only this process, through an in-memory store (no port)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)


def device_mesh(info: DistInfo):
    """The one-dimensional mesh of every rank on this run's device type (for fully_shard)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(info.device.type, (info.world_size,))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def _one_line(text: str, limit: int = 300) -> str:
    """A backend's message as one short line: its first line, without gloo's source path
    ("[/.../gloo/transport/tcp/pair.cc:553] Connection closed by peer ...")."""
    first = next((line.strip() for line in str(text).splitlines() if line.strip()), "")
    first = re.sub(r"^\[[^\]]*\.(cc|cpp|h|hpp):\d+\]\s*", "", first)
    return first if len(first) <= limit else first[: limit - 3] + "..."


def _collective_failed(what: str, exc: BaseException) -> DistributedError:
    return DistributedError(
        f"rank {get_rank()}/{get_world_size()}: {what} failed; another rank probably died or "
        f"timed out ({type(exc).__name__}: {_one_line(str(exc))})"
    )


# What gloo and NCCL say when a peer is gone or silent (they raise plain RuntimeErrors).
_BACKEND_MARKS = ("gloo/", "Gloo", "NCCL", "Connection closed by peer",
                  "Connection reset by peer", "Timed out waiting", "Socket Timeout",
                  "Broken pipe")


def is_collective_failure(exc: BaseException) -> bool:
    """Whether `exc` is a process group's failure (torch.distributed.DistError, or a
    RuntimeError a gloo / NCCL collective raised) rather than an error of the computation."""
    if isinstance(exc, getattr(dist, "DistError", ())):
        return True
    return isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in _BACKEND_MARKS)


@contextlib.contextmanager
def collective_errors() -> Iterator[None]:
    """Turn the failure of a collective that torch runs itself (FSDP's all-gathers and
    reduce-scatters, DDP's gradient all-reduce, a distributed checkpoint's exchanges) into
    the one-line DistributedError the helpers below raise, instead of a raw gloo / NCCL
    RuntimeError: a killed or stalled peer reads the same wherever it is noticed."""
    try:
        yield
    except DistributedError:
        raise
    except Exception as exc:
        if is_distributed() and is_collective_failure(exc):
            raise _collective_failed("a collective of FSDP, DDP or a checkpoint", exc) from exc
        raise


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over ranks in place (identity on one process) and return it."""
    if not is_distributed():
        return tensor
    try:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    except Exception as exc:
        raise _collective_failed("all_reduce", exc) from exc
    return tensor


def allreduce_sum_hook(process_group, bucket):
    """DDP communication hook: sum gradient buckets over ranks (no 1/world_size scaling).

    Right when every rank's loss is already normalised by the whole window's token count
    across ranks, as engine.train does.
    """
    tensor = bucket.buffer()
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(tensor, group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def agree(error: str | None) -> str | None:
    """The first rank's error message, on every rank (None when every rank succeeded)."""
    return next((e for e in all_gather_object(error) if e is not None), None)


def all_gather_object(obj):
    """List of `obj` from every rank, in rank order ([obj] on one process)."""
    if not is_distributed():
        return [obj]
    out = [None] * get_world_size()
    try:
        dist.all_gather_object(out, obj)
    except Exception as exc:
        raise _collective_failed("all_gather_object", exc) from exc
    return out


def barrier() -> None:
    if not is_distributed():
        return
    try:
        dist.barrier()
    except Exception as exc:
        raise _collective_failed("barrier", exc) from exc


def teardown() -> None:
    """Leave the process group (safe to call when none was joined). After a peer died the
    group may be broken: leaving it then must not hide the error being raised."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):  # a broken group: the process is ending anyway
            dist.destroy_process_group()
