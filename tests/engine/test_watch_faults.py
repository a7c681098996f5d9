"""A watched task that cannot be scored mid-run warns, or with eval.alarm_action=stop saves and
stops; it never ends the run without a save (issue 22, A.6; failed before the fix: exit 1, no
checkpoint, and the rerun refused as "an earlier run")."""

from __future__ import annotations

import shutil
import warnings

import pytest

from engine.train import checkpoint as ckpt
from engine.train.__main__ import main as train_main
from engine.train.loop import Trainer, run
from tests.engine import test_watch
from tests.engine.test_train import base_overrides
from tests.engine.test_watch import records, watch_config

assets = test_watch.assets  # the tiny models, shards, tokenizer and task files


def remove_after_step(monkeypatch, path, step: int) -> None:
    """The task file disappears once the run has made `step` steps."""
    original = Trainer.train_step

    def train_step(self, *args, **kwargs):
        result = original(self, *args, **kwargs)
        if self.step == step:
            path.unlink()
        return result

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_a_task_file_gone_mid_run_warns_and_the_run_completes(assets, tmp_path, monkeypatch):
    mc = shutil.copy(assets["mc"], tmp_path / "piqa.jsonl")
    remove_after_step(monkeypatch, mc, 1)
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(watch_config(assets, out, eval__tasks=f"lambada={assets['lambada']},"
                                  f"mc={mc}", eval__every=1, run__steps=2))
    assert result["status"] == "completed" and (out / "final").is_dir()
    failed = [str(w.message) for w in caught if "cannot be scored" in str(w.message)]
    assert [m.split(": cannot")[0] for m in failed] == [
        "task mc piqa at step 1", "task mc piqa at step 2"]
    assert str(mc) in failed[0]
    assert [(r["name"], r["step"]) for r in records(out, "task")] == [
        ("lambada", 0), ("piqa", 0), ("lambada", 1), ("lambada", 2)]


def test_with_alarm_action_stop_it_saves_then_stops_and_resumes(assets, tmp_path, monkeypatch,
                                                               capsys):
    mc = shutil.copy(assets["mc"], tmp_path / "piqa.jsonl")
    remove_after_step(monkeypatch, mc, 1)
    out = tmp_path / "run"
    overrides = base_overrides(assets, out, run__tokenizer=assets["tokenizer"],
                               eval__tasks=f"mc={mc}", eval__every=1, run__steps=3,
                               eval__alarm_action="stop")
    with pytest.warns(RuntimeWarning, match="cannot be scored"):
        assert train_main(overrides) == 1
    err = capsys.readouterr().err
    assert "task mc piqa at step 1: cannot be scored" in err and "checkpoint saved at step 1" in err
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [1]
    monkeypatch.undo()
    shutil.copy(assets["mc"], mc)  # the file back: the run resumes from its checkpoint
    assert train_main([*overrides, "--run.resume=auto"]) == 0
    assert [r["step"] for r in records(out, "task")] == [0, 1, 2, 3]
