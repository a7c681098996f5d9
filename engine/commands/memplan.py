"""Memory plan of a training config: `neox-distill memplan --config FILE --budget 12GiB`;
the whole Pythia ladder: `neox-distill memplan --ladder [--budget 12GiB ...]`.

Reads the same TOML (and `--section.key=value` overrides) that engine.train reads, takes the
model shapes from the checkpoint folders' config.json when they exist on this machine and
from the built-in Pythia table by name otherwise, and prints the per-component table for the
configured micro-batch plus the largest micro-batch that fits the budget, with and without
activation checkpointing. The plan follows loss.fused_head (default: both LM heads inside the
loss, no logits; --loss.fused_head=false plans the full-logits path). Exits 1 when the
configured micro-batch does not fit, 2 on bad input.

--ladder prints, for every teacher -> student pair of the Pythia suite and every budget
(default 12, 24 and 80 GiB per GPU), whether it fits one GPU and how, else the fewest GPUs
under FSDP, with the bytes per GPU by component group (engine/commands/ladder.py); --json keeps
every
component.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.commands.ladder import ladder, markdown_table
from engine.data.atomic import write_json_atomic
from engine.memory import format_bytes, largest_micro_batch, parse_bytes
from engine.model.config import PYTHIA_SHAPES, GPTNeoXConfig, pythia_config
from engine.train.config import load_config
from engine.train.setup import memory_planner
from engine.train.strategy import choose_teacher_sharding

LADDER_BUDGETS = ("12GiB", "24GiB", "80GiB")


def model_config_for(path: str, *, role: str):
    """GPTNeoXConfig for a checkpoint folder, or for a Pythia name found in the path."""
    folder = Path(path)
    if (folder / "config.json").is_file():
        return GPTNeoXConfig.from_json_file(folder / "config.json")
    lowered = path.lower().rstrip("/")
    # Longest name first so "pythia-410m" is never read as a shorter size.
    for name in sorted(PYTHIA_SHAPES, key=len, reverse=True):
        if lowered.endswith(name) or f"{name}/" in lowered or f"{name}-" in lowered:
            return pythia_config(name)
    raise ValueError(
        f"{role}.path {path!r}: no config.json there and no Pythia size "
        f"({', '.join(PYTHIA_SHAPES)}) in the name"
    )


def configs_from_training_config(config):
    """(teacher_cfg or None, student_cfg) for an engine.train.config.Config."""
    teacher = model_config_for(config.teacher.path, role="teacher") if config.teacher.path else None
    if config.student.init == "scratch":
        student = config.student.scratch_model_config()
    else:
        student = model_config_for(config.student.path, role="student")
    return teacher, student


# In every --json file memplan writes: what lets a rerun replace it (and nothing else).
JSON_MARK = {"written_by": "neox-distill memplan"}


def check_json_target(path: str) -> None:
    """--json: refuse, before any work, an existing path memplan did not write (its own
    --config, a user's file, a folder); memplan's earlier output is replaced."""
    target = Path(path)
    if not target.exists():
        return
    if not target.is_file():
        raise ValueError(f"--json {path}: is a folder, not a file (give a file path)")
    try:
        record = json.loads(target.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not (isinstance(record, dict) and record.get("written_by") == JSON_MARK["written_by"]):
        raise ValueError(f"--json {path}: exists and was not written by memplan; not "
                         "overwriting it (give a new file path)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="neox-distill memplan",
        description="Predict device memory of a distillation config and the largest micro-batch "
        "that fits a budget.",
    )
    parser.add_argument("--config", help="training TOML (as for engine.train)")
    parser.add_argument("--budget", action="append",
                        help="device memory per GPU, e.g. 12GiB (default; with --ladder 12, "
                        "24 and 80 GiB); repeat for several with --ladder")
    parser.add_argument("--ladder", action="store_true",
                        help="every Pythia teacher -> student pair instead of one config")
    parser.add_argument("--seq-len", type=int, default=2048, help="--ladder: tokens per sequence")
    parser.add_argument("--gpus", type=int, default=1,
                        help="GPUs of the run: with --dist.strategy=fsdp the plan is one GPU's "
                        "share (default 1)")
    parser.add_argument("--json", default="", help="also write the plans as JSON to this path "
                        "(a new file, or one memplan wrote)")
    args, overrides = parser.parse_known_args(argv)
    try:
        if args.json:
            check_json_target(args.json)
    except ValueError as exc:
        print(f"memplan: error: {exc}", file=sys.stderr)
        return 2
    if args.ladder:
        return print_ladder(args, overrides)
    if not args.config or len(args.budget or []) > 1:
        print("memplan: error: --config FILE and at most one --budget (or --ladder)",
              file=sys.stderr)
        return 2
    try:
        config = load_config(args.config, overrides, check=False)
        budget = parse_bytes((args.budget or ["12GiB"])[0])
        teacher_cfg, student_cfg = configs_from_training_config(config)
        if args.gpus < 1:
            raise ValueError(f"--gpus must be >= 1, got {args.gpus}")
        return print_plan(args, config, teacher_cfg, student_cfg, budget)
    except (ValueError, OSError) as exc:
        print(f"memplan: error: {exc}", file=sys.stderr)
        return 2


def print_plan(args, config, teacher_cfg, student_cfg, budget: int) -> int:
    """The table for the configured micro-batch and the largest that fits; exit 0 / 1 (fits
    or not). ValueError (e.g. a budget beyond any plan) before anything is printed."""
    planner, common = run_planner(config, teacher_cfg, student_cfg, args.gpus, budget)
    checkpointing = common.pop("activation_checkpointing")
    plan = planner(teacher_cfg, student_cfg, micro_batch=config.batch.micro_batch,
                   activation_checkpointing=checkpointing, **common)
    best, at_best = {}, {}
    for ckpt in (False, True):
        try:
            best[ckpt] = largest_micro_batch(
                teacher_cfg, student_cfg, budget_bytes=budget, activation_checkpointing=ckpt,
                planner=planner, **common)
        except ValueError as exc:
            raise ValueError(f"--budget {(args.budget or ['12GiB'])[0]}: {exc}") from None
        at_best[ckpt] = planner(teacher_cfg, student_cfg, micro_batch=best[ckpt],
                                activation_checkpointing=ckpt, **common).total if best[ckpt] else 0
    print(plan.table(budget))
    print()
    for ckpt in (False, True):
        print(
            f"largest micro_batch x {config.batch.seq_len} within {format_bytes(budget)} "
            f"(activation_checkpointing={ckpt}): {best[ckpt]}"
            + (f"  (predicted {format_bytes(at_best[ckpt])} on the card)" if best[ckpt] else "")
        )
    if args.json:
        out = {
            **JSON_MARK,
            "budget_bytes": budget,
            "plan": plan.to_dict(),
            "largest_micro_batch": {"no_checkpointing": best[False], "checkpointing": best[True]},
        }
        write_json_atomic(Path(args.json), out)  # creates the folder
    return 0 if plan.fits(budget) else 1


def run_planner(config, teacher_cfg, student_cfg, gpus: int, budget: int):
    """(plan function, its arguments) exactly as engine.train plans: one GPU's plan, or under
    dist.strategy=fsdp one GPU's share of `gpus`, the teacher placed as dist.teacher says."""
    sharded = config.dist.teacher == "shard"
    if config.dist.strategy == "fsdp" and config.dist.teacher == "auto" and teacher_cfg:
        sharded, why = choose_teacher_sharding(config, teacher_cfg, student_cfg,
                                               world_size=gpus, budget=budget)
        print(f"teacher: {why}")
    return memory_planner(config, world_size=gpus, teacher_sharded=sharded)


def print_ladder(args, overrides: list[str]) -> int:
    """--ladder: one table per budget; exit 2 on bad input."""
    try:
        if overrides or args.config:
            raise ValueError("--ladder takes no --config and no key overrides")
        budgets = [parse_bytes(b) for b in (args.budget or LADDER_BUDGETS)]
        if args.seq_len < 1:
            raise ValueError(f"--seq-len must be >= 1, got {args.seq_len}")
        rows = ladder(budgets, seq_len=args.seq_len)
    except ValueError as exc:
        print(f"memplan: error: {exc}", file=sys.stderr)
        return 2
    print("\n\n".join(markdown_table(rows, budget) for budget in budgets))
    if args.json:
        write_json_atomic(Path(args.json), {**JSON_MARK, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
