"""What every multi-process test needs to pass on a loaded machine, every time.

- Gloo on the loopback interface only: by default it resolves the host name and may pick
  another interface, whose reachability is not the test's business.
- A barrier before a process group is destroyed: a rank that leaves while its peer is still
  finishing the connection handshake makes the peer fail with "connectFullMesh ...
  Connection closed by peer" (the flaky failure of issue 10); after a barrier both have
  finished connecting.
- Rendezvous through a file (file://) or torchrun --standalone, which picks and keeps its
  own free port, rather than a port chosen beforehand that another process may take.
"""

from __future__ import annotations

import multiprocessing
import socket
import sys

import torch.distributed as dist

LOOPBACK_ENV = {
    "GLOO_SOCKET_IFNAME": "lo0" if sys.platform == "darwin" else "lo",
    "MASTER_ADDR": "127.0.0.1",
}


def free_port() -> int:
    """A port free at this moment (only for a test that must pass MASTER_PORT itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave_process_group() -> None:
    """Barrier, then destroy: no rank leaves before every rank is done."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_ranks(target, *args, world_size: int = 2, timeout: float = 300.0) -> list[int | None]:
    """Run target(rank, *args) in `world_size` spawned processes; their exit codes, None for
    a process still running after `timeout` seconds (killed then: a hang, not a pass)."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, *args)) for rank in range(world_size)]
    for proc in procs:
        proc.start()
    codes: list[int | None] = []
    for proc in procs:
        proc.join(timeout=timeout)
        if proc.is_alive():
            proc.kill()
            proc.join()
            codes.append(None)
        else:
            codes.append(proc.exitcode)
    return codes
