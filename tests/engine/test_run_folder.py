"""run.out_dir and run.overwrite never replace what the engine did not write, and a refused
launch writes nothing (issue 22, items A.1, A.5 and B.13; each test failed before the fix).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from engine.train.__main__ import main as train_main
from tests.engine.test_run_safety import fails_at_start_up
from tests.engine.test_train import base_overrides, train_records


def every_file(folder: Path) -> dict[str, bytes]:
    """Every file below `folder`, the lock file included, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def earlier_run(assets, tmp_path) -> Path:
    """A finished 1-step run whose checkpoints are gone: results a new start must replace."""
    out = tmp_path / "run"
    assert train_main(base_overrides(assets, out, run__steps=1, log__tensorboard="true")) == 0
    shutil.rmtree(out / "checkpoints")
    return out


# --------------------------------------------------------------------------------------
# A.1: an out_dir holding files the engine did not write is refused before anything
# --------------------------------------------------------------------------------------


def test_a_checkpoint_copied_into_a_new_folder_continues(assets, tmp_path):
    """A folder holding only a run's checkpoint (copied to continue elsewhere, or on another
    number of ranks) is a run folder: the run resumes from it."""
    first = tmp_path / "first"
    assert train_main(base_overrides(assets, first, run__steps=1)) == 0
    moved = tmp_path / "moved"
    shutil.copytree(first / "checkpoints", moved / "checkpoints")
    assert train_main(base_overrides(assets, moved, run__steps=2)) == 0
    assert [r["step"] for r in train_records(moved)] == [2]


def test_a_model_folder_as_out_dir_is_refused(assets, tmp_path, capsys):
    teacher = assets["teacher"]  # the run's own teacher.path
    before = every_file(teacher)
    err = fails_at_start_up(base_overrides(assets, teacher, run__steps=1), capsys)
    assert f"run.out_dir: {teacher}" in err and "config.json" in err
    assert every_file(teacher) == before  # its config.json still the model's, no .lock


def test_a_users_config_toml_in_out_dir_is_never_replaced(assets, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.toml").write_text("[run]\nsteps = 1\n")  # the user's own training config
    err = fails_at_start_up(base_overrides(assets, out, run__steps=1), capsys)
    assert "config.toml (not the configuration a run writes)" in err
    assert every_file(out) == {"config.toml": b"[run]\nsteps = 1\n"}
    # A user's file alone in a new folder: not a run folder, nothing written beside it.
    (out / "config.toml").unlink()
    (out / "notes.txt").write_text("mine")
    err = fails_at_start_up(base_overrides(assets, out, run__steps=1), capsys)
    assert "not a run folder of neox-distill" in err and "notes.txt" in err
    assert every_file(out) == {"notes.txt": b"mine"}


def test_a_run_folder_whose_config_was_replaced_by_the_user_is_refused(earlier_run, assets,
                                                                         capsys):
    (earlier_run / "config.toml").write_text("[run]\nsteps = 7\n")
    before = every_file(earlier_run)
    err = fails_at_start_up(base_overrides(assets, earlier_run, run__steps=1,
                                           run__overwrite="true"), capsys)
    assert "config.toml (not the configuration a run writes)" in err
    assert every_file(earlier_run) == before


# --------------------------------------------------------------------------------------
# A.5: run.overwrite replaces only after every check, and only a run's metrics.jsonl
# --------------------------------------------------------------------------------------


def test_a_refused_overwrite_keeps_the_earlier_metrics(earlier_run, assets, capsys):
    before = every_file(earlier_run)
    metrics = (earlier_run / "metrics.jsonl").read_bytes()
    assert metrics
    err = fails_at_start_up(base_overrides(assets, earlier_run, run__steps=2,
                                           run__overwrite="true", batch__seq_len=128), capsys)
    assert "max_positions" in err  # refused after the run folder checks, in the Trainer
    assert (earlier_run / "metrics.jsonl").read_bytes() == metrics
    assert every_file(earlier_run) == before  # metrics.jsonl not emptied, .lock unchanged


def test_overwrite_never_truncates_a_metrics_file_of_someone_else(assets, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text("my measurements\n")
    err = fails_at_start_up(base_overrides(assets, out, run__steps=1, run__overwrite="true"),
                            capsys)
    assert "metrics.jsonl (holds no record of a run)" in err
    assert every_file(out) == {"metrics.jsonl": b"my measurements\n"}


def test_a_refused_launch_creates_neither_out_dir_nor_lock(assets, tmp_path, capsys):
    out = tmp_path / "new" / "run"
    fails_at_start_up(base_overrides(assets, out, batch__seq_len=128), capsys)
    assert not (tmp_path / "new").exists()
    existing = tmp_path / "empty"
    existing.mkdir()
    fails_at_start_up(base_overrides(assets, existing, batch__seq_len=128), capsys)
    assert existing.is_dir() and not any(existing.iterdir())
    assert train_main(base_overrides(assets, existing, run__steps=1)) == 0  # usable after


# --------------------------------------------------------------------------------------
# B.13: after run.overwrite, TensorBoard shows only the new run
# --------------------------------------------------------------------------------------


def test_overwrite_removes_the_replaced_runs_event_files_only(earlier_run, assets):
    board = earlier_run / "tensorboard"
    old = sorted(board.glob("events.out.tfevents.*"))
    assert old
    mine = board / "events.out.tfevents.0.mine"
    mine.write_bytes(b"a user's own event file")
    assert train_main(base_overrides(assets, earlier_run, run__steps=2, run__overwrite="true",
                                     log__tensorboard="true")) == 0
    now = sorted(board.glob("events.out.tfevents.*"))
    assert not set(old) & set(now)  # the replaced run's curves are gone
    assert mine.read_bytes() == b"a user's own event file"
    assert len(now) == 2 and [r["step"] for r in train_records(earlier_run)] == [1, 2]
    listed = json.loads((board / "neox_distill_events.json").read_text())["files"]
    assert mine.name not in listed and len(listed) == 1


# --------------------------------------------------------------------------------------
# A.4: an export is replaced only while every file is as the engine wrote it, by its run
# --------------------------------------------------------------------------------------


def test_an_edited_export_and_another_runs_export_are_never_replaced(assets, tmp_path,
                                                                      capsys):
    export = tmp_path / "export"
    first = tmp_path / "first"
    assert train_main(base_overrides(assets, first, run__steps=1, run__export_dir=export)) == 0
    marker = json.loads((export / "neox_distill_export.json").read_text())
    assert marker["run_dir"] == str(first) and len(marker["files"]["README.md"]["sha256"]) == 64
    # Another run folder, the same export_dir: refused without run.overwrite.
    before = every_file(export)
    err = fails_at_start_up(base_overrides(assets, tmp_path / "second", run__steps=1,
                                           run__export_dir=export), capsys)
    assert f"the export of another run ({first})" in err and "run.overwrite=true" in err
    assert every_file(export) == before and not (tmp_path / "second").exists()
    # The same run, resumed to a later step, replaces its own export...
    assert train_main(base_overrides(assets, first, run__steps=2, run__export_dir=export)) == 0
    assert json.loads((export / "neox_distill_export.json").read_text())["step"] == 2
    # ...but not once a file in it was edited (same size: only the sha256 tells).
    card = export / "README.md"
    text = card.read_text()
    card.write_text(text.replace("a", "b", 1))
    before = every_file(export)
    err = fails_at_start_up(base_overrides(assets, first, run__steps=3, run__export_dir=export),
                            capsys)
    assert "README.md (edited)" in err
    assert every_file(export) == before
    # With run.overwrite, another run replaces an unedited export of ours.
    card.write_text(text)
    os.utime(card, ns=(0, 0))  # a new modification time: the sha256 is checked, and matches
    assert train_main(base_overrides(assets, tmp_path / "third", run__steps=1,
                                     run__export_dir=export, run__overwrite="true")) == 0
    marker = json.loads((export / "neox_distill_export.json").read_text())
    assert marker["run_dir"] == str(tmp_path / "third")
