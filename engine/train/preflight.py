"""Start-up checks of every path a run reads or writes, before anything is loaded.

A launch that would fail after hours of training (an export folder it must not replace, a
missing tokenizer, a run folder that is a file) fails here in a second, before the lock,
the models or the data, and before anything is written. The export folder gets the
strictest look: an export replaces its folder whole, so it must never be, or contain, a
folder the run reads from or writes to.
"""

from __future__ import annotations

import os
from pathlib import Path

from engine.model.hf_io import CONFIG_NAME
from engine.train.checkpoint import checkpoint_root
from engine.train.config import Config, ConfigError
from engine.train.export import replace_refusal
from engine.train.run_folder import check_run_folder
from engine.train.vocab_checks import read_run_tokenizer


def export_dir_of(config: Config) -> Path:
    """Where the run exports: run.export_dir, or <out_dir>/final."""
    return Path(config.run.export_dir or Path(config.run.out_dir) / "final")


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_writable_folder(key: str, path: Path) -> None:
    """`path` is a folder, or can be created as one (no file in the way, permission)."""
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{key}: {path} is a file, not a folder (give a folder path)")
    base = _nearest_existing(path)
    if not base.is_dir():
        raise ConfigError(f"{key}: cannot create {path}: {base} is a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}: cannot write in {base} (permission denied)")


def check_model_folder(key: str, path: str) -> None:
    folder = Path(path)
    if not folder.exists():
        raise ConfigError(f"{key}: {folder} not found (give a Hugging Face model folder)")
    if not folder.is_dir():
        raise ConfigError(f"{key}: {folder} is a file, not a model folder (give the folder "
                          f"that holds {CONFIG_NAME} and model.safetensors)")
    if not (folder / CONFIG_NAME).is_file():
        raise ConfigError(f"{key}: {folder} has no {CONFIG_NAME} (not a Hugging Face model "
                          "folder)")


def _folders_the_run_uses(config: Config) -> dict[str, Path]:
    """Folders an export must not be or contain: the run's inputs and its own folder."""
    used: dict[str, Path] = {"run.out_dir": Path(config.run.out_dir)}
    if config.student.init == "pretrained" and config.student.path:
        used["student.path"] = Path(config.student.path)
    if config.teacher.path:
        used["teacher.path"] = Path(config.teacher.path)
    if config.teacher.cache:
        used["teacher.cache"] = Path(config.teacher.cache)
    data = Path(config.data.path)
    used["data.path"] = data if data.is_dir() else data.parent
    if config.run.tokenizer:
        used["run.tokenizer's folder"] = Path(config.run.tokenizer).parent
    return used


def check_export_dir(config: Config) -> None:
    """The export may replace its folder: never one the run uses, nor anything not ours."""
    key = "run.export_dir" if config.run.export_dir else "the default export folder"
    export = export_dir_of(config).resolve()
    for name, folder in _folders_the_run_uses(config).items():
        folder = folder.resolve()
        if export == folder or export in folder.parents:
            raise ConfigError(
                f"{key}: {export} is or contains {name} ({folder}); an export replaces its "
                "folder whole, so it would delete it (choose a folder of its own)"
            )
    checkpoints = checkpoint_root(config.run.out_dir).resolve()
    if export == checkpoints or checkpoints in export.parents:
        raise ConfigError(f"{key}: {export} lies inside the run's checkpoints folder "
                          f"{checkpoints} (choose a folder of its own)")
    refusal = replace_refusal(export, run_dir=config.run.out_dir,
                              overwrite=config.run.overwrite)
    if refusal:
        raise ConfigError(f"{key}: {refusal}")
    check_writable_folder(key, export)


def check_paths(config: Config) -> None:
    """Every path of the configuration, before the run takes its lock or loads anything."""
    check_writable_folder("run.out_dir", Path(config.run.out_dir))
    check_run_folder(Path(config.run.out_dir))
    if config.student.init == "pretrained":
        check_model_folder("student.path", config.student.path)
    if config.teacher.path:
        check_model_folder("teacher.path", config.teacher.path)
    if config.teacher.cache and not Path(config.teacher.cache).is_dir():
        raise ConfigError(f"teacher.cache: {config.teacher.cache} is not a folder (give one "
                          "written by neox-distill cache-teacher)")
    if config.run.tokenizer:
        read_run_tokenizer(config.run.tokenizer)
    check_export_dir(config)
