"""Which divergence helps: one distillation per loss.divergence, same base, data, steps, seed.

    python -m benchmarks.divergences [--quickstart runs/quickstart] [--out runs/divergences]
                                     [--tiny] [--json PATH] [--md PATH] [--png PATH]

The quickstart pipeline's teacher and student base (its teacher_pretrain and student_base
exports, its shards) are reused when `--quickstart` holds a finished quickstart; otherwise the
quickstart stages that build them run once here, under `--out`. Then the base is distilled from
the teacher once per divergence (forward_kl, reverse_kl, jsd at beta 0.5, skew_forward_kl and
skew_reverse_kl at skew 0.1, tvd; T^2 scaling on, alpha and T as the quickstart's [distill]),
with the quickstart's [distill] steps, optimizer and seed, plus the CE-only control (its
[control] stage). Every row is then scored on the same held-out split: CE, ppl, and the KD to
the teacher measured with the forward KL for every row (the common yardstick: each run's own
divergence is not comparable across rows), and the median step time of its training.

Writes the table as JSON and Markdown (default benchmarks/results/divergences.{json,md}) and, when
matplotlib is installed, a PNG bar chart of the held-out perplexities. `--tiny` runs the same
code at the quickstart's test size (about a minute). CPU only: this is the quickstart's scale.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import REPO_ROOT, RESULTS_DIR, heldout_vs_teacher, median_step_seconds
from engine.data.atomic import write_json_atomic, write_text_atomic
from engine.data.owned_folder import ForeignFolderError, clear_owned_folder
from engine.eval.compare import save_bar_chart
from engine.kernels.divergences import DIVERGENCES
from engine.quickstart.pipeline import (
    DATA_NAMES,
    DEFAULT_CONFIG,
    MARKER,
    load_settings,
    prepare_data,
    shrink,
    stage_config,
)
from engine.train.loop import run as train_run

OWNER_MARK = "divergences-study.json"  # proves a --out folder is this script's to replace
CONTROL = "ce_only (control)"
CE_ONLY_RUN = "ce_only"  # the control's run folder


def _owned_out_dir(out_dir: Path) -> Path:
    """An empty --out folder, deleting only this script's own earlier output
    (engine.data.owned_folder:
    its mark is there and every entry is one this script writes)."""
    names = (*DATA_NAMES, "teacher_pretrain", "student_base", *DIVERGENCES, CE_ONLY_RUN)
    try:
        clear_owned_folder(out_dir, markers=(OWNER_MARK,), names=names)
    except ForeignFolderError as exc:
        raise SystemExit(f"divergences: error: {exc}: it was not written by this benchmark "
                         "alone; pass --out to use another folder") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / OWNER_MARK, {"started": time.time()})
    return out_dir


def reuse_quickstart(folder: Path) -> dict | None:
    """Paths of a finished quickstart's teacher, student base and shards, or None."""
    marker = folder / MARKER
    if not marker.is_file():
        return None
    summary = json.loads(marker.read_text())
    runs = summary["runs"]
    return {"teacher": runs["teacher_pretrain"]["export_dir"],
            "base": runs["student_base"]["export_dir"], "data_dir": summary["data_dir"],
            "vocab": summary["tokenizer"]["vocab"], "source": str(folder)}


def _fill(out_dir: Path, stage: str, data_dir, vocab: int, **sections) -> dict:
    fill = {"run": {"out_dir": str(out_dir / stage), "resume": "none"},
            "data": {"path": str(data_dir), "valid_vocab": vocab}}
    for name, table in sections.items():
        fill.setdefault(name, {}).update(table)
    return fill


def build_base(settings: dict, out_dir: Path) -> dict:
    """The quickstart's data, teacher and student base, built under out_dir."""
    data = prepare_data(settings["quickstart"], out_dir, lambda name: contextlib.nullcontext())
    model_vocab = (data["vocab"] + 63) // 64 * 64  # the quickstart's rounding (Pythia-like)
    exports = {}
    for stage in ("teacher_pretrain", "student_base"):
        fill = _fill(out_dir, stage, data["data_dir"], data["vocab"],
                     student={"vocab_size": model_vocab}, teacher={"path": ""})
        print(f"[divergences] building {stage}", flush=True)
        exports[stage] = train_run(stage_config(settings, stage, fill))["export_dir"]
    return {"teacher": exports["teacher_pretrain"], "base": exports["student_base"],
            "data_dir": str(data["data_dir"]), "vocab": data["vocab"], "source": "built here"}


def distill_once(settings: dict, base: dict, out_dir: Path, divergence: str | None) -> dict:
    """One continuation of the base: distilled with `divergence`, or CE only (None)."""
    stage = "distill" if divergence else "control"
    name = divergence or CE_ONLY_RUN
    fill = _fill(out_dir, name, base["data_dir"], base["vocab"],
                 teacher={"path": base["teacher"] if divergence else ""},
                 student={"init": "pretrained", "path": base["base"]})
    if divergence:
        fill["loss"] = {"divergence": divergence}
    config = stage_config(settings, stage, fill)
    print(f"[divergences] {name}: {config.run.steps} steps", flush=True)
    result = train_run(config)
    # KD to the teacher in the forward KL, whatever the run trained with: one yardstick.
    metrics = heldout_vs_teacher(result["export_dir"], base["teacher"], base["data_dir"], config,
                                 settings["quickstart"]["eval_batches"])
    return {"divergence": divergence or CONTROL, "steps": config.run.steps,
            "step_time_s": median_step_seconds(result["out_dir"]), "ce": metrics["ce"],
            "ppl": metrics["ppl"], "kd_forward_kl": metrics["kd"],
            "tokens": metrics["tokens"], "export_dir": result["export_dir"]}


def markdown(rows: list[dict], machine: str) -> str:
    lines = ["| divergence | held-out CE | ppl | KD to the teacher (forward KL) | step time |",
             "|---|---:|---:|---:|---:|"]
    best = min(r["ppl"] for r in rows)
    for r in rows:
        ppl = f"**{r['ppl']:.2f}**" if r["ppl"] == best else f"{r['ppl']:.2f}"
        lines.append(f"| {r['divergence']} | {r['ce']:.4f} | {ppl} | {r['kd_forward_kl']:.4f} | "
                     f"{r['step_time_s'] * 1e3:.0f} ms |")
    lines.append("")
    lines.append(f"{rows[0]['tokens']} held-out tokens per row; KD = mean T^2 KL(teacher || "
                 f"student) per token, T = 2, for every row. Machine: {machine}.")
    return "\n".join(lines) + "\n"


def _parse(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="quickstart TOML")
    parser.add_argument("--quickstart", default=str(REPO_ROOT / "runs" / "quickstart"),
                        help="a finished quickstart to reuse the teacher and base of")
    parser.add_argument("--out", default=str(REPO_ROOT / "runs" / "divergences"),
                        help="run folder of this study (replaced only if it wrote it)")
    parser.add_argument("--tiny", action="store_true", help="the quickstart's test size")
    parser.add_argument("--divergences", nargs="+", choices=DIVERGENCES, default=DIVERGENCES,
                        help="the divergences to distill with (default: all six)")
    parser.add_argument("--no-control", action="store_true", help="leave out the CE-only row")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "divergences.json")
    parser.add_argument("--md", type=Path, default=RESULTS_DIR / "divergences.md")
    parser.add_argument("--png", type=Path, default=RESULTS_DIR / "divergences.png")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    settings = load_settings(args.config)
    if args.tiny:
        settings = shrink(settings)
    if settings["quickstart"]["torch_threads"] > 0:
        torch.set_num_threads(settings["quickstart"]["torch_threads"])
    out_dir = _owned_out_dir(Path(args.out))
    started = time.perf_counter()
    base = reuse_quickstart(Path(args.quickstart)) or build_base(settings, out_dir)
    print(f"[divergences] teacher {base['teacher']}, base {base['base']} ({base['source']})")
    runs = [*args.divergences, *([] if args.no_control else [None])]
    rows = [distill_once(settings, base, out_dir, d) for d in runs]
    machine = f"{platform.machine()} CPU, {torch.get_num_threads()} thread(s), " \
              f"torch {torch.__version__}"
    table = markdown(rows, machine)
    print(table)
    write_json_atomic(args.json, {"rows": rows, "base": base, "machine": machine,
                                  "tiny": args.tiny, "wall_s": time.perf_counter() - started})
    write_text_atomic(args.md, table)
    if importlib.util.find_spec("matplotlib") is not None:
        chart = [{"model_label": r["divergence"], "task": "ppl", "name": "held-out",
                  "ppl": r["ppl"]} for r in rows]
        save_bar_chart(chart, args.png)
        print(f"wrote {args.png}")
    print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
