"""Broken state never spreads: non-finite training, damaged or foreign checkpoints, full disks.

Issue 10, items 4, 13, 14 (disk full) and the security point; each test failed on the code
before: it saved and pruned from non-finite states, exported them with exit 0, resumed
silently from damaged files, unpickled whatever it found, and gave tracebacks.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
import warnings
from pathlib import Path

import pytest
import torch

from engine.metrics import DamagedLines, read_numbered
from engine.train import checkpoint as ckpt
from engine.train.__main__ import main as train_main
from engine.train.loop import run
from tests.engine.test_train import assert_same_run, base_overrides, make_config, poison_steps

REPO = Path(__file__).resolve().parents[2]


def quiet_main(overrides) -> int:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return train_main(overrides)


def one_error_line(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines()
           if not line.startswith("warning: ")]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0] and not re.search(r"\b[A-Z]\w+Error\b", err[0])
    return err[0]


def steps_of(out: Path) -> list[int]:
    return [step for step, _ in ckpt.complete_checkpoints(out)]


# --------------------------------------------------------------------------------------
# Item 4: non-finite training
# --------------------------------------------------------------------------------------


def test_a_diverging_run_names_no_checkpoint_whose_next_step_failed(assets, tmp_path,
                                                                    capsys):
    """The issue's own command: lr 1e30, a checkpoint per step. Step 1's update is finite but
    its weights make step 2 non-finite, so step 1's checkpoint is not good (issue 22, B.10):
    it is not named, and nothing is saved during the streak of skipped steps."""
    out = tmp_path / "run"
    code = quiet_main(base_overrides(assets, out, optim__lr=1e30, optim__warmup_steps=0,
                                     run__steps=3, run__save_every=1, run__keep_last=1))
    assert code == 1
    err = one_error_line(capsys)
    assert "non-finite" in err and "nothing exported" in err
    assert "No checkpoint is known good" in err and "step-0000" not in err
    assert not (out / "final").exists()
    assert steps_of(out) == [1]  # steps 2 and 3 were skipped: no copies of step 1's weights
    # The proof that step 1 is not good: resumed with a sane lr, its next step is non-finite.
    step1 = ckpt.checkpoint_root(out) / "step-00000001"
    code = quiet_main(base_overrides(assets, out, optim__lr=1e-4, optim__warmup_steps=0,
                                     run__steps=2, run__resume=step1))
    assert code == 1 and "non-finite" in one_error_line(capsys)


def test_the_last_good_checkpoint_is_one_whose_next_step_was_finite(assets, tmp_path,
                                                                    monkeypatch, capsys):
    poison_steps(monkeypatch, {3, 4, 5})
    out = tmp_path / "run"
    code = quiet_main(base_overrides(assets, out, run__steps=6, run__save_every=1,
                                     run__keep_last=1, run__max_bad_steps=3))
    assert code == 1
    err = one_error_line(capsys)
    assert "3 non-finite steps in a row" in err
    # Step 2's checkpoint fed the failing step 3; step 1's fed the finite step 2.
    good = ckpt.checkpoint_root(out) / "step-00000001"
    assert f"Last good checkpoint (the step after it was finite): {good};" in err
    # keep_last 1 kept step 2 and, beside it, the last good one; nothing saved at 3 and 4.
    assert steps_of(out) == [1, 2]


def test_the_last_good_checkpoint_survives_a_resume(assets, tmp_path, monkeypatch, capsys):
    """Which steps were finite is read back from metrics.jsonl on resume."""
    out = tmp_path / "run"
    assert quiet_main(base_overrides(assets, out, run__steps=2, run__save_every=1,
                                     run__keep_last=1)) == 0
    capsys.readouterr()
    poison_steps(monkeypatch, {1, 2})  # counted from the resumed run's first step: 3 and 4
    code = quiet_main(base_overrides(assets, out, run__steps=6, run__save_every=1,
                                     run__keep_last=1, run__max_bad_steps=2))
    assert code == 1
    good = ckpt.checkpoint_root(out) / "step-00000001"  # step 2 was finite (the first run)
    assert f"Last good checkpoint (the step after it was finite): {good};" in \
        one_error_line(capsys)
    assert steps_of(out) == [1, 2]


@pytest.mark.parametrize("metric", ["val_kd", "val_teacher_ce", "val_ppl"])
def test_a_non_finite_held_out_metric_fails_the_run_and_publishes_nothing(
        assets, tmp_path, monkeypatch, capsys, metric):
    """Issue 22, B.12: a NaN held-out KD (finite val_ce) was published in the model card as
    `nan` with exit 0. Every metric the card reports is checked before the export."""
    from engine.train import loop

    real = loop.heldout_metrics

    def broken(*args, **kwargs):
        metrics = real(*args, **kwargs)
        metrics[metric.removeprefix("val_")] = float("nan")
        return metrics

    monkeypatch.setattr(loop, "heldout_metrics", broken)
    out = tmp_path / "run"
    assert quiet_main(base_overrides(assets, out, run__steps=2)) == 1
    err = one_error_line(capsys)
    assert f"the final validation gave {metric} nan" in err and "nothing exported" in err
    assert not (out / "final").exists()


def test_weights_that_are_not_finite_are_never_saved(tmp_path):
    from tests.engine.test_checkpoint import tiny_student

    model = tiny_student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with torch.no_grad():
        model.embed_out.weight[3, 1] = float("inf")
    with pytest.raises(ValueError, match=r"embed_out\.weight is not finite; not saving"):
        ckpt.save_checkpoint(tmp_path, 1, student=model, optimizer=optimizer,
                             trainer_state={"loader_states": [{}], "rng_states": [{}]},
                             config={}, keep_last=1)
    assert not ckpt.checkpoint_root(tmp_path).exists() or not any(
        ckpt.checkpoint_root(tmp_path).iterdir())


# --------------------------------------------------------------------------------------
# Items 4 and 13: damaged checkpoints are found, named, and skipped by resume=auto
# --------------------------------------------------------------------------------------


def corrupt_tail(path: Path) -> None:
    """Overwrite the last bytes of a file (tensor data: the header stays readable)."""
    data = bytearray(path.read_bytes())
    data[-16:] = b"\xff" * 16  # NaNs in float32
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["weights", "optimizer", "trainer_state"])
def test_resume_falls_back_to_the_newest_intact_checkpoint(assets, tmp_path, straight_run,
                                                           damage, capsys):
    out = tmp_path / "run"
    quiet_main(base_overrides(assets, out, run__steps=4, run__save_every=2))
    capsys.readouterr()
    newest = ckpt.latest_checkpoint(out)
    shutil.rmtree(out / "final")
    victim = {"weights": newest / "student" / "model.safetensors",
              "optimizer": sorted(newest.glob("optimizer.*"))[0],
              "trainer_state": sorted(newest.glob("trainer_state.*"))[0]}[damage]
    if damage == "weights":
        corrupt_tail(victim)
    else:
        victim.write_bytes(b"garbage" + victim.read_bytes()[: victim.stat().st_size // 2])
    result = run_quietly(make_config(assets, out, run__steps=4, run__save_every=2))
    output = capsys.readouterr().out
    assert f"not resuming from {newest}: {victim}" in output  # names the file and why
    assert "resuming from" in output and "step-00000002" in output
    assert_same_run(result, straight_run)  # continued from step 2, bit-exact


def run_quietly(config):
    from engine.train.loop import run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return run(config)


def test_a_damaged_only_checkpoint_is_an_error_naming_the_file(assets, tmp_path, capsys):
    out = tmp_path / "run"
    assert quiet_main(base_overrides(assets, out, run__steps=1)) == 0
    state = ckpt.latest_checkpoint(out)
    victim = sorted(state.glob("optimizer.*"))[0]
    victim.write_bytes(b"garbage")
    capsys.readouterr()
    assert quiet_main(base_overrides(assets, out, run__steps=2)) == 1
    err = one_error_line(capsys)
    assert str(victim) in err and "damaged" in err


def rewrite_done_hashes(folder: Path) -> None:
    """Make DONE agree with the files again: what a bug or a hand edit could leave."""
    done = json.loads((folder / ckpt.DONE_MARKER).read_text())
    done["files"] = {name: ckpt.file_sha256(folder / name) for name in done["files"]}
    (folder / ckpt.DONE_MARKER).write_text(json.dumps(done))


def test_state_files_are_checked_even_when_their_hashes_agree(assets, tmp_path):
    out = tmp_path / "run"
    assert quiet_main(base_overrides(assets, out, run__steps=1)) == 0
    folder = ckpt.latest_checkpoint(out)
    from engine.model import load_pretrained

    student = load_pretrained(folder / "student")
    corrupt_tail(folder / "student" / "model.safetensors")
    rewrite_done_hashes(folder)
    with pytest.raises(ckpt.CheckpointLoadError, match=r"student: weight \S+ is not finite"):
        ckpt.load_checkpoint(folder, student=student, optimizer=None)


def test_garbage_state_json_is_named(tmp_path):
    from tests.engine.test_checkpoint import save, tiny_student

    model = tiny_student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    folder = save(tmp_path, 1, model, optimizer)
    for name, text in (("trainer_state.json", "{'step': arbage"),
                       ("optimizer.json", '{"param_groups": 3}')):
        original = (folder / name).read_text()
        (folder / name).write_text(text)
        rewrite_done_hashes(folder)
        with pytest.raises(ckpt.CheckpointLoadError, match=re.escape(str(folder / name))):
            ckpt.load_checkpoint(folder, student=model, optimizer=optimizer)
        (folder / name).write_text(original)
        rewrite_done_hashes(folder)
    ckpt.load_checkpoint(folder, student=model, optimizer=optimizer)  # intact again


# --------------------------------------------------------------------------------------
# Security: nothing is unpickled
# --------------------------------------------------------------------------------------


class _Boom:
    def __reduce__(self):
        return (Path.write_text, (Path("PWNED"), "code ran"))


def test_an_old_pickled_checkpoint_is_refused_unread(assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert quiet_main(base_overrides(assets, out, run__steps=1)) == 0
    folder = ckpt.latest_checkpoint(out)
    (folder / ckpt.DONE_MARKER).write_text("step 1\n")  # the format before version 2
    for name in ("optimizer.pt", "trainer_state.pt"):
        torch.save({"payload": _Boom()}, folder / name)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert quiet_main(base_overrides(assets, out, run__steps=2,
                                     run__resume=folder)) == 1
    err = one_error_line(capsys)
    assert "written by an older neox-distill" in err and "never loads" in err
    assert not (tmp_path / "PWNED").exists()


def test_no_module_unpickles():
    for package in ("engine", "data", "kernels"):
        for path in (REPO / package).rglob("*.py"):
            text = path.read_text()
            assert "torch.load(" not in text and "import pickle" not in text, path


# --------------------------------------------------------------------------------------
# Item 14: a full disk during a checkpoint save or an export
# --------------------------------------------------------------------------------------


def no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_during_a_save_keeps_the_previous_checkpoint(assets, tmp_path, capsys,
                                                                 monkeypatch):
    import safetensors.torch

    out = tmp_path / "run"
    assert quiet_main(base_overrides(assets, out, run__steps=2, run__save_every=1)) == 0
    before = ckpt.latest_checkpoint(out)
    monkeypatch.setattr(safetensors.torch, "save_file", no_space)
    capsys.readouterr()
    assert quiet_main(base_overrides(assets, out, run__steps=3, run__save_every=1)) == 1
    err = one_error_line(capsys)
    assert "no space left on device" in err and str(before) in err
    assert ckpt.latest_checkpoint(out) == before
    ckpt.verify_checkpoint(before)
    assert not list(ckpt.checkpoint_root(out).glob(".*"))  # nothing half-written left


def test_a_full_disk_during_the_export_keeps_the_previous_export(assets, tmp_path, capsys,
                                                                 monkeypatch):
    from engine.train import export

    out = tmp_path / "run"
    assert quiet_main(base_overrides(assets, out, run__steps=1)) == 0
    before = {p.name: p.read_bytes() for p in (out / "final").iterdir()}
    monkeypatch.setattr(export, "write_model_files", no_space)
    capsys.readouterr()
    assert quiet_main(base_overrides(assets, out, run__steps=2)) == 1
    err = one_error_line(capsys)
    assert "cannot export the student: no space left on device" in err
    assert {p.name: p.read_bytes() for p in (out / "final").iterdir()} == before
    assert not [p for p in out.iterdir() if p.name.startswith(".final")]
    assert steps_of(out)[-1] == 2  # the trained weights were saved before the export


def test_write_errors_read_as_one_clear_phrase():
    from safetensors import SafetensorError

    from engine.train.file_writes import describe_write_error

    full = SafetensorError("Error while serializing: I/O error: No space left on device "
                           "(os error 28)")  # what safetensors raised on a full tmpfs
    assert describe_write_error(full) == "no space left on device"
    quota = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert describe_write_error(quota) == "no space left on device (disk quota exceeded)"
    denied = PermissionError(errno.EACCES, "Permission denied", "/x/y")
    assert describe_write_error(denied) == "permission denied (/x/y)"


# --------------------------------------------------------------------------------------
# Issue 22, C.22: a damaged metrics.jsonl
# --------------------------------------------------------------------------------------


def test_a_non_utf8_byte_in_metrics_jsonl_is_named_and_skipped_on_resume(assets, tmp_path):
    """One bad byte blocked the resume with a codec error naming no file. The damaged line
    is named (file, line number), skipped and left in the file as it is; the resume goes on."""
    out = tmp_path / "run"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        run(make_config(assets, out, run__steps=2, run__save_every=2))
        metrics = out / "metrics.jsonl"
        lines = metrics.read_bytes().split(b"\n")
        lines[0] = lines[0][:12] + b"\xff" + lines[0][13:]  # step 1's train record
        metrics.write_bytes(b"\n".join(lines))
        with pytest.warns(DamagedLines, match=re.escape(f"{metrics}: line 1 is not a JSON "
                                                        "record")):
            result = run(make_config(assets, out, run__save_every=2))
    assert result["status"] == "completed" and result["step"] == 4
    assert metrics.read_bytes().split(b"\n")[0] == lines[0]  # kept as it was
    numbered, damaged = read_numbered(metrics)
    assert damaged == [1]
    assert [r["step"] for _, r in numbered if r["kind"] == "train"] == [2, 3, 4]


def test_a_config_file_that_is_not_utf8_is_named(tmp_path, capsys):
    """The same class: a codec error naming no file, from --config."""
    config = tmp_path / "run.toml"
    config.write_bytes(b'[run]\nsteps = 4\n# caf\xe9\n')
    assert train_main(["--config", str(config)]) == 2
    assert one_error_line(capsys) == (f"error: {config}: not valid TOML: not UTF-8 text "
                                      "(invalid continuation byte at byte 21)")
