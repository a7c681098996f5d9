"""The seed's optimizer in three precisions, at quickstart scale: what pure bf16 costs.

    python -m benchmarks.precision_study [--quickstart DIR] [--out DIR] [--json PATH] [--tiny]

The seed trained with bf16 weights and AdamW state, lr 1e-4 constant, no warmup. This
distils the quickstart's student base from its teacher exactly so (betas 0.9/0.999, no weight
decay, no clipping, alpha 0.5, T 2, the quickstart's steps and batches) in precision fp32,
bf16-autocast and bf16-pure, and prints one table: held-out ppl and its gain over the base
(and that gain as a share of the fp32 run's), the LAMBADA-style last-word score, and the mean
update_lost_frac / update_lost_weighted of the run (engine/train/lost_updates.py). Every run
watches the last-word task (eval.tasks) like a real run would.

--quickstart reuses a finished quickstart folder (its data, tokenizer, teacher and base);
without it the quickstart runs first under --out. CPU only; numbers in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, quickstart_study, write_json
from engine.metrics import read_records
from engine.quickstart import pipeline as quickstart
from engine.train.loop import run as train_run

PRECISIONS = ("fp32", "bf16-autocast", "bf16-pure")
SEED_OPTIMIZER = {"lr": 1e-4, "schedule": "constant", "warmup_steps": 0, "min_lr": 0.0,
                  "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0, "grad_clip": 0.0}
WATCH_EVERY = 20  # steps between last-word scores during each run


def study_config(settings, summary: dict[str, Any], precision: str, out_dir: Path):
    """The quickstart's distill stage with the seed's optimizer in `precision`."""
    runs = summary["runs"]
    fill = {
        "run": {"out_dir": str(out_dir), "resume": "none",
                "tokenizer": summary["tokenizer"]["path"]},
        "data": {"path": summary["data_dir"], "valid_vocab": summary["tokenizer"]["vocab"]},
        "teacher": {"path": runs["teacher_pretrain"]["export_dir"]},
        "student": {"init": "pretrained", "path": runs["student_base"]["export_dir"]},
        "optim": SEED_OPTIMIZER,
        "eval": {"tasks": [f"lambada={summary['last_word_task']}"], "every": WATCH_EVERY},
        "precision": precision,
    }
    return quickstart.stage_config(settings, "distill", fill)


def lost_update_means(metrics_path: Path) -> dict[str, float | None]:
    """Mean of each lost-update field over the run's train records (None when not logged)."""
    records = [r for r in read_records(metrics_path) if r.get("kind") == "train"]
    means = {}
    for key in ("update_lost_frac", "update_lost_weighted"):
        values = [r[key] for r in records if r.get(key) is not None]
        means[key] = sum(values) / len(values) if values else None
    return means


def study_row(settings, summary, precision: str, out: Path, eval_batches: int) -> dict:
    """Distil in one precision; held-out and last-word scores of its export, lost updates."""
    config = study_config(settings, summary, precision, out / precision)
    started = time.perf_counter()
    result = train_run(config)
    seconds = time.perf_counter() - started
    metrics = quickstart.held_out(
        result["export_dir"], Path(summary["data_dir"]), config,
        teacher_dir=summary["runs"]["teacher_pretrain"]["export_dir"],
        eval_batches=eval_batches, last_word=Path(summary["last_word_task"]),
        tokenizer_path=Path(summary["tokenizer"]["path"]),
    )
    return {"precision": precision, "steps": config.run.steps, "train_s": round(seconds, 1),
            **metrics, **lost_update_means(Path(result["metrics_path"]))}


def with_gains(rows: list[dict], base: dict) -> list[dict]:
    """Each row's held-out ppl gain over the base, and that gain as a share of fp32's."""
    fp32 = next(r for r in rows if r["precision"] == "fp32")
    fp32_gain = base["ppl"] - fp32["ppl"]
    for row in rows:
        row["ppl_gain"] = base["ppl"] - row["ppl"]
        row["share_of_fp32_gain"] = row["ppl_gain"] / fp32_gain if fp32_gain else None
    return rows


def markdown(rows: list[dict], base: dict) -> str:
    def number(value, spec):
        return "-" if value is None else format(value, spec)

    lines = ["| precision | held-out ppl | gain over base | share of fp32 gain | last-word ppl "
             "| last-word acc | update_lost_frac | update_lost_weighted |",
             "|---|---:|---:|---:|---:|---:|---:|---:|",
             f"| student base | {base['ppl']:.2f} | - | - | {base['last_word_ppl']:.1f} | "
             f"{base['last_word_acc']:.3f} | - | - |"]
    for row in rows:
        lines.append(
            f"| {row['precision']} | {row['ppl']:.2f} | {row['ppl_gain']:.2f} | "
            f"{number(row['share_of_fp32_gain'], '.0%')} | {row['last_word_ppl']:.1f} | "
            f"{row['last_word_acc']:.3f} | {number(row['update_lost_frac'], '.3f')} | "
            f"{number(row['update_lost_weighted'], '.3f')} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.precision_study",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", help="a finished quickstart folder to reuse")
    parser.add_argument("--out", default="runs/precision_study", help="run folders go here")
    parser.add_argument("--json", default=str(RESULTS_DIR / "precision_study.json"))
    parser.add_argument("--tiny", action="store_true", help="the quickstart's --tiny scale")
    args = parser.parse_args(argv)
    settings, summary = quickstart_study(args)
    base = next(r for r in summary["rows"] if r["stage"] == "student_base")
    eval_batches = settings["quickstart"]["eval_batches"]
    rows = with_gains([study_row(settings, summary, p, Path(args.out), eval_batches)
                       for p in PRECISIONS], base)
    table = markdown(rows, base)
    print(table)
    write_json(Path(args.json), {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version()},
        "quickstart": summary["runs"], "seed_optimizer": SEED_OPTIMIZER,
        "base": base, "rows": rows, "table": table,
    })
    print(f"results written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
