"""What a run may touch: the export folder, an earlier run's results, a second run, the
run's own record, and every path found wrong at start-up rather than after training.

Issue 10, items 1, 5, 8, 10, 14 and the minor points; each test failed on the code before.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.data import failpoints
from engine.model import load_pretrained
from engine.train import checkpoint as ckpt
from engine.train.__main__ import main as train_main
from tests.engine.test_checkpoint import paused_save, start_training, wait_for
from tests.engine.test_train import base_overrides, train_records

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def finished_run(assets, tmp_path_factory) -> Path:
    """A completed 1-step run: checkpoints, metrics, config and final/ in place."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert train_main(base_overrides(assets, out, run__steps=1)) == 0
    return out


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file below `folder` (the lock file aside) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def fails_at_start_up(overrides, capsys, code=2) -> str:
    assert train_main(overrides) == code
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Error:" not in err and "Traceback" not in err  # no Python class names
    return err


# --------------------------------------------------------------------------------------
# Item 1: the export never replaces a folder the engine did not export
# --------------------------------------------------------------------------------------


def test_export_into_the_run_folder_is_refused_before_training(assets, finished_run, capsys):
    before = snapshot(finished_run)
    err = fails_at_start_up(base_overrides(assets, finished_run, run__steps=2,
                                           run__export_dir=finished_run), capsys)
    assert "is or contains run.out_dir" in err
    assert snapshot(finished_run) == before  # checkpoints, metrics, config: all there


def test_export_into_a_models_own_folder_is_refused(assets, tmp_path, capsys):
    student = tmp_path / "student"
    shutil.copytree(assets["student"], student)
    (student / "tokenizer.json").write_text('{"mine": true}')
    (student / "README.md").write_text("my model\n")
    before = snapshot(student)
    for key, folder in (("student.path", student), ("teacher.path", assets["teacher"]),
                        ("data.path", assets["data"]), ("teacher.path", assets["data"].parent)):
        err = fails_at_start_up(base_overrides(assets, tmp_path / "run", student__path=student,
                                               run__export_dir=folder), capsys)
        assert f"is or contains {key}" in err
    assert snapshot(student) == before
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # refused before any step


def test_export_refuses_a_folder_it_did_not_export(assets, tmp_path, capsys):
    foreign = tmp_path / "someone-elses-model"
    shutil.copytree(assets["student"], foreign, ignore=shutil.ignore_patterns(
        "neox_distill_export.json"))  # a model folder (config.json), not ours
    before = snapshot(foreign)
    err = fails_at_start_up(base_overrides(assets, tmp_path / "run", run__export_dir=foreign),
                            capsys)
    assert "was not exported by neox-distill" in err
    assert snapshot(foreign) == before and not (tmp_path / "run" / "metrics.jsonl").exists()
    # An export of ours is replaced (another run's with run.overwrite), and says where it
    # came from.
    ours = tmp_path / "ours"
    for steps in (1, 2):
        out = tmp_path / f"run-{steps}"
        assert train_main(base_overrides(assets, out, run__steps=steps, run__export_dir=ours,
                                         run__overwrite=str(steps > 1).lower())) == 0
        marker = json.loads((ours / "neox_distill_export.json").read_text())
        assert marker["step"] == steps and marker["run_dir"] == str(out)
    assert load_pretrained(ours).config.vocab_size > 0
    # A file added to our export since is not ours: the export is refused, nothing is lost.
    (ours / "my-eval.json").write_text("{}")
    before = snapshot(ours)
    err = fails_at_start_up(base_overrides(assets, tmp_path / "run-3", run__export_dir=ours),
                            capsys)
    assert "my-eval.json (added)" in err and snapshot(ours) == before


# --------------------------------------------------------------------------------------
# Item 5: an earlier run's results are not silently replaced
# --------------------------------------------------------------------------------------


def test_new_run_refuses_an_earlier_runs_results_without_overwrite(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_overrides(assets, out, run__steps=1)) == 0
    shutil.rmtree(out / "checkpoints")  # nothing left to resume from
    before = snapshot(out)
    err = fails_at_start_up(base_overrides(assets, out, run__steps=2), capsys)
    assert "holds an earlier run" in err and "run.overwrite=true" in err
    assert snapshot(out) == before
    assert train_main(base_overrides(assets, out, run__steps=2, run__overwrite="true")) == 0
    assert [r["step"] for r in train_records(out)] == [1, 2]  # a new record, not appended
    marker = json.loads((out / "final" / "neox_distill_export.json").read_text())
    assert marker["step"] == 2


# --------------------------------------------------------------------------------------
# Item 8: one run per folder
# --------------------------------------------------------------------------------------


def test_a_second_run_on_the_same_folder_is_refused_at_once(assets, tmp_path, capsys):
    out = tmp_path / "run"
    overrides = base_overrides(assets, out, run__save_every=2)
    log = tmp_path / "first.txt"
    first = start_training(overrides, log, **failpoints.arm("checkpoint.save", "2:6"))
    try:
        wait_for(lambda: paused_save(out), first, log)
        started = time.monotonic()
        err = fails_at_start_up(overrides, capsys, code=1)
        assert time.monotonic() - started < 20
        assert f"in use by another run (pid {first.pid} on host" in err
        assert first.wait(timeout=120) == 0, log.read_text()
    finally:
        first.kill()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "val"] == [4]


def test_the_lock_dies_with_its_holder(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from engine.train.lock import RunLock; "
         "RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)",
         str(tmp_path)],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline() == "locked\n"
        from engine.train.lock import RunLock, RunLocked

        with pytest.raises(RunLocked, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
        with RunLock(tmp_path):  # the kernel released it: no stale lock after a crash
            pass
    finally:
        holder.kill()
        holder.stdout.close()


def test_a_lock_file_that_is_not_ours_is_never_overwritten(tmp_path):
    from engine.train.lock import RunLock, RunLocked

    (tmp_path / ".lock").write_text("my notes, unluckily named")
    with pytest.raises(RunLocked, match="not a neox-distill lock record"):
        RunLock(tmp_path).acquire()
    assert (tmp_path / ".lock").read_text() == "my notes, unluckily named"
    (tmp_path / ".lock").write_text("")  # empty, or a record a run wrote: ours to reuse
    with RunLock(tmp_path):
        pass
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()


# --------------------------------------------------------------------------------------
# Item 10: a failed launch leaves the run's record alone
# --------------------------------------------------------------------------------------


def test_a_failed_launch_does_not_rewrite_the_config(assets, finished_run, capsys):
    before = snapshot(finished_run)
    err = fails_at_start_up(base_overrides(assets, finished_run, run__steps=2,
                                           batch__seq_len=128), capsys)
    assert "max_positions" in err
    assert snapshot(finished_run) == before


# --------------------------------------------------------------------------------------
# Item 14 and the minor points: wrong paths at start-up, clear words, one style
# --------------------------------------------------------------------------------------


def test_wrong_paths_are_found_at_start_up(assets, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder\n")
    out = tmp_path / "run"
    cases = [
        (dict(run__out_dir=a_file), "run.out_dir: " + str(a_file) + " is a file, not a folder"),
        (dict(run__export_dir=a_file), "exists and is not a folder"),
        (dict(run__export_dir=a_file / "sub"), f"{a_file} is a file, not a folder"),
        (dict(run__tokenizer=tmp_path / "missing.json"), "run.tokenizer: "),
        (dict(run__tokenizer=a_file), "run.tokenizer: "),
        (dict(student__path=a_file), f"student.path: {a_file} is a file, not a model folder"),
        (dict(teacher__path=tmp_path / "nope"), "teacher.path: "),
    ]
    for extra, fragment in cases:
        err = fails_at_start_up(base_overrides(assets, out, **extra), capsys)
        assert fragment in err, (extra, err)
    assert not out.exists()  # nothing was created or written


def test_steps_below_the_checkpoint_are_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_overrides(assets, out, run__steps=2)) == 0
    before = snapshot(out)
    err = fails_at_start_up(base_overrides(assets, out, run__steps=1), capsys)
    assert "run.steps=1 is below step 2 of the checkpoint" in err
    assert snapshot(out) == before


def test_rerunning_a_completed_run_logs_no_second_validation(assets, tmp_path):
    out = tmp_path / "run"
    for _ in range(2):
        assert train_main(base_overrides(assets, out, run__steps=2)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [(r["kind"], r["step"]) for r in records] == [("train", 1), ("train", 2), ("val", 2)]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_checkpoints_and_exports_follow_the_umask(assets, tmp_path, umask):
    out = tmp_path / "run"
    previous = os.umask(umask)
    try:
        assert train_main(base_overrides(assets, out, run__steps=1)) == 0
    finally:
        os.umask(previous)
    for folder in (ckpt.latest_checkpoint(out), out / "final"):
        for path in [folder, *folder.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            want = (0o777 if path.is_dir() else 0o666) & ~umask
            assert mode == want, (str(path), oct(mode), oct(want))
