"""Failpoints: every fault-injection hook the tests use, named and documented in one place.

Why: some promises can only be tested by killing or signalling the program at an exact moment
(in the middle of a checkpoint save, after the last save, inside one tokenizer worker). A test
cannot hit that moment from outside, so the product code calls a named failpoint there, and
the test arms it by setting the failpoint's environment variable in the child process it
starts (`arm`). Unarmed, a failpoint does nothing but one environment lookup; no other file
of the engine reads an environment variable to inject a fault (tests/data/test_failpoints.py
scans for that). The engine's kernels never call a failpoint.

The failpoints (name: variable = value form; what it does; where it fires):

- ``checkpoint.save``: NEOX_DISTILL_TEST_SAVE_PAUSE = "STEP:SECONDS". The save of checkpoint
  STEP writes a PAUSED file into its temporary folder and sleeps SECONDS between its writes,
  so a test can SIGKILL or signal the process mid-save. Fires in engine/train/checkpoint.py
  (after the weights, before the optimizer state) and engine/train/sharded_checkpoint.py
  (rank 0, after every rank wrote its shards).
- ``train.finish``: NEOX_DISTILL_TEST_FINISH_PAUSE = "SECONDS". Prints "pausing before the
  final validation" and waits SECONDS, or until SIGTERM/SIGINT comes, so a test can signal a
  run at its very end. Fires in engine/train/loop.py after the final checkpoint.
- ``preprocess.worker``: DATA_PREPROCESS_TEST_WORKER_DIES_ON = "TEXT". A tokenizer worker
  given a batch holding a document whose text is exactly TEXT kills itself with SIGKILL, as
  the system does to a worker out of memory. Fires in engine/data/preprocess.py.
- ``teacher_cache.batches``: NEOX_DISTILL_TEST_CACHE_DIE_AFTER_BATCHES = "N". The teacher
  cache build kills itself with SIGKILL once N batches are written (before their
  checkpoint), as a preempted machine would. Fires in engine/data/teacher_cache_job.py.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["FAILPOINTS", "Failpoint", "arm", "kill_after", "kill_on", "pause"]


@dataclass(frozen=True)
class Failpoint:
    """One hook: its variable, the function that fires it, and the moment it pauses at."""

    variable: str
    action: str  # "pause", "kill_on" or "kill_after": the function product code calls
    moment: str  # printed by a pause; documentation for the others
    files: tuple[str, ...]  # where it fires (the test checks each calls it by name)


FAILPOINTS: dict[str, Failpoint] = {
    "checkpoint.save": Failpoint(
        "NEOX_DISTILL_TEST_SAVE_PAUSE", "pause", "in the middle of a checkpoint save",
        ("engine/train/checkpoint.py", "engine/train/sharded_checkpoint.py")),
    "train.finish": Failpoint(
        "NEOX_DISTILL_TEST_FINISH_PAUSE", "pause", "before the final validation",
        ("engine/train/loop.py",)),
    "preprocess.worker": Failpoint(
        "DATA_PREPROCESS_TEST_WORKER_DIES_ON", "kill_on", "when a worker gets the text",
        ("engine/data/preprocess.py",)),
    "teacher_cache.batches": Failpoint(
        "NEOX_DISTILL_TEST_CACHE_DIE_AFTER_BATCHES", "kill_after",
        "after N written batches", ("engine/data/teacher_cache_job.py",)),
}


def arm(name: str, value: str) -> dict[str, str]:
    """The environment entry that arms failpoint `name` with `value` in a child process."""
    return {FAILPOINTS[name].variable: str(value)}


def _armed(name: str, action: str) -> str | None:
    """The value failpoint `name` is armed with, or None; a misused name is a bug here."""
    point = FAILPOINTS[name]
    if point.action != action:
        raise ValueError(f"failpoint {name} is fired by {point.action}(), not {action}()")
    return os.environ.get(point.variable) or None


def pause(name: str, *, step: int | None = None, folder: Path | None = None,
          until: Callable[[], bool] | None = None) -> None:
    """Sleep as failpoint `name` says ("SECONDS", or "STEP:SECONDS" to pause only at `step`).

    With `folder`, a PAUSED file there shows a test that the pause has begun (it is removed
    when the pause ends); `until` ends the wait early once it returns True."""
    value = _armed(name, "pause")
    if value is None:
        return
    target, _, seconds = value.rpartition(":")
    if target and int(target) != step:
        return
    marker = None if folder is None else Path(folder) / "PAUSED"
    if marker is not None:
        try:  # exclusive: the file removed below is the one this call created
            with open(marker, "x", encoding="utf-8") as handle:
                handle.write(f"paused by failpoint {name}\n")
        except FileExistsError:
            marker = None
    print(f"pausing {FAILPOINTS[name].moment} for {seconds} s (failpoint {name})", flush=True)
    deadline = time.monotonic() + float(seconds)
    while time.monotonic() < deadline and not (until is not None and until()):
        time.sleep(0.05)
    if marker is not None:
        marker.unlink(missing_ok=True)


def kill_on(name: str, texts: Iterable[str]) -> None:
    """SIGKILL this process when the text failpoint `name` is armed with is among `texts`."""
    value = _armed(name, "kill_on")
    if value is not None and value in texts:
        os.kill(os.getpid(), signal.SIGKILL)


def kill_after(name: str, count: int) -> None:
    """SIGKILL this process once `count` reaches the number failpoint `name` is armed with."""
    value = _armed(name, "kill_after")
    if value is not None and int(value) > 0 and count >= int(value):
        os.kill(os.getpid(), signal.SIGKILL)
