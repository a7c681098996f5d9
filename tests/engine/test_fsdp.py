"""dist.strategy=fsdp: the same run as one process, sharded checkpoints, the gathered export.

Two ranks run on gloo through torchrun, the real command line (environment, the window-wide
normaliser, reduce-scatters summed not averaged, rank-0-only logging, every rank writing its
shards). One-rank FSDP runs in this process: FSDP2 needs a process group even for one rank,
and the engine makes one of this process alone.

"Equal to the one-process run" is to 1e-6 relative for losses, and per weight tensor as
||a - b|| / ||b|| <= 1e-6, except the attention key bias: softmax ignores it, its exact
gradient is zero, and AdamW turns the round-off it gets instead into +-lr steps whose signs
depend on the summation order (tests/engine/test_train.py, assert_weights_close).
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from unittest.mock import patch

import pytest
import torch

from engine.commands.consolidate_checkpoint import main as consolidate_main
from engine.data import failpoints
from engine.dist import DistInfo
from engine.model import GPTNeoX, load_pretrained, pythia_config, save_pretrained
from engine.quickstart.corpus import train_bpe_tokenizer
from engine.sharded_memory import plan_sharded_memory
from engine.train import checkpoint as ckpt
from engine.train import strategy
from engine.train.checkpointer import rescaled_loader_state
from engine.train.config import ConfigError
from engine.train.loop import run
from engine.train.setup import memory_plan_args, plan_micro_batch
from engine.train.sharded_checkpoint import OPTIMIZER_SHARDS, STUDENT_SHARDS
from tests.dist_helpers import LOOPBACK_ENV
from tests.engine.test_train import (
    VALID_VOCAB,
    assert_same_run,
    base_overrides,
    final_weights,
    make_config,
    train_records,
)
from tests.engine.test_watch import WORDS

REPO = Path(__file__).resolve().parents[2]
SHARED = dict(data__mode="padded", run__steps=3, run__save_every=2)
TIMINGS = ("tokens_per_s", "step_time_s", "eta_s", "peak_memory_bytes")
FSDP = dict(dist__strategy="fsdp", dist__teacher="shard")


def torchrun_command(overrides: list[str]) -> list[str]:
    # --standalone: torchrun picks a free port and holds it (tests/dist_helpers.py).
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            "--nproc_per_node=2", "-m", "engine.train", *overrides]


def torchrun_env(**extra) -> dict[str, str]:
    return {**os.environ, **LOOPBACK_ENV, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
            "NEOX_DIST_TIMEOUT_S": "300", **extra}


def torchrun(overrides: list[str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_command(overrides), cwd=REPO, env=torchrun_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def two_rank_overrides(assets, out: Path, **extra) -> list[str]:
    return base_overrides(assets, out, batch__accum_steps=2, **SHARED, **extra)


def assert_runs_close(records, weights, reference, rel=1e-6):
    """Losses and final weights within `rel` of the reference run; the KD term and the
    gradient norm within 10 rel (the KD term is a small difference of two cross-entropies,
    so the same absolute round-off is ten times larger relative to it)."""
    assert len(records) == len(reference["records"])
    for mine, ref in zip(records, reference["records"], strict=True):
        assert mine["valid_tokens"] == ref["valid_tokens"]
        for key in ("loss", "ce"):
            assert mine[key] == pytest.approx(ref[key], rel=rel), (mine["step"], key)
        for key in ("kd", "grad_norm"):
            assert mine[key] == pytest.approx(ref[key], rel=10 * rel), (mine["step"], key)
    for name, ref in reference["weights"].items():
        got = weights[name]
        if name.endswith("query_key_value.bias"):  # the key third: module docstring
            got, ref = got.view(2, 3, -1), ref.view(2, 3, -1)
            torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=0, atol=1e-3, msg=name)
            got, ref = got[:, 0::2], ref[:, 0::2]
        assert float((got - ref).norm() / ref.norm()) <= rel, name


def run_summary(out: Path) -> dict:
    return {"records": train_records(out), "weights": final_weights({"export_dir": out / "final"})}


@pytest.fixture(scope="module")
def single(assets, tmp_path_factory):
    """One process, four micro-batches per step: the global batch of two ranks x two."""
    out = tmp_path_factory.mktemp("single") / "run"
    run(make_config(assets, out, batch__accum_steps=4, **SHARED))
    return run_summary(out)


@pytest.fixture(scope="module")
def two_ranks(assets, tmp_path_factory):
    """Two FSDP ranks (teacher sharded too), two micro-batches each per step."""
    out = tmp_path_factory.mktemp("fsdp2") / "run"
    proc = torchrun(two_rank_overrides(assets, out, **FSDP))
    return {"out": out, "stdout": proc.stdout, **run_summary(out)}


# --------------------------------------------------------------------------------------
# Two ranks
# --------------------------------------------------------------------------------------


@pytest.mark.distributed
def test_two_fsdp_ranks_match_one_process(two_ranks, single):
    assert len({r["valid_tokens"] for r in single["records"]}) > 1  # uneven windows
    assert_runs_close(two_ranks["records"], two_ranks["weights"], single)
    out, stdout = two_ranks["out"], two_ranks["stdout"]
    assert stdout.count("step 3/3") == 1  # rank 0 alone logs
    assert "teacher: dist.teacher=shard" in stdout
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 3]
    folder = ckpt.latest_checkpoint(out)
    done = json.loads((folder / ckpt.DONE_MARKER).read_text())
    assert done["layout"] == "sharded" and done["world_size"] == 2
    for shards in (STUDENT_SHARDS, OPTIMIZER_SHARDS):  # one file per rank, no pickled metadata
        names = sorted(p.name for p in (folder / shards).iterdir())
        assert [n for n in names if n.endswith(".safetensors")] == [
            f"shard-0000{r}-model-00001-of-00001.safetensors" for r in (1, 2)]
        assert not any(n.endswith(".metadata") for n in names)
    state = json.loads((folder / "trainer_state.json").read_text())
    assert state["world_size"] == 2 and len(state["loader_states"]) == 2
    assert set(done["files"]) == {str(p.relative_to(folder)) for p in folder.rglob("*")
                                  if p.is_file() and p.name != ckpt.DONE_MARKER}


@pytest.mark.distributed
def test_two_fsdp_ranks_sample_in_step_and_match_one_process_on_policy(assets, tmp_path):
    """onpolicy.fraction=1 (greedy) on two FSDP ranks, student and teacher sharded: every
    decode step of the sampler is a collective of the sharded student, so the ranks must run
    the same number of them; the run equals one process on the same global windows."""
    on_policy = dict(onpolicy__fraction=1.0, onpolicy__prompt_tokens=4, onpolicy__new_tokens=6,
                     onpolicy__temperature=0.0, onpolicy__stop_token=-1)
    out = tmp_path / "fsdp"
    torchrun(two_rank_overrides(assets, out, **FSDP, **on_policy))
    single = tmp_path / "single"
    run(make_config(assets, single, batch__accum_steps=4, **SHARED, **on_policy))
    reference = run_summary(single)
    assert_runs_close(train_records(out), final_weights({"export_dir": out / "final"}),
                      reference, rel=1e-5)
    for mine, ref in zip(train_records(out), reference["records"], strict=True):
        assert mine["onpolicy_teacher_nll"] == pytest.approx(ref["onpolicy_teacher_nll"],
                                                             rel=1e-5)


@pytest.mark.distributed
def test_two_ranks_without_reshard_after_forward_match_one_process(assets, single, tmp_path):
    """dist.reshard_after_forward=false on two ranks: the same run as one process, saved
    after a validation (a forward without a backward) and exported (issue 22, B.7)."""
    out = tmp_path / "keep"
    torchrun(two_rank_overrides(assets, out, run__val_every=1, dist__strategy="fsdp",
                                dist__reshard_after_forward="false"))
    summary = run_summary(out)
    assert_runs_close(summary["records"], summary["weights"], single)
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2, 3]


def _faulty_fsdp_rank(rank: int, port: int, overrides: list[str], fault: str,
                     result_dir: str) -> None:
    """One rank of `neox-distill train` under FSDP; rank 1 dies (or stalls) inside its second
    step, after the step's first collective of ours. Rank 0 writes its exit status and its
    stderr to rank0.txt."""
    os.environ.update(LOOPBACK_ENV, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), NEOX_DIST_TIMEOUT_S="20", OMP_NUM_THREADS="1")
    import contextlib
    import io

    from engine.train import step
    from engine.train.__main__ import main

    report = Path(result_dir, "rank0.txt")
    if rank == 1:
        real, calls = step.distill_micro_step, []

        def faulty(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # step 2's first micro-step: rank 0 waits in an all-gather
                if fault == "killed":
                    os._exit(3)
                while not report.exists():  # stalled: silent until rank 0 has given up
                    time.sleep(0.5)
                os._exit(0)
            return real(*args, **kwargs)

        step.distill_micro_step = faulty
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = main(overrides)
    if rank == 0:
        report.write_text(f"{code}\n{err.getvalue()}")
    os._exit(0)


@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["killed", "stalled"])
def test_a_dead_or_stalled_peer_is_one_error_line_on_rank_0(assets, tmp_path, fault):
    """Issue 22, C.17: FSDP's own collectives (the all-gathers in the forward) raised gloo's
    RuntimeError as a traceback; now the one line the README promises, and exit status 1."""
    from tests.dist_helpers import free_port, run_ranks

    overrides = base_overrides(assets, tmp_path / "run", run__steps=4, **FSDP)
    codes = run_ranks(_faulty_fsdp_rank, free_port(), overrides, fault, str(tmp_path),
                      timeout=240)
    assert None not in codes, codes
    code, err = (tmp_path / "rank0.txt").read_text().split("\n", 1)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == "1" and len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: rank 0/2: a collective of FSDP, DDP or a checkpoint "
                                "failed; another rank probably died or timed out"), errors


@pytest.mark.distributed
def test_a_sharded_checkpoint_consolidates_into_the_exported_folder(two_ranks, tmp_path, capsys):
    """engine.commands.consolidate_checkpoint turns the last checkpoint's shards into the model
    folder
    the export wrote from the same weights, byte for byte; it refuses what it cannot read."""
    folder = ckpt.latest_checkpoint(two_ranks["out"])
    assert consolidate_main([str(folder), str(tmp_path / "student")]) == 0
    assert (tmp_path / "student" / "model.safetensors").read_bytes() == (
        two_ranks["out"] / "final" / "model.safetensors").read_bytes()
    assert consolidate_main([str(tmp_path / "student"), str(tmp_path / "again")]) == 2
    assert "consolidate_checkpoint: error:" in capsys.readouterr().err


@pytest.mark.distributed
def test_fsdp_export_loads_in_transformers_and_equals_the_ddp_export(two_ranks, assets,
                                                                      tmp_path):
    from transformers import GPTNeoXForCausalLM

    ddp_out = tmp_path / "ddp"
    torchrun(two_rank_overrides(assets, ddp_out))
    fsdp_final, ddp_final = two_ranks["out"] / "final", ddp_out / "final"
    assert sorted(p.name for p in fsdp_final.iterdir()) == sorted(
        p.name for p in ddp_final.iterdir())
    assert (fsdp_final / "config.json").read_text() == (ddp_final / "config.json").read_text()
    ddp = run_summary(ddp_out)
    # Both runs equal the one-process run to 1e-6, so each other to 2e-6.
    assert_runs_close(two_ranks["records"], two_ranks["weights"], ddp, rel=2e-6)
    # Validation: every FSDP rank scores the batches DDP's two ranks share out.
    fsdp_val, ddp_val = (
        [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
         if r["kind"] == "val"] for out in (two_ranks["out"], ddp_out))
    assert [r["val_tokens"] for r in fsdp_val] == [r["val_tokens"] for r in ddp_val]
    for f, d in zip(fsdp_val, ddp_val, strict=True):
        assert f["val_ce"] == pytest.approx(d["val_ce"], rel=1e-5)
    hf, info = GPTNeoXForCausalLM.from_pretrained(fsdp_final, dtype=torch.float32,
                                                  output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ours = load_pretrained(fsdp_final)
    input_ids = torch.randint(0, VALID_VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf.eval()(input_ids).logits, ours(input_ids), rtol=1e-5,
                                   atol=1e-5)


def process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (from /proc): torchrun starts its workers in sessions of
    their own, so killing its process group would leave the ranks running."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo.extend(children.get(tree[-1], []))
    return tree


def paused_save(out: Path, step: int) -> bool:
    root = ckpt.checkpoint_root(out)
    return root.is_dir() and any((p / "PAUSED").exists()
                                 for p in root.glob(f".step-{step:08d}.tmp-*"))


@pytest.mark.distributed
def test_kill_mid_save_then_resume_is_bit_exact(two_ranks, assets, tmp_path):
    """kill -9 of both ranks while they save step 3: step 2 stays the newest checkpoint, and
    the rerun resumes from it and ends exactly where the uninterrupted run did."""
    out, log = tmp_path / "killed", tmp_path / "log.txt"
    overrides = two_rank_overrides(assets, out, **FSDP)
    with open(log, "w") as handle:
        proc = subprocess.Popen(torchrun_command(overrides), cwd=REPO, stdout=handle,
                                stderr=subprocess.STDOUT,
                                env=torchrun_env(**failpoints.arm("checkpoint.save", "3:120")))
    deadline = time.monotonic() + 300
    while not paused_save(out, 3):
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)
    for pid in reversed(process_tree(proc.pid)):  # both ranks, then torchrun: kill -9 all
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
    assert list(ckpt.checkpoint_root(out).glob(".step-00000003.tmp-*"))  # the debris
    torchrun(overrides)
    assert not list(ckpt.checkpoint_root(out).glob(".step-*"))
    resumed = run_summary(out)
    assert resumed["records"] == [  # timings aside, every number the same
        {**r, **{k: resumed["records"][i][k] for k in TIMINGS}}
        for i, r in enumerate(two_ranks["records"])]
    assert (out / "final" / "model.safetensors").read_bytes() == (
        two_ranks["out"] / "final" / "model.safetensors").read_bytes()


@pytest.mark.distributed
def test_a_two_rank_checkpoint_continues_on_one_rank(two_ranks, single, assets, tmp_path):
    """DCP reshards the weights and AdamW state; the loader continues at the same item."""
    out = tmp_path / "one"
    source = two_ranks["out"] / "checkpoints" / "step-00000002"
    shutil.copytree(source, ckpt.checkpoint_root(out) / source.name)
    result = run(make_config(assets, out, batch__accum_steps=4, dist__strategy="fsdp",
                             **SHARED))
    assert result["step"] == 3
    records = train_records(out)
    assert [r["step"] for r in records] == [3]
    assert_runs_close(records, final_weights(result),
                      {"records": single["records"][2:], "weights": single["weights"]})


@pytest.mark.distributed
def test_watched_tasks_and_lost_updates_on_two_fsdp_ranks(assets, tmp_path):
    """Every rank scores the watched task (the forward is collective), rank 0 records it;
    each rank measures the lost updates of its shards and the sums are added."""
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12)))
                 for _ in range(60)]
    tokenizer, lambada = tmp_path / "tokenizer.json", tmp_path / "lambada.jsonl"
    train_bpe_tokenizer(sentences, tokenizer, vocab_size=300)
    lambada.write_text("".join(json.dumps({"text": t}) + "\n" for t in sentences[:8]))
    watch = dict(precision="bf16-pure", run__steps=2, run__tokenizer=tokenizer,
                 eval__tasks=f"lambada={lambada}", eval__alarm=0, optim__lr=1e-2)
    plain = run(make_config(assets, tmp_path / "plain", batch__accum_steps=4, **watch))
    out = tmp_path / "fsdp"
    torchrun(base_overrides(assets, out, dist__strategy="fsdp", **watch))
    tasks = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
             if r["kind"] == "task"]
    assert [r["step"] for r in tasks] == [0, 2]
    plain_tasks = [r for r in map(json.loads, (Path(plain["out_dir"]) / "metrics.jsonl")
                                  .read_text().splitlines()) if r["kind"] == "task"]
    for key in ("ppl", "acc", "documents"):  # the same bf16 weights at step 0
        assert tasks[0][key] == pytest.approx(plain_tasks[0][key], rel=1e-6), key
    for mine, ref in zip(train_records(out), train_records(plain["out_dir"]), strict=True):
        assert 0.0 < mine["update_lost_frac"] < 1.0
        # bf16 gradients summed in another order: nearly, not exactly, the same update
        assert mine["update_lost_frac"] == pytest.approx(ref["update_lost_frac"], abs=0.01)


# --------------------------------------------------------------------------------------
# One rank, in this process
# --------------------------------------------------------------------------------------


def test_one_rank_fsdp_is_the_plain_run_exactly(assets, tmp_path, straight_run):
    """World size 1: the same fp32 arithmetic as without FSDP, so the same bits; and the
    gathered export is byte for byte the file the plain export writes."""
    out = tmp_path / "fsdp1"
    first = run(make_config(assets, out, run__steps=2, dist__strategy="fsdp"))
    assert first["step"] == 2
    result = run(make_config(assets, out, run__save_every=2, dist__strategy="fsdp"))
    assert_same_run(result, straight_run)  # resumed at step 2: bit-exact
    straight_final = Path(straight_run["result"]["export_dir"])
    assert (out / "final" / "model.safetensors").read_bytes() == (
        straight_final / "model.safetensors").read_bytes()
    done = json.loads((ckpt.latest_checkpoint(out) / ckpt.DONE_MARKER).read_text())
    assert done["layout"] == "sharded" and done["world_size"] == 1


def test_one_rank_fsdp_without_reshard_after_forward_is_the_plain_run(assets, tmp_path,
                                                                       straight_run):
    """dist.reshard_after_forward=false keeps each block's weights gathered after its
    forward: the optimizer, the clip, the checks and the checkpoint must still see the
    sharded parameters (issue 22, B.7: it trained on other numbers and could not save)."""
    out = tmp_path / "keep"
    first = run(make_config(assets, out, run__steps=2, dist__strategy="fsdp",
                            dist__reshard_after_forward="false"))
    assert first["step"] == 2
    # A validation before every save: a forward without a backward just before the save.
    result = run(make_config(assets, out, run__save_every=2, run__val_every=1,
                             dist__strategy="fsdp", dist__reshard_after_forward="false"))
    assert_same_run(result, straight_run)  # resumed from its own step-2 checkpoint


def test_one_rank_fsdp_full_logits_is_the_plain_run_exactly(assets, tmp_path):
    """loss.fused_head=false: the root's forward returns the logits, as without FSDP."""
    plain = run(make_config(assets, tmp_path / "plain", loss__fused_head="false"))
    sharded = run(make_config(assets, tmp_path / "fsdp", loss__fused_head="false",
                              dist__strategy="fsdp"))
    assert_same_run(sharded, {"records": train_records(plain["out_dir"]),
                              "weights": final_weights(plain)})


@pytest.mark.slow
def test_runtime_compile_under_fsdp_compiles_each_block(assets, tmp_path, straight_run):
    result = run(make_config(assets, tmp_path / "compiled", run__save_every=2,
                             dist__strategy="fsdp", runtime__compile="true"))
    for mine, ref in zip(train_records(result["out_dir"]), straight_run["records"],
                         strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)


def test_activation_checkpointing_under_fsdp_changes_nothing(assets, tmp_path, straight_run):
    result = run(make_config(assets, tmp_path / "ac", run__save_every=2, dist__strategy="fsdp",
                             runtime__activation_checkpointing="true"))
    assert_same_run(result, straight_run)


def test_cpu_offload_runs_the_same_step(assets, tmp_path, straight_run):
    """On a CPU machine the offloaded shards stay where they are: the same run, bit for bit
    (on a GPU the optimizer step then runs on the host)."""
    result = run(make_config(assets, tmp_path / "offload", run__save_every=2,
                             dist__strategy="fsdp", dist__cpu_offload="true"))
    assert_same_run(result, straight_run)


def test_bf16_autocast_under_fsdp_trains_close_to_ddp(assets, tmp_path):
    """bf16 gathered weights without autocast (FSDP) against fp32 masters under autocast: the
    same bf16 matmuls, a bf16 residual stream instead of fp32, so close, not equal."""
    plain = run(make_config(assets, tmp_path / "plain", precision="bf16-autocast"))
    sharded = run(make_config(assets, tmp_path / "fsdp", precision="bf16-autocast",
                              dist__strategy="fsdp"))
    for p, s in zip(train_records(plain["out_dir"]), train_records(sharded["out_dir"]),
                    strict=True):
        assert s["loss"] == pytest.approx(p["loss"], rel=1e-2)
    weights = final_weights(sharded)
    assert all(w.dtype == torch.float32 for w in weights.values())  # the fp32 masters


def test_sharded_checkpoints_are_verified_and_layouts_refused(assets, tmp_path, capsys):
    out = tmp_path / "run"
    run(make_config(assets, out, run__save_every=2, dist__strategy="fsdp"))
    newest = ckpt.latest_checkpoint(out)
    shard = next((newest / STUDENT_SHARDS).glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    # A whole-model run refuses the sharded layout, naming the way out.
    with pytest.raises(ckpt.CheckpointLoadError, match=r"resume it with --dist\.strategy=fsdp"):
        run(make_config(assets, out, run__steps=6, run__resume=str(newest)))
    # resume=auto skips the damaged one, naming the file, and continues from step 2.
    capsys.readouterr()
    result = run(make_config(assets, out, run__steps=6, dist__strategy="fsdp"))
    assert f"not resuming from {newest}: {shard}: damaged" in capsys.readouterr().out
    assert result["step"] == 6
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4, 5, 6]
    # A sharded run refuses a whole-model checkpoint.
    plain = tmp_path / "plain"
    run(make_config(assets, plain, run__steps=2))
    with pytest.raises(ckpt.CheckpointLoadError, match=r"resume it with --dist\.strategy=ddp"):
        run(make_config(assets, plain, run__steps=4, dist__strategy="fsdp"))


def test_auto_teacher_placement_and_micro_batch_follow_the_per_gpu_plan(assets, tmp_path):
    """dist.teacher=auto replicates while the plan with a whole teacher fits the budget, and
    batch.memory_budget picks the micro-batch from the per-GPU plan of the placement."""
    info = DistInfo(0, 0, 8, torch.device("cpu"))
    base = dict(dist__strategy="fsdp", teacher__path="pythia-6.9b", batch__seq_len=2048,
                batch__accum_steps=8)
    teacher, student = pythia_config("pythia-6.9b"), pythia_config("pythia-1b")
    for budget, sharded in (("80GiB", False), ("24GiB", True)):
        config = make_config(assets, tmp_path, batch__memory_budget=budget, **base)
        with patch.object(strategy, "teacher_config", lambda c: teacher), \
                patch.object(strategy, "student_config", lambda c: student):
            placed, why = strategy.teacher_placement(config, info)
        assert placed == sharded and ("sharded" if sharded else "replicated") in why, why
        mb, accum, peak, note = plan_micro_batch(config, teacher, student, info.device,
                                                 world_size=8, teacher_sharded=placed)
        assert mb * accum == 2 * 8 and peak == plan_sharded_memory(
            teacher, student, world_size=8, teacher_sharded=placed, micro_batch=mb,
            **memory_plan_args(config)).allocated_peak
        assert f"using micro_batch={mb}" in note


def test_dist_keys_need_fsdp(assets, tmp_path):
    with pytest.raises(ConfigError, match=r"dist\.teacher='shard' needs dist\.strategy=fsdp"):
        make_config(assets, tmp_path, dist__teacher="shard")
    with pytest.raises(ConfigError, match=r"dist\.cpu_offload=true needs dist\.strategy=fsdp"):
        make_config(assets, tmp_path, dist__cpu_offload="true")
    with pytest.raises(ConfigError, match=r"dist\.strategy: 'zero3' is not one of ddp, fsdp"):
        make_config(assets, tmp_path, dist__strategy="zero3")


class _Loader:
    def __init__(self, micro_batch, world_size):
        self.micro_batch, self.world_size = micro_batch, world_size


def test_loader_position_converts_between_world_sizes():
    saved = [{"epoch": 1, "position": 6, "micro_batch": 2, "world_size": 2, "seed": 3}] * 2
    # 6 micro-batches of 2 on each of 2 ranks: the first 24 items of epoch 1.
    one = rescaled_loader_state(saved, _Loader(2, 1), Path("ck"))
    assert (one["epoch"], one["position"], one["world_size"], one["seed"]) == (1, 12, 1, 3)
    four = rescaled_loader_state(saved, _Loader(3, 4), Path("ck"))
    assert (four["position"], four["micro_batch"]) == (2, 3)
    with pytest.raises(ckpt.CheckpointLoadError, match="not a multiple of this run's 5 x 1"):
        rescaled_loader_state(saved, _Loader(5, 1), Path("ck"))
    apart = [saved[0], {**saved[0], "position": 5}]
    with pytest.raises(ckpt.CheckpointLoadError, match="different positions"):
        rescaled_loader_state(apart, _Loader(2, 1), Path("ck"))


@pytest.mark.parametrize("fused_head", ["true", "false"])
def test_a_teacher_head_padded_to_more_rows_teaches_through_the_shared_rows(
        assets, tmp_path, fused_head):
    """pythia-6.9b and -12b pad their heads to more rows than the smaller sizes: the rows
    past data.valid_vocab are never scored, so a wider teacher trains exactly like one cut
    to the student's rows; without data.valid_vocab the pair is refused."""
    wide = load_pretrained(assets["teacher"])
    config = dataclasses.replace(wide.config, vocab_size=wide.config.vocab_size + 13)
    padded = GPTNeoX(config)
    with torch.no_grad():
        for name, param in padded.named_parameters():
            source = dict(wide.named_parameters())[name]
            param[: source.shape[0]] = source  # the extra rows keep their random init
    save_pretrained(padded, tmp_path / "padded-teacher")
    args = dict(run__steps=2, dist__strategy="fsdp", dist__teacher="shard",
                loss__fused_head=fused_head)
    narrow = run(make_config(assets, tmp_path / "narrow", **args))
    result = run(make_config(assets, tmp_path / "wide", teacher__path=tmp_path / "padded-teacher",
                             **args))
    assert train_records(result["out_dir"]) == [
        {**r, **{k: train_records(result["out_dir"])[i][k] for k in TIMINGS}}
        for i, r in enumerate(train_records(narrow["out_dir"]))]
    with pytest.raises(ConfigError, match=r"set data\.valid_vocab"):
        run(make_config(assets, tmp_path / "refused", teacher__path=tmp_path / "padded-teacher",
                        data__valid_vocab=0))
