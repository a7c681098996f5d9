"""Per-step numbers of a training run: the log line, metrics.jsonl, MFU, peak memory, ETA.

Only rank 0 writes. metrics.jsonl is one JSON object per line, appended and flushed per
record, so a crashed run keeps everything it logged; when a run starts (fresh or resumed) the
records after its starting step are dropped first, so the file reads as one continuous run.
metrics.jsonl is the source of truth: every record written to it also goes, unchanged, to
every sink (TensorBoard, W&B: engine/train/loggers.py), and engine/commands/plot_run.py reads it
back.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Protocol

import torch

from engine.data.atomic import open_atomic
from engine.data.progress import Progress

# Dense bf16 tensor-core peak, FLOP/s (datasheet). Matched as a substring of the CUDA device
# name, longest first. No CPU entry: a CPU's peak depends on cores and ISA, so MFU on CPU is
# reported as null rather than as a number that means nothing.
PEAK_BF16_FLOPS: dict[str, float] = {
    "RTX 3060": 25e12,
    "A100": 312e12,
    "H100": 989e12,
    "H200": 989e12,
}


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of `device`, or None when the table does not know it."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_BF16_FLOPS, key=len, reverse=True):
        if key.lower() in name.lower():
            return PEAK_BF16_FLOPS[key]
    return None


def mfu(tokens_per_second: float, flops_token: float, peak: float | None) -> float | None:
    if peak is None or tokens_per_second <= 0:
        return None
    return tokens_per_second * flops_token / peak


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated CUDA memory, or the process's peak resident set size on the CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    # ru_maxrss is KiB on Linux (bytes on macOS).
    scale = 1 if sys.platform == "darwin" else 1024
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m{secs:02d}s" if hours else f"{minutes}m{secs:02d}s"


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def format_step_line(record: dict, total_steps: int) -> str:
    """One human line per step; the full record goes to metrics.jsonl."""
    parts = [
        f"step {record['step']}/{total_steps}",
        f"loss {_fmt(record.get('loss'), '.4f')}",
        f"ce {_fmt(record.get('ce'), '.4f')}",
        f"kd {_fmt(record.get('kd'), '.4f')}",
        f"lr {_fmt(record.get('lr'), '.2e')}",
        f"gnorm {_fmt(record.get('grad_norm'), '.3f')}",
        f"tok/s {_fmt(record.get('tokens_per_s'), ',.0f')}",
        "mfu -" if record.get("mfu") is None else f"mfu {100 * record['mfu']:.1f}%",
        f"mem {record.get('peak_memory_bytes', 0) / 2**30:.2f}GiB",
        f"eta {format_duration(record.get('eta_s', float('nan')))}",
    ]
    if record.get("update_lost_frac"):  # updates rounded away (bf16-pure; 0 otherwise)
        parts.append(f"lost {100 * record['update_lost_frac']:.1f}%")
    if record.get("onpolicy_token_share") is not None:  # onpolicy.fraction > 0
        parts.append(f"on-policy {100 * record['onpolicy_token_share']:.0f}% of tokens, "
                     f"teacher nll {_fmt(record.get('onpolicy_teacher_nll'), '.3f')}, "
                     f"sampling {_fmt(record.get('onpolicy_generation_share'), '.0%')} of step")
    if record.get("skipped"):
        parts.append("SKIPPED (non-finite)")
    return " | ".join(parts)


class DamagedLines(UserWarning):
    """Lines of a metrics.jsonl that are not JSON records; the message names file and lines."""


_REPORTED: set[tuple[str, tuple[int, ...]]] = set()  # one warning per file and damage


def _parse_line(raw: bytes) -> dict | None:
    """The record of one line, or None when it is not one: not UTF-8, not JSON, not an
    object, or a "step" that is not a whole number."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    step = record.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int):
        return None
    return record


def _split_lines(path: str | os.PathLike) -> list[bytes]:
    """The whole lines of a file, without a torn last line (no newline and not a record: a
    process killed mid-write; it is work the next run redoes)."""
    lines = Path(path).read_bytes().split(b"\n")
    if lines[-1] == b"" or _parse_line(lines[-1]) is None:
        lines.pop()
    return lines


def read_numbered(path: str | os.PathLike) -> tuple[list[tuple[int, dict]], list[int]]:
    """([(line number, record)], [line numbers of damaged lines]) of a metrics.jsonl,
    numbered from 1. Lines are decoded one by one, so one bad byte costs one line."""
    records, damaged = [], []
    for number, line in enumerate(_split_lines(path), start=1):
        if not line.strip():
            continue
        record = _parse_line(line)
        if record is None:
            damaged.append(number)
        else:
            records.append((number, record))
    return records, damaged


def describe_lines(numbers: Sequence[int], limit: int = 8) -> str:
    """"line 3", "lines 3 and 9", "lines 3, 4, ... and 3 more"."""
    shown = [str(n) for n in numbers[:limit]]
    if len(numbers) == 1:
        return f"line {shown[0]}"
    if len(numbers) > limit:
        return f"lines {', '.join(shown)} and {len(numbers) - limit} more"
    return f"lines {', '.join(shown[:-1])} and {shown[-1]}"


def warn_damaged(path: str | os.PathLike, damaged: Sequence[int]) -> None:
    """Warn (DamagedLines) that `damaged` lines of `path` are skipped; once per file and
    damage, however many readers a run has."""
    if not damaged or (str(path), tuple(damaged)) in _REPORTED:
        return
    _REPORTED.add((str(path), tuple(damaged)))
    verb = "is" if len(damaged) == 1 else "are"
    warnings.warn(f"{path}: {describe_lines(damaged)} {verb} not a JSON record (damaged): "
                  "skipped, and left in the file as they are", DamagedLines, stacklevel=3)


def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a metrics.jsonl. A damaged line (a non-UTF-8 byte, broken JSON) is
    skipped with a DamagedLines warning naming the file and the line numbers: a resume and a
    plot use what is readable. A torn last line from a killed process is skipped silently."""
    numbered, damaged = read_numbered(path)
    warn_damaged(path, damaged)
    return [record for _, record in numbered]


def _numbers(prefix: str, value) -> Iterator[tuple[str, float]]:
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _numbers(f"{prefix}/{key}", item)
    elif isinstance(value, (bool, int, float)):
        yield prefix, float(value)


def record_scalars(record: dict) -> dict[str, float]:
    """The numbers of one record as {tag: value}: "<kind>/<key>", the key without its kind
    prefix ({"kind": "val", "val_ppl": 9.1} -> {"val/ppl": 9.1}), nested dicts as further
    "/" levels, booleans as 0/1; None, strings and lists are not scalars and are left out.
    A record that names what it measures ("name", e.g. a task file) gets the name as the
    second level, so two tasks scored at one step stay two curves: "task/piqa/acc"."""
    kind = str(record.get("kind", "metrics"))
    named = record.get("name")
    prefix = f"{kind}/{named}" if isinstance(named, str) and named else kind
    scalars: dict[str, float] = {}
    for key, value in record.items():
        if key in ("kind", "step"):
            continue
        name = key.removeprefix(f"{kind}_") or key
        scalars.update(_numbers(f"{prefix}/{name}", value))
    return scalars


class MetricsSink(Protocol):
    """A consumer of metrics.jsonl's records (engine/train/loggers.py has the real ones)."""

    def open(self, step: int, history: Sequence[dict]) -> None:
        """Start at `step`: forget what was logged after it; `history` is metrics.jsonl's
        records up to it (for a sink that did not see them yet)."""

    def write(self, record: dict) -> None: ...

    def flush(self) -> None: ...

    def close(self) -> None: ...


class MetricsWriter:
    """Appends records to <out_dir>/metrics.jsonl and prints step lines (rank 0 only).

    The one place a run's numbers leave the process: each record also goes to every sink
    (opened by start(), flushed per record, closed by close()). On a terminal a step bar
    (engine.data.progress) stays below the printed lines.
    """

    def __init__(self, out_dir: str | os.PathLike, *, enabled: bool, total_steps: int,
                 sinks: Sequence[MetricsSink] = ()):
        self.path = Path(out_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.total_steps = total_steps
        self.sinks = list(sinks) if enabled else []
        self.progress: Progress | None = None
        self._open_sinks: list[MetricsSink] = []

    def start(self, step: int) -> None:
        """Begin at `step`: drop the records after it, open the sinks there, and start the
        step bar (drawn on a terminal only)."""
        history = self.truncate_after(step)
        for sink in self.sinks:
            sink.open(step, history)
            self._open_sinks.append(sink)
        enabled = self.enabled and sys.stderr.isatty()
        self.progress = Progress(
            "train", total=self.total_steps, unit="steps", initial=step, enabled=enabled
        )

    def close(self) -> None:
        """End the step bar and close the sinks (each flushed), even when one of them fails."""
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        sinks, self._open_sinks = self._open_sinks, []
        errors = []
        for sink in sinks:
            try:
                sink.close()
            except Exception as error:  # closing the others matters more than the order
                errors.append(error)
        if errors:
            raise errors[0]

    def truncate_after(self, step: int) -> list[dict]:
        """Drop records logged after `step` (work a resumed run is about to redo); returns
        the records kept. Damaged lines stay where they are, unchanged (read_records names
        them): what they held, and so whether it is to be redone, is not known."""
        if not self.enabled or not self.path.exists():
            return []
        numbered, damaged = read_numbered(self.path)
        warn_damaged(self.path, damaged)
        lines = _split_lines(self.path)
        kept = [(n, r) for n, r in numbered if int(r.get("step", 0)) <= step]
        keep = sorted({n for n, _ in kept} | set(damaged))
        with open_atomic(self.path, "wb") as handle:
            handle.write(b"".join(lines[n - 1] + b"\n" for n in keep))
        return [r for _, r in kept]

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
        for sink in self._open_sinks:
            sink.write(record)
            sink.flush()

    def log_step(self, record: dict, *, print_line: bool = True) -> None:
        self.write(record)
        if self.progress is not None:
            self.progress.update(1)
        if print_line:
            self.log_text(format_step_line(record, self.total_steps))

    def log_text(self, text: str) -> None:
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.print(text)
        else:
            print(text, flush=True)
