"""Memory plan of a training config: `python -m tools.memplan --config FILE --budget 12GiB`.

Reads the same TOML (and `--section.key=value` overrides) that engine.train reads, takes the
model shapes from the checkpoint folders' config.json when they exist on this machine and
from the built-in Pythia table by name otherwise, and prints the per-component table for the
configured micro-batch plus the largest micro-batch that fits the budget, with and without
activation checkpointing. The plan follows loss.fused_head (default: both LM heads inside the
loss, no logits; --loss.fused_head=false plans the full-logits path). Exits 1 when the
configured micro-batch does not fit, 2 on bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from data.atomic import write_json_atomic
from engine.memory import format_bytes, largest_micro_batch, parse_bytes, plan_memory
from engine.model.config import PYTHIA_SHAPES, GPTNeoXConfig, pythia_config
from engine.train.config import load_config
from engine.train.setup import memory_plan_args


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tools.memplan",
        description="Predict device memory of a distillation config and the largest micro-batch "
        "that fits a budget.",
    )
    parser.add_argument("--config", required=True, help="training TOML (as for engine.train)")
    parser.add_argument("--budget", default="12GiB", help="device memory, e.g. 12GiB (default)")
    parser.add_argument("--json", default="", help="also write the plans as JSON to this path")
    args, overrides = parser.parse_known_args(argv)
    try:
        config = load_config(args.config, overrides, check=False)
        budget = parse_bytes(args.budget)
        teacher_cfg, student_cfg = configs_from_training_config(config)
    except (ValueError, OSError) as exc:
        print(f"memplan: error: {exc}", file=sys.stderr)
        return 2

    common = memory_plan_args(config)  # exactly what engine.train plans with
    checkpointing = common.pop("activation_checkpointing")
    plan = plan_memory(
        teacher_cfg,
        student_cfg,
        micro_batch=config.batch.micro_batch,
        activation_checkpointing=checkpointing,
        **common,
    )
    print(plan.table(budget))
    print()
    best = {}
    for ckpt in (False, True):
        best[ckpt] = largest_micro_batch(
            teacher_cfg, student_cfg, budget_bytes=budget, activation_checkpointing=ckpt, **common
        )
        at_best = (
            plan_memory(teacher_cfg, student_cfg, micro_batch=best[ckpt],
                        activation_checkpointing=ckpt, **common).total
            if best[ckpt]
            else 0
        )
        print(
            f"largest micro_batch x {config.batch.seq_len} within {format_bytes(budget)} "
            f"(activation_checkpointing={ckpt}): {best[ckpt]}"
            + (f"  (predicted {format_bytes(at_best)} on the card)" if best[ckpt] else "")
        )
    if args.json:
        out = {
            "budget_bytes": budget,
            "plan": plan.to_dict(),
            "largest_micro_batch": {"no_checkpointing": best[False], "checkpointing": best[True]},
        }
        write_json_atomic(Path(args.json), out)  # creates the folder
    return 0 if plan.fits(budget) else 1


if __name__ == "__main__":
    sys.exit(main())
