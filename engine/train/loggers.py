"""TensorBoard and Weights & Biases: two more consumers of the records in metrics.jsonl.

    [log]
    tensorboard = true     # <out_dir>/tensorboard, `tensorboard --logdir <out_dir>/tensorboard`
    wandb = true           # a W&B run (WANDB_MODE=offline: files under <out_dir>/wandb)

metrics.jsonl stays the source of truth: engine.metrics.MetricsWriter hands every record it
writes there to each sink here, unchanged, so a new kind of record (a task evaluation, say)
reaches both without touching this file. Rank 0 only. Each sink uses its own library (no
home-made event files); asking for one that is not installed is a configuration error,
raised before any model is loaded.

A resumed run continues the same curves: metrics.jsonl drops the records after the resume
step, TensorBoard is told to purge them too (SummaryWriter's purge_step), and W&B continues
the same run id (its steps only move forward; the redone steps are bit-exact repeats).
"""

from __future__ import annotations

import json
import math
import secrets
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.data.atomic import write_json_atomic, write_text_atomic
from engine.metrics import MetricsSink, record_scalars
from engine.train.config import Config, ConfigError

TENSORBOARD_DIR = "tensorboard"
WANDB_DIR = "wandb"
WANDB_RUN_ID = "neox-distill-run-id"  # inside WANDB_DIR: the run a resumed session continues
# Inside TENSORBOARD_DIR: the event files the engine wrote there (run.overwrite removes those,
# and only those, so TensorBoard stops showing a replaced run).
EVENTS_RECORD = "neox_distill_events.json"
EVENTS_PATTERN = "events.out.tfevents.*"


def engine_event_files(folder: Path) -> list[Path]:
    """The event files in `folder` that its EVENTS_RECORD lists (the engine's), still there."""
    try:
        names = json.loads((folder / EVENTS_RECORD).read_text(encoding="utf-8"))["files"]
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
        return []
    if not isinstance(names, list):
        return []
    found = [folder / n for n in names if isinstance(n, str) and Path(n).name == n]
    return [p for p in found if p.match(EVENTS_PATTERN) and p.is_file()]


def _record_event_files(folder: Path, new: set[Path]) -> None:
    names = {p.name for p in engine_event_files(folder)} | {p.name for p in new}
    write_json_atomic(folder / EVENTS_RECORD, {"files": sorted(names)})


def _missing(key: str, package: str, extra: str) -> ConfigError:
    return ConfigError(
        f"{key} = true needs the {package} package, which is not installed: "
        f"pip install '.[{extra}]' (or pip install {package}), or set {key} = false"
    )


class TensorBoardSink:
    """Every scalar of every record as a TensorBoard scalar at the record's step."""

    def __init__(self, folder: str | Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise _missing("log.tensorboard", "tensorboard", "tensorboard") from None
        self._summary_writer = SummaryWriter
        self.folder = Path(folder)
        self.writer = None

    def open(self, step: int, history: Sequence[dict]) -> None:
        """Continue the event files at `step`: events after it are purged (the resumed run
        redoes them). A first opening replays metrics.jsonl's earlier records instead."""
        existing = set(self.folder.glob(EVENTS_PATTERN)) if self.folder.is_dir() else set()
        seen_before = bool(existing)
        purge_step = step + 1 if seen_before else None
        self.writer = self._summary_writer(str(self.folder), purge_step=purge_step)
        self.writer.flush()  # the event file exists from here on
        _record_event_files(self.folder, set(self.folder.glob(EVENTS_PATTERN)) - existing)
        if not seen_before:
            for record in history:
                self.write(record)

    def write(self, record: dict) -> None:
        step = int(record.get("step", 0))
        for tag, value in record_scalars(record).items():
            self.writer.add_scalar(tag, value, global_step=step)

    def flush(self) -> None:
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbSink:
    """The same scalars as a Weights & Biases run, through the wandb library."""

    def __init__(self, out_dir: str | Path, project: str, run_config: dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise _missing("log.wandb", "wandb", "wandb") from None
        self._wandb = wandb
        self.folder = Path(out_dir) / WANDB_DIR
        self.project, self.run_config = project, run_config
        self.run = None

    def open(self, step: int, history: Sequence[dict]) -> None:
        """A resumed session (step > 0) continues the run id this run folder recorded; a fresh
        one starts a new W&B run and replays metrics.jsonl's earlier records into it."""
        id_file = self.folder / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if step > 0 and id_file.is_file() else ""
        fresh = not run_id
        if fresh:
            run_id = secrets.token_hex(4)  # W&B's own ids are 8 lowercase characters too
            write_text_atomic(id_file, run_id + "\n")
        self.run = self._wandb.init(
            project=self.project,
            id=run_id,
            resume="allow",
            dir=str(self.folder.parent),
            name=self.folder.parent.resolve().name,
            config=self.run_config,
        )
        if fresh:
            for record in history:
                self.write(record)

    def write(self, record: dict) -> None:
        # W&B's charts cannot show NaN or inf; a non-finite step stays in metrics.jsonl.
        scalars = {k: v for k, v in record_scalars(record).items() if math.isfinite(v)}
        self.run.log(scalars, step=int(record.get("step", 0)))

    def flush(self) -> None:
        """wandb streams from its own process; nothing to push by hand."""

    def close(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None


def build_sinks(config: Config, *, enabled: bool = True) -> list[MetricsSink]:
    """The sinks [log] asks for (none on ranks other than 0: `enabled` False)."""
    if not enabled:
        return []
    out_dir = Path(config.run.out_dir)
    sinks: list[MetricsSink] = []
    if config.log.tensorboard:
        sinks.append(TensorBoardSink(out_dir / TENSORBOARD_DIR))
    if config.log.wandb:
        sinks.append(WandbSink(out_dir, config.log.wandb_project, config.to_dict()))
    return sinks
