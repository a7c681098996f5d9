"""The per-GPU plan under FSDP (engine.sharded_memory) against the shards two gloo ranks hold,
and `neox-distill memplan --ladder`."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from engine import sharded_memory as sharded
from engine.commands.ladder import GPU_COUNTS, ladder, markdown_table, one_gpu, pairs
from engine.commands.memplan import main as memplan_main
from engine.memory import largest_micro_batch, parameter_count, plan_memory
from engine.model import GPTNeoX, GPTNeoXConfig, pythia_config
from engine.sharded_memory import plan_sharded_memory
from tests.dist_helpers import LOOPBACK_ENV, free_port, leave_process_group, run_ranks

# Odd sizes: no first dimension divides by 2 except where it must, so FSDP pads.
TINY = dict(vocab_size=301, hidden_size=36, num_layers=3, num_heads=4, intermediate_size=74,
            max_positions=32)


def test_parameter_shapes_are_the_models():
    config = GPTNeoXConfig(**TINY)
    model = GPTNeoX(config)
    assert sharded.parameter_shapes(config) == [tuple(p.shape) for p in model.parameters()]
    block = model.gpt_neox.layers[0]
    assert sharded.block_numel(config) == sum(p.numel() for p in block.parameters())
    assert sharded.head_numel(config) == sum(
        p.numel() for p in (*model.gpt_neox.final_layer_norm.parameters(),
                            *model.embed_out.parameters()))
    whole = sharded.sharded_numel(sharded.parameter_shapes(config), 1)
    assert whole == parameter_count(config)["total"]


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(LOOPBACK_ENV, MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from engine import dist
    from engine.train import fsdp

    info = dist.init_distributed("cpu", timeout_s=120)
    torch.manual_seed(0)
    model = fsdp.shard_model(GPTNeoX(GPTNeoXConfig(**TINY)), dist.device_mesh(info),
                             mp_policy=fsdp.mixed_precision_policy("bf16-autocast"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(0, 301, (2, 8), generator=torch.Generator().manual_seed(rank))
    model(ids).float().square().mean().backward()
    optimizer.step()

    def local_bytes(tensors):
        return sum(t.to_local().numel() * t.element_size() for t in tensors)

    params = list(model.parameters())
    measured = {
        "weights": local_bytes(params),
        "gradients": local_bytes(p.grad for p in params),
        "moments": local_bytes(t for s in optimizer.state.values()
                               for k, t in s.items() if k != "step"),
        "weight dtype": str(params[0].dtype), "gradient dtype": str(params[0].grad.dtype),
    }
    Path(out, f"rank{rank}.json").write_text(json.dumps(measured))
    leave_process_group()


def test_sharded_state_is_what_two_ranks_hold(tmp_path):
    assert run_ranks(_rank_main, free_port(), str(tmp_path)) == [0, 0]
    measured = json.loads((tmp_path / "rank0.json").read_text())  # rank 0: the larger shard
    assert measured["weight dtype"] == measured["gradient dtype"] == "torch.float32"
    plan = plan_sharded_memory(None, GPTNeoXConfig(**TINY), world_size=2, micro_batch=1,
                               seq_len=8, precision="bf16-autocast")
    assert plan.components["student weights (fp32, 1/2 shard)"] == measured["weights"]
    assert plan.components["student gradients (fp32, 1/2 shard)"] == measured["gradients"]
    assert plan.components["AdamW moments m, v (fp32, 1/2 shard)"] == measured["moments"]
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    assert rank1["weights"] < measured["weights"]  # padding sits on the last rank


def test_sharding_divides_the_state_and_adds_the_gathered_groups():
    teacher, student = pythia_config("pythia-1.4b"), pythia_config("pythia-410m")
    args = dict(micro_batch=1, seq_len=2048, activation_checkpointing=True)
    one = plan_memory(teacher, student, **args)
    eight = plan_sharded_memory(teacher, student, world_size=8, **args)
    state = 16 * parameter_count(student)["total"]  # fp32 weights, gradients, m and v
    shards = sum(b for k, b in eight.components.items() if "shard)" in k and "student" in
                 eight.groups[k])
    assert shards == pytest.approx(state / 8, rel=1e-3)
    assert eight.components["teacher weights (bf16, 1/8 shard)"] == pytest.approx(
        2 * parameter_count(teacher)["total"] / 8, rel=1e-3)
    assert eight.total < one.total
    replicated = plan_sharded_memory(teacher, student, world_size=8, teacher_sharded=False,
                                     **args)
    assert replicated.components["teacher weights (bf16, replicated)"] == (
        2 * parameter_count(teacher)["total"])
    kept = plan_sharded_memory(teacher, student, world_size=8, reshard_after_forward=False,
                               **args)
    assert kept.components[f"gathered: {student.num_layers} block(s)"] == (
        2 * student.num_layers * sharded.block_numel(student))
    offloaded = plan_sharded_memory(teacher, student, world_size=8, cpu_offload=True, **args)
    assert eight.allocated_peak - offloaded.allocated_peak == shards  # on the host now
    # The micro-batch search takes the sharded planner too.
    assert largest_micro_batch(teacher, student, seq_len=2048, budget_bytes=12 * 2**30,
                               planner=plan_sharded_memory, world_size=8,
                               activation_checkpointing=True) >= 1


def test_ladder_names_the_cheapest_way_for_every_pair(tmp_path, capsys):
    assert memplan_main(["--ladder", "--budget", "12GiB", "--json", str(tmp_path / "l.json")]) == 0
    rows = json.loads((tmp_path / "l.json").read_text())["rows"]
    assert len(rows) == len(pairs()) == 28
    assert "| 160m -> 70m | 1 (one GPU) | bf16-autocast |" in capsys.readouterr().out
    budget = 12 * 2**30
    for row in rows:
        assert row["gpus"] is not None, row  # everything fits on at most 256 GPUs of 12 GiB
        assert row["micro_batch"] >= 1 and row["groups"]["total"] <= budget
        teacher, student = pythia_config(row["teacher"]), pythia_config(row["student"])
        if row["gpus"] == 1:
            continue
        assert one_gpu(teacher, student, budget, 2048) is None
        # Not on fewer GPUs, even with everything that saves memory switched on.
        fewer = [n for n in GPU_COUNTS if n < row["gpus"]]
        for n in fewer:
            assert not plan_sharded_memory(
                teacher, student, world_size=n, micro_batch=1, seq_len=2048,
                activation_checkpointing=True, teacher_sharded=True,
                teacher_dtype_bytes=2).fits(budget)


def test_ladder_refuses_bad_input(capsys):
    for args in (["--budget", "12XB"], ["--config", "x.toml"], ["--seq-len", "0"]):
        assert memplan_main(["--ladder", *args]) == 2, args
        assert "memplan: error:" in capsys.readouterr().err


def test_memplan_of_an_fsdp_config_is_one_gpus_share(tmp_path, capsys):
    config = tmp_path / "run.toml"
    config.write_text('[teacher]\npath = "/models/pythia-6.9b"\n[student]\n'
                      'path = "/models/pythia-1b"\n[dist]\nstrategy = "fsdp"\n')
    args = ["--config", str(config), "--budget", "24GiB", "--json", str(tmp_path / "p.json")]
    memplan_main([*args, "--gpus", "8"])
    out = capsys.readouterr().out
    assert "teacher: dist.teacher=auto: replicated" in out
    plan = json.loads((tmp_path / "p.json").read_text())["plan"]
    assert "student weights (fp32, 1/8 shard)" in plan["components"]
    memplan_main([*args, "--gpus", "8", "--dist.teacher=shard"])
    plan = json.loads((tmp_path / "p.json").read_text())["plan"]
    assert "teacher weights (bf16, 1/8 shard)" in plan["components"]
    assert memplan_main([*args, "--gpus", "0"]) == 2


def test_readme_shows_the_ladder_the_tool_prints():
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = markdown_table(ladder([12 * 2**30]), 12 * 2**30).split("\n", 2)[2]
    assert table in readme, "README's 12 GiB ladder is stale: paste neox-distill memplan " \
                            "--ladder --budget 12GiB"
