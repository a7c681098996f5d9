"""engine.train.checkpoint and export: atomic saves, keep-last, resume, kills mid-save."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data import failpoints
from engine.model import GPTNeoX, GPTNeoXConfig, load_pretrained
from engine.train import checkpoint as ckpt
from engine.train.export import export_student
from engine.train.loop import run
from tests.engine.test_train import (
    assert_same_run,
    base_overrides,
    make_config,
)

REPO = Path(__file__).resolve().parents[2]


def tiny_student(seed: int = 0) -> GPTNeoX:
    torch.manual_seed(seed)
    return GPTNeoX(GPTNeoXConfig(vocab_size=61, hidden_size=16, num_layers=1, num_heads=2,
                                 intermediate_size=40, max_positions=16))


def save(out_dir, step, model, optimizer, keep_last=2):
    return ckpt.save_checkpoint(
        out_dir, step, student=model, optimizer=optimizer,
        trainer_state={"loader_states": [{"position": step}], "rng_states": [{}]},
        config={"step": step}, keep_last=keep_last,
    )


def test_a_checkpoint_holding_a_file_its_save_did_not_write_is_never_pruned(tmp_path):
    model = tiny_student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (1, 2):
        save(tmp_path, step, model, optimizer)
    note = ckpt.checkpoint_root(tmp_path) / ckpt.step_dir_name(1) / "my-note.txt"
    note.write_text("keep me")
    save(tmp_path, 3, model, optimizer)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [1, 2, 3]
    assert note.read_text() == "keep me"
    note.unlink()  # once it holds only what the save wrote, it is pruned as usual
    save(tmp_path, 4, model, optimizer)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 4]


def test_a_step_left_in_its_old_folder_by_a_kill_mid_replace_is_moved_back(tmp_path):
    """replace_folder moves step N aside, then the new one in: a kill between the two leaves
    the only complete step N in `.step-N.old-*`; clean_incomplete restores it, and deletes
    only the folders a save names (not, e.g., a user's `.step-notes`)."""
    model = tiny_student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    folder = save(tmp_path, 1, model, optimizer)
    root = ckpt.checkpoint_root(tmp_path)
    aside = root / ".step-00000001.old-abc123"
    aside.mkdir()
    os.replace(folder, aside / folder.name)
    (root / ".step-00000002.tmp-xyz789").mkdir()
    (root / ".step-notes").mkdir()
    ckpt.clean_incomplete(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [".step-notes", "step-00000001"]
    ckpt.verify_checkpoint(root / "step-00000001")


def test_keep_last_and_incomplete_folders(tmp_path):
    model = tiny_student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in (1, 2, 3, 4):
        model(torch.randint(0, 61, (2, 5))).float().mean().backward()
        optimizer.step()
        path = save(tmp_path, step, model, optimizer)
        assert (path / ckpt.DONE_MARKER).is_file()
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [3, 4]
    # A folder without DONE (a save killed after its rename) is never picked.
    fake = ckpt.checkpoint_root(tmp_path) / ckpt.step_dir_name(9)
    fake.mkdir()
    assert ckpt.latest_checkpoint(tmp_path).name == "step-00000004"
    assert [p.name for p in ckpt.resume_candidates("auto", tmp_path)] == ["step-00000004",
                                                                          "step-00000003"]
    assert ckpt.resume_candidates("none", tmp_path) == []
    with pytest.raises(ckpt.CheckpointLoadError, match="no DONE marker"):
        ckpt.resume_candidates(str(fake), tmp_path)
    with pytest.raises(ckpt.CheckpointLoadError, match="incomplete checkpoint"):
        ckpt.load_checkpoint(fake, student=model, optimizer=optimizer)
    ckpt.clean_incomplete(tmp_path)
    assert not fake.exists()

    # Loading restores weights and optimizer state exactly, in place.
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    expected_moments = [s["exp_avg"].clone() for s in optimizer.state.values()]
    fresh = tiny_student(seed=1)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path), student=fresh,
                                 optimizer=fresh_opt)
    assert state["step"] == 4 and state["loader_states"] == [{"position": 4}]
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, expected[name]), name
    for got, want in zip([s["exp_avg"] for s in fresh_opt.state.values()], expected_moments,
                         strict=True):
        assert torch.equal(got, want)


def test_load_refuses_a_different_shape(tmp_path):
    model = tiny_student()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = save(tmp_path, 1, model, optimizer)
    other = GPTNeoX(GPTNeoXConfig(vocab_size=61, hidden_size=16, num_layers=1, num_heads=2,
                                  intermediate_size=48, max_positions=16))
    with pytest.raises(ValueError, match="dense_h_to_4h"):
        ckpt.load_checkpoint(path, student=other, optimizer=None)


def test_rng_state_round_trip():
    state = ckpt.capture_rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    ckpt.restore_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def test_export_with_tokenizer_and_refusal(tmp_path):
    model = tiny_student()
    tokenizer = tmp_path / "tok.json"
    tokenizer.write_text('{"fake": "tokenizer"}')
    with pytest.warns(RuntimeWarning, match="not a tokenizer.json"):  # copied as it is
        out = export_student(model, tmp_path / "final", tokenizer_path=tokenizer)
    assert (out / "tokenizer.json").read_text() == tokenizer.read_text()
    assert load_pretrained(out).config.intermediate_size == 40
    assert (out / "neox_distill_export.json").is_file()
    export_student(model, tmp_path / "final")  # replacing an export is fine
    model_folder = tmp_path / "a-model"  # config.json but no marker: not ours
    model_folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        (model_folder / name).write_bytes((out / name).read_bytes())
    with pytest.raises(FileExistsError, match="not exported by neox-distill"):
        export_student(model, model_folder)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not exported by neox-distill"):
        export_student(model, precious)
    assert (precious / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-model", "final", "precious",
                                                          "tok.json"]


def start_training(overrides: list[str], log: Path, **env) -> subprocess.Popen:
    # Same thread count as this process: CPU reductions are blocked per thread, and the
    # comparison with the in-process straight run is bit-exact.
    threads = str(torch.get_num_threads())
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": threads, **env}
    with open(log, "w") as handle:
        return subprocess.Popen(
            [sys.executable, "-m", "engine.train", *overrides],
            cwd=REPO, env=full_env, stdout=handle, stderr=subprocess.STDOUT,
        )


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early ({proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out:\n{log.read_text()}")
        time.sleep(0.1)


def paused_save(out: Path) -> bool:
    root = ckpt.checkpoint_root(out)
    return root.is_dir() and any((p / "PAUSED").exists() for p in root.glob(".step-*"))


def start_and_pause_mid_save(assets, tmp_path: Path, name: str, pause: str):
    """Start a training run (save_every=2) that pauses mid-save per `pause`; wait for it."""
    out = tmp_path / name
    overrides = base_overrides(assets, out, run__save_every=2)
    log = tmp_path / "log.txt"
    proc = start_training(overrides, log, **failpoints.arm("checkpoint.save", pause))
    wait_for(lambda: paused_save(out), proc, log)
    return out, log, proc


def test_sigkill_mid_save_keeps_previous_checkpoint(assets, tmp_path, straight_run):
    out, _, proc = start_and_pause_mid_save(assets, tmp_path, "killed", "4:60")
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
    assert list(ckpt.checkpoint_root(out).glob(".step-00000004.tmp-*"))  # the debris is there
    # resume=auto continues from step 2, clears the debris, and ends where the straight run did.
    result = run(make_config(assets, out, run__save_every=2))
    assert not list(ckpt.checkpoint_root(out).glob(".step-*"))
    assert_same_run(result, straight_run)


def test_sigterm_finishes_the_step_saves_and_exits_143(assets, tmp_path, straight_run):
    out, log, proc = start_and_pause_mid_save(assets, tmp_path, "terminated", "2:2")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143, log.read_text()  # a scheduler sees "interrupted"
    text = log.read_text()
    assert "SIGTERM: finishing the current step" in text and "stopped by SIGTERM" in text
    steps = [s for s, _ in ckpt.complete_checkpoints(out)]
    assert steps[-1] == 3  # step 2 saved as planned; step 3 finished, saved, then exit
    assert not (out / "final").exists()
    result = run(make_config(assets, out, run__save_every=2))
    assert_same_run(result, straight_run)


@pytest.mark.parametrize("sig, status", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_final_validation_loses_nothing(assets, tmp_path, straight_run,
                                                           sig, status):
    """Issue 10 item 3: the handler stays until the end, and with save_every=0 the trained
    weights are saved before the final validation; resuming validates and exports."""
    out, log = tmp_path / "run", tmp_path / "log.txt"
    proc = start_training(base_overrides(assets, out), log,
                          **failpoints.arm("train.finish", "120"))  # pauses after the final save
    wait_for(lambda: "pausing before the final validation" in log.read_text(), proc, log)
    proc.send_signal(sig)
    assert proc.wait(timeout=60) == status, log.read_text()
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [4]
    assert not (out / "final").exists()
    result = run(make_config(assets, out))  # nothing left to train: validate and export
    assert result["status"] == "completed"
    assert_same_run(result, straight_run)
    lines = (out / "metrics.jsonl").read_text().splitlines()
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds.count("val") == 1
