"""Whose is run.out_dir? Checked before anything is written; the results replaced only if ours.

A run writes config.toml, config.json, metrics.jsonl, .lock, checkpoints/, final/, tensorboard/
and wandb/ into its out_dir. Each of those names would replace whatever the user kept there (a
model folder's config.json, their own config.toml), so a launch refuses, before it takes its
lock or writes anything:
  - a folder that is not empty and is no run folder (no lock record, no configuration of a
    run): e.g. a model folder, or the user's own folder of files;
  - a run folder where a name the engine writes holds something the engine did not write: a
    config.toml or config.json that is not a run's resolved configuration, a metrics.jsonl
    with no record of a run, a file where a folder belongs.
Other files a user keeps beside a run's results (notes, plots) are left alone: the engine
never writes them, so they do not block a resume.

run.overwrite=true replaces an earlier run's results only once every start-up check passed
(replace_earlier_results): its metrics.jsonl is emptied and the TensorBoard event files the
engine recorded as its own are removed, so TensorBoard no longer shows the replaced curves.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from engine.data.atomic import temporary_leftovers, write_text_atomic
from engine.data.owned_folder import shown_names
from engine.train.checkpoint import CHECKPOINTS_DIR, complete_checkpoints, done_info
from engine.train.config import RESOLVED_TOML_HEADER, Config, ConfigError, tomllib
from engine.train.lock import LOCK_NAME, is_lock_record_text
from engine.train.loggers import TENSORBOARD_DIR, WANDB_DIR, engine_event_files

METRICS_NAME = "metrics.jsonl"
CONFIG_TOML, CONFIG_JSON = "config.toml", "config.json"
RUN_FILES = (LOCK_NAME, CONFIG_TOML, CONFIG_JSON, METRICS_NAME)
RUN_FOLDERS = (CHECKPOINTS_DIR, "final", TENSORBOARD_DIR, WANDB_DIR)
_SECTIONS = frozenset(f.name for f in dataclasses.fields(Config))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8", errors="replace")
    except OSError:
        return None


def _is_resolved_config(table) -> bool:
    """Every section of a Config: the shape write_resolved writes (a hand-written training
    config names a few sections, a model's config.json none)."""
    return isinstance(table, dict) and table.keys() >= _SECTIONS


def config_toml_is_ours(path: Path) -> bool:
    text = _read_text(path)
    if text is None:
        return False
    if text.startswith(RESOLVED_TOML_HEADER):
        return True
    try:  # a run folder of an engine before the header: the full resolved configuration
        return _is_resolved_config(tomllib.loads(text))
    except tomllib.TOMLDecodeError:
        return False


def config_json_is_ours(path: Path) -> bool:
    text = _read_text(path)
    try:
        return text is not None and _is_resolved_config(json.loads(text))
    except json.JSONDecodeError:
        return False


def metrics_are_ours(path: Path) -> bool:
    """Empty, or holding at least one record of a run (a JSON object with its kind and step)."""
    text = _read_text(path)
    if text is None:
        return False
    if not text.strip():
        return True
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("kind"), str) and "step" in record:
            return True
    return False


_OWNERSHIP = {CONFIG_TOML: (config_toml_is_ours, "not the configuration a run writes"),
              CONFIG_JSON: (config_json_is_ours, "not the configuration a run writes"),
              METRICS_NAME: (metrics_are_ours, "holds no record of a run")}


def _lock_is_ours(folder: Path) -> bool:
    text = _read_text(folder / LOCK_NAME)
    return text is not None and is_lock_record_text(text)


def _misplaced(folder: Path) -> list[str]:
    """Names the engine writes that hold something the engine did not write there."""
    found = []
    for name in RUN_FILES:
        path = folder / name
        if path.exists() and not path.is_file():
            found.append(f"{name} (a folder where the run writes a file)")
        elif path.is_file() and name in _OWNERSHIP and not _OWNERSHIP[name][0](path):
            found.append(f"{name} ({_OWNERSHIP[name][1]})")
        elif name == LOCK_NAME and path.is_file() and not _lock_is_ours(folder):
            found.append(f"{name} (not a lock record of a run)")
    for name in RUN_FOLDERS:
        if (folder / name).exists() and not (folder / name).is_dir():
            found.append(f"{name} (a file where the run writes a folder)")
    return found


def _is_run_folder(folder: Path) -> bool:
    """A run has been here: its lock record, a configuration it wrote, or a checkpoint whose
    DONE marker reads as the engine's (a checkpoint copied into a new folder to continue,
    e.g. on another number of ranks)."""
    return (_lock_is_ours(folder) or ((folder / CONFIG_TOML).is_file()
            and config_toml_is_ours(folder / CONFIG_TOML))
            or any(done_info(path) is not None for _, path in complete_checkpoints(folder)))


def _own_temporaries(folder: Path) -> set[Path]:
    return {p for name in RUN_FILES for p in temporary_leftovers(folder, name)}


def check_run_folder(out_dir: Path) -> None:
    """Refuse (ConfigError) an out_dir the run would write over something not its own."""
    if not out_dir.is_dir():
        return  # absent (created by the run), or a file: check_writable_folder says so
    entries = [p for p in out_dir.iterdir() if p not in _own_temporaries(out_dir)]
    if not entries:
        return
    misplaced = _misplaced(out_dir)
    if misplaced:
        raise ConfigError(
            f"run.out_dir: {out_dir} holds {'; '.join(misplaced)}, which the run would "
            "replace; not touching it (choose an empty or new run.out_dir)")
    if not _is_run_folder(out_dir):
        raise ConfigError(
            f"run.out_dir: {out_dir} is not empty ({shown_names(p.name for p in entries)}) "
            "and is not a run folder of neox-distill; not writing into it (choose an empty "
            "or new run.out_dir)")


def replace_earlier_results(out_dir: Path) -> list[str]:
    """run.overwrite=true, after every start-up check: empty the earlier metrics.jsonl (a
    run's, check_run_folder made sure) and remove the TensorBoard event files the engine
    wrote; returns the event files left because the engine did not write them."""
    metrics = out_dir / METRICS_NAME
    if metrics.is_file():
        write_text_atomic(metrics, "")
    board = out_dir / TENSORBOARD_DIR
    if not board.is_dir():
        return []
    ours = engine_event_files(board)
    for path in ours:
        path.unlink(missing_ok=True)
    return sorted(p.name for p in board.glob("events.out.tfevents.*") if p not in ours)
