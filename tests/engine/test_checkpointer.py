"""The strategy a run is given (engine/train/strategy.py) and the checkpoint manager's policy
(engine/train/checkpointer.py): when it saves, when it refuses, what it asks the strategy."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.dist import DistInfo
from engine.train import strategy
from engine.train.checkpointer import Checkpointer, TrainingDiverged
from engine.train.config import Config


def info(world_size: int = 1) -> DistInfo:
    return DistInfo(rank=0, local_rank=0, world_size=world_size, device=torch.device("cpu"))


def config(tmp_path, **run) -> Config:
    base = Config()
    return dataclasses.replace(base, run=dataclasses.replace(base.run, out_dir=str(tmp_path),
                                                             **run))


def test_one_strategy_per_kind_and_only_fsdp_drops_autocast(tmp_path):
    plain = config(tmp_path)
    fsdp = dataclasses.replace(plain, dist=dataclasses.replace(plain.dist, strategy="fsdp"),
                               precision="bf16-autocast")
    assert type(strategy.build_strategy(plain, info())) is strategy.Strategy
    assert type(strategy.build_strategy(plain, info(2))) is strategy.DDP
    assert type(strategy.build_strategy(fsdp, info())) is strategy.FSDP
    assert strategy.build_strategy(fsdp, info()).autocast_dtype is None
    bf16 = dataclasses.replace(plain, precision="bf16-autocast")
    assert strategy.build_strategy(bf16, info()).autocast_dtype == torch.bfloat16
    assert strategy.build_strategy(plain, info(2)).validation_share() == (0, 2, True)
    assert strategy.build_strategy(fsdp, info()).validation_share() == (0, 1, False)


class Recording(strategy.Strategy):
    """The one-process strategy, its writes recorded instead of made."""

    def __init__(self, cfg, bad_weight=None):
        super().__init__(cfg, info())
        self.saved, self.bad_weight = [], bad_weight

    def first_non_finite(self, student):
        return self.bad_weight

    def save_checkpoint(self, out_dir, step, **state):
        self.saved.append((step, state["trainer_state"]["bad_steps"]))
        return out_dir / f"step-{step}"


class Loader:
    def state_dict(self):
        return {"position": 0}


def test_saves_every_save_every_steps_and_once_at_the_last_step(tmp_path):
    cfg = config(tmp_path, save_every=2)
    recording = Recording(cfg)
    logged = []
    manager = Checkpointer(cfg, info(), recording, logged.append)
    assert manager.resume(torch.nn.Linear(2, 2), None, Loader()) == 0  # nothing to resume
    for step in (1, 2, 3):
        manager.record(step, applied=True)
        manager.save(step)
    assert recording.saved == [(2, 0)]
    assert manager.save(3, last_step=True) is not None
    assert manager.save(3, last_step=True) is None  # saved already
    assert recording.saved == [(2, 0), (3, 0)]
    manager.record(4, applied=False)  # a non-finite step: nothing saved until a finite one
    assert manager.save(4) is None and recording.saved[-1][0] == 3
    assert "step 4: no checkpoint saved" in logged[-1]
    manager.record(5, applied=True)
    manager.save(5, last_step=True)
    assert recording.saved[-1] == (5, 0)


def test_non_finite_weights_are_never_saved(tmp_path):
    cfg = config(tmp_path, save_every=1)
    recording = Recording(cfg, bad_weight="embed_out.weight")
    manager = Checkpointer(cfg, info(), recording, print)
    manager.resume(torch.nn.Linear(2, 2), None, Loader())
    manager.record(1, applied=True)
    with pytest.raises(TrainingDiverged, match=r"step 1: the student's weight embed_out\.weight"):
        manager.save(1)
    assert recording.saved == []
