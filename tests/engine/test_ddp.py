"""Two-process gloo DDP: same result as one process on the same global batch; dead ranks fail.

The real command line under torchrun is used for the comparison, so the environment
handling, the window-wide normaliser across ranks, no_sync and rank-0-only saving are all
on the path under test.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.train import checkpoint as ckpt
from engine.train.loop import run
from tests.dist_helpers import LOOPBACK_ENV, free_port
from tests.engine.test_train import (
    assert_weights_close,
    base_overrides,
    final_weights,
    make_config,
    train_records,
)

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]


def torchrun_train(overrides: list[str]) -> subprocess.CompletedProcess:
    """`python -m engine.train` on two gloo ranks under torchrun; fails the test on an error."""
    env = {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "NEOX_DIST_TIMEOUT_S": "300"}
    proc = subprocess.run(
        # --standalone: torchrun picks a free port and holds it, so no other process can
        # take it between our choice and its use.
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "engine.train", *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_two_ranks_match_one_process(assets, tmp_path):
    # One process: 4 micro-batches of 2 per step. Two ranks: 2 micro-batches of 2 each. The
    # loader deals the epoch's permutation out round-robin, so the global windows coincide.
    # The ranks run the fused head + loss (the default), the one process the full logits: the
    # comparison covers DDP's reduction of embed_out's gradient, which the fused loss forms.
    single = run(make_config(assets, tmp_path / "single", data__mode="padded",
                             batch__accum_steps=4, run__steps=3, loss__fused_head=False))
    out = tmp_path / "ddp"
    overrides = base_overrides(assets, out, data__mode="padded", batch__accum_steps=2,
                               run__steps=3, run__save_every=2)
    proc = torchrun_train(overrides)
    # Rank 0 alone logs and saves.
    assert proc.stdout.count("step 3/3") == 1, proc.stdout
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 3]
    state = json.loads((ckpt.latest_checkpoint(out) / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["loader_states"]) == 2

    ddp_records, single_records = train_records(out), train_records(single["out_dir"])
    assert len({r["valid_tokens"] for r in single_records}) > 1  # uneven windows
    for d, s in zip(ddp_records, single_records, strict=True):
        assert d["valid_tokens"] == s["valid_tokens"]
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert d["ce"] == pytest.approx(s["ce"], rel=1e-5)
        assert d["grad_norm"] == pytest.approx(s["grad_norm"], rel=1e-4)
    ddp_weights = final_weights({"export_dir": out / "final"})
    assert_weights_close(ddp_weights, final_weights(single))


def test_two_ranks_sample_their_own_and_match_one_process_on_policy(assets, tmp_path):
    """onpolicy.fraction=1, greedy: each rank writes the completions of its own windows, and
    the window-wide normaliser counts every rank's sampled tokens, so two ranks train as one
    process does on the same global windows; the onpolicy_* fields are summed over ranks."""
    on_policy = dict(onpolicy__fraction=1.0, onpolicy__prompt_tokens=4, onpolicy__new_tokens=6,
                     onpolicy__temperature=0.0, onpolicy__stop_token=-1, run__steps=2)
    single = run(make_config(assets, tmp_path / "single", batch__accum_steps=4, **on_policy))
    out = tmp_path / "ddp"
    overrides = base_overrides(assets, out, batch__accum_steps=2, **on_policy)
    torchrun_train(overrides)
    for d, s in zip(train_records(out), train_records(single["out_dir"]), strict=True):
        assert d["valid_tokens"] == s["valid_tokens"] == 4 * 2 * 6
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert d["onpolicy_teacher_nll"] == pytest.approx(s["onpolicy_teacher_nll"], rel=1e-5)
        assert d["onpolicy_token_share"] == 1.0
    assert_weights_close(final_weights({"export_dir": out / "final"}), final_weights(single))


def _rank_main(rank: int, port: int, result_dir: str) -> None:
    os.environ.update(LOOPBACK_ENV, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank))
    from engine import dist

    dist.init_distributed("cpu", timeout_s=30)
    dist.all_reduce_sum(torch.ones(1))  # both alive: fine
    if rank == 1:
        os._exit(3)  # dies without a word
    time.sleep(1.0)
    start = time.monotonic()
    try:
        dist.all_reduce_sum(torch.ones(1))
        message = "no error"
    except dist.DistributedError as exc:
        message = str(exc)
    Path(result_dir, "rank0.txt").write_text(f"{time.monotonic() - start:.1f}\n{message}")
    os._exit(0)


def test_dead_rank_makes_the_survivor_fail_clearly(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, port, str(tmp_path))) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        if p.is_alive():
            p.kill()
            pytest.fail("a rank hung instead of failing")
    seconds, message = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    assert "rank 0/2: all_reduce failed; another rank probably died" in message
    assert float(seconds) < 60
