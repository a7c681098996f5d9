"""The Pythia ladder: for every teacher -> student pair and GPU size, what it takes to distil.

For each pair of the Pythia suite (teacher larger than student) and each budget per GPU:

  1. one GPU, the first of these that fits a sequence: bf16-autocast, bf16-autocast with
     activation checkpointing, bf16-pure, bf16-pure with checkpointing (bf16-pure loses
     most updates at small learning rates: README, "Watching the student");
  2. else FSDP (dist.strategy=fsdp, bf16-autocast) on the fewest GPUs among GPU_COUNTS,
     trying at each count: teacher replicated, then sharded, without then with activation
     checkpointing;

reporting the largest micro-batch that fits and the plan's bytes per component at it
(engine.memory.plan_memory for one GPU, engine.sharded_memory.plan_sharded_memory per GPU
under FSDP). The teacher is held in bf16, sequences are seq_len tokens, the loss is the
engine's default. These are plans; README says which were measured.
"""

from __future__ import annotations

from typing import Any

from engine.memory import format_bytes, largest_micro_batch, plan_memory
from engine.model.config import PYTHIA_SHAPES, pythia_config
from engine.sharded_memory import group_totals, plan_sharded_memory

ONE_GPU = (("bf16-autocast", False), ("bf16-autocast", True), ("bf16-pure", False),
           ("bf16-pure", True))
FSDP_ORDER = ((False, False), (True, False), (False, True), (True, True))  # (sharded, ckpt)
GPU_COUNTS = (2, 4, 8, 16, 32, 64, 128, 256)
GROUPS = ("student", "teacher", "activations", "loss", "overhead")


def pairs() -> list[tuple[str, str]]:
    """(teacher, student) for every two sizes of the suite, the teacher the larger."""
    names = list(PYTHIA_SHAPES)
    return [(t, s) for i, s in enumerate(names) for t in names[i + 1:]]


def _entry(plan, **facts) -> dict[str, Any]:
    return {**facts, "micro_batch": plan.micro_batch, "groups": group_totals(plan),
            "components": dict(plan.components)}


def one_gpu(teacher, student, budget: int, seq_len: int) -> dict[str, Any] | None:
    for precision, checkpointing in ONE_GPU:
        args = dict(seq_len=seq_len, precision=precision, teacher_dtype_bytes=2,
                    activation_checkpointing=checkpointing)
        mb = largest_micro_batch(teacher, student, budget_bytes=budget, **args)
        if mb:
            return _entry(plan_memory(teacher, student, micro_batch=mb, **args), gpus=1,
                          precision=precision, activation_checkpointing=checkpointing,
                          teacher_placement="whole")
    return None


def on_fsdp(teacher, student, budget: int, seq_len: int) -> dict[str, Any] | None:
    for gpus in GPU_COUNTS:
        for sharded, checkpointing in FSDP_ORDER:
            args = dict(seq_len=seq_len, precision="bf16-autocast", teacher_dtype_bytes=2,
                        activation_checkpointing=checkpointing, world_size=gpus,
                        teacher_sharded=sharded)
            mb = largest_micro_batch(teacher, student, budget_bytes=budget,
                                     planner=plan_sharded_memory, **args)
            if mb:
                plan = plan_sharded_memory(teacher, student, micro_batch=mb, **args)
                return _entry(plan, gpus=gpus, precision="bf16-autocast",
                              activation_checkpointing=checkpointing,
                              teacher_placement="sharded" if sharded else "replicated")
    return None


def ladder(budgets: list[int], seq_len: int = 2048) -> list[dict[str, Any]]:
    """One row per (budget, pair): the cheapest way found, or gpus None when none fits."""
    rows = []
    for budget in budgets:
        for t_name, s_name in pairs():
            teacher, student = pythia_config(t_name), pythia_config(s_name)
            found = one_gpu(teacher, student, budget, seq_len) or on_fsdp(
                teacher, student, budget, seq_len)
            rows.append({"budget_bytes": budget, "teacher": t_name, "student": s_name,
                         "seq_len": seq_len, **(found or {"gpus": None})})
    return rows


def _gib(n: int) -> str:
    return f"{n / 2**30:.1f}"


def markdown_table(rows: list[dict[str, Any]], budget: int) -> str:
    """The rows of one budget as a markdown table (GiB per GPU by group)."""
    lines = [f"Per GPU of {format_bytes(budget)} (sequences of {rows[0]['seq_len']} tokens; "
             "GiB per GPU: student = weights, gradients, AdamW, gathered groups):", "",
             "| teacher -> student | GPUs | precision | micro-batch | act. ckpt | teacher held | "
             + " | ".join(GROUPS) + " | total |",
             "|---|---:|---|---:|---|---|" + "---:|" * (len(GROUPS) + 1)]
    for row in rows:
        if row["budget_bytes"] != budget:
            continue
        pair = f"{row['teacher'][7:]} -> {row['student'][7:]}"
        if row["gpus"] is None:
            lines.append(f"| {pair} | > {GPU_COUNTS[-1]} | | | | |" + " |" * (len(GROUPS) + 1))
            continue
        groups = row["groups"]
        mode = "one GPU" if row["gpus"] == 1 else f"FSDP x {row['gpus']}"
        lines.append(
            f"| {pair} | {row['gpus']} ({mode}) | {row['precision']} | {row['micro_batch']} | "
            f"{'yes' if row['activation_checkpointing'] else 'no'} | {row['teacher_placement']} | "
            + " | ".join(_gib(groups.get(g, 0)) for g in GROUPS)
            + f" | {_gib(groups['total'])} |")
    return "\n".join(lines)
