"""On-policy distillation at quickstart scale: off-policy, mixed and on-policy, per step and
per second.

    python -m benchmarks.on_policy [--quickstart DIR] [--out DIR] [--json PATH] [--tiny]

From the quickstart's student base, distil from its teacher with the quickstart's distill
settings (teacher.dtype fp32: a CPU has no bf16 units) at onpolicy.fraction (GKD's lambda)
0, 0.5 and 1, one divergence for all (DIVERGENCE), prompt + new tokens = half the window each.

(a) Equal optimizer steps: every lambda runs the quickstart's distill steps.
(b) Equal time: time is CPU time, not the clock: on a shared machine the wall clock of a step
    (the records' step_time_s) measures the neighbours' load as much as the step, and can
    swamp the lambda 0 / 1 difference (benchmarks/README.md). So `step_costs` first times an
    off-policy (lambda 0) and an on-policy (lambda 1) optimizer step of the run's own models
    and settings in CPU seconds of this single-threaded process, interleaved, through the
    trainer's own pieces (OnPolicyTeacher.prepare_window, distill_micro_step, fused AdamW);
    a mixed step costs their mean (every other step samples). The budget is the on-policy
    run's steps x its step cost; lambda 0 and 0.5 are run again, afresh, for round(budget /
    their step cost) steps, so each run's cosine schedule still ends at its last step. The
    records' summed step_time_s is reported beside it, as measured.

Every run reports: held-out ppl and the last-word task of its export (the quickstart's
held_out), the teacher's NLL of the student's own samples on held-out prompts (the same
prompts and sampling seed for every model), the median step time and the records' mean
onpolicy_generation_share. Checkpoints every quarter of a run give the chart (held-out ppl from
the val records, sample NLL from each checkpoint, both against steps x step cost). The step
costs also say where the time goes (same windows, seq_len = prompt + new tokens): sampling,
teacher prefill (the teacher's forward alone, timed beside each step) and the rest (student
forward + backward with the loss, the teacher NLL of the samples, the optimizer).

--quickstart reuses a finished quickstart folder (read only: everything is written under
--out); without it the quickstart runs first under --out. CPU only; numbers in
benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, quickstart_study, write_json
from engine.data.loader import build_dataset
from engine.eval.heldout import heldout_batches, heldout_loader
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.loss_spec import LossSpec
from engine.metrics import read_records
from engine.model.hf_io import load_pretrained
from engine.on_policy import SamplingSettings, student_batch, teacher_nll_sum
from engine.quickstart import pipeline as quickstart
from engine.sampling import new_generator
from engine.train.checkpoint import complete_checkpoints
from engine.train.loop import run as train_run
from engine.train.on_policy_signal import OnPolicyTeacher
from engine.train.step import distill_micro_step
from engine.train.teacher_signal import LiveTeacher

FRACTIONS = (0.0, 0.5, 1.0)
NAMES = {0.0: "off-policy", 0.5: "mixed", 1.0: "on-policy"}
# Reverse KL: the divergence MiniLLM and the 2025 on-policy distillation results train on
# the student's samples, and on them it is the teacher NLL of the samples minus the
# student's entropy, the quantity this study measures. One divergence for all three runs.
DIVERGENCE = "reverse_kl"
PROMPT_BATCHES = 8  # held-out micro-batches whose prefixes prompt the sample-NLL measure
NLL_SEED = 1234  # the sampler seed of that measure, the same for every model
COST_REPEATS = 8  # interleaved off- and on-policy steps timed, after one warm-up of each


def run_config(settings, summary, fraction: float, steps: int, out_dir: Path):
    """The quickstart's distill stage at onpolicy.fraction, fp32 teacher, DIVERGENCE."""
    base = quickstart.stage_config(settings, "distill", {}, check=False)
    half = base.batch.seq_len // 2
    every = max(1, steps // 4)
    fill = {
        "run": {"out_dir": str(out_dir), "resume": "none", "steps": steps,
                "tokenizer": summary["tokenizer"]["path"], "save_every": every,
                "keep_last": steps, "val_every": every,
                "val_batches": settings["quickstart"]["eval_batches"]},
        "data": {"path": summary["data_dir"], "valid_vocab": summary["tokenizer"]["vocab"]},
        "teacher": {"path": summary["runs"]["teacher_pretrain"]["export_dir"], "dtype": "fp32"},
        "student": {"init": "pretrained", "path": summary["runs"]["student_base"]["export_dir"]},
        "loss": {"divergence": DIVERGENCE},
        "onpolicy": {"fraction": fraction, "prompt_tokens": half, "new_tokens": half},
    }
    return quickstart.stage_config(settings, "distill", fill)


def sampling_settings(config) -> SamplingSettings:
    return SamplingSettings.of(config.onpolicy, config.data.valid_vocab or None)


def heldout_windows(config) -> list[dict]:
    """PROMPT_BATCHES held-out micro-batches (val split): their prefixes are the sample-NLL
    measure's prompts, and the step costs are timed on them."""
    dataset = build_dataset(Path(config.data.path), "packed", config.batch.seq_len)
    loader = heldout_loader(dataset, config.batch.micro_batch,
                            val_fraction=config.data.val_fraction)
    return list(heldout_batches(loader, max_batches=PROMPT_BATCHES))


@torch.no_grad()
def sample_nll(model_dir, teacher, prompts, settings: SamplingSettings) -> float:
    """The teacher's mean NLL (nats per token) of the model's own continuations of `prompts`,
    sampled from NLL_SEED: lower is output the teacher finds more likely."""
    model = load_pretrained(model_dir, dtype=torch.float32, device="cpu").eval()
    generator = new_generator(NLL_SEED)
    total, count = 0.0, 0
    for window in prompts:
        batch = student_batch(model, window["input_ids"], settings, generator=generator)
        logits = teacher(batch["input_ids"])[..., : settings.valid_vocab or None]
        total += float(teacher_nll_sum(logits, batch["labels"]))
        count += int((batch["labels"] != IGNORE_INDEX).sum())
    return total / count


def run_timeline(metrics_path: Path) -> dict[str, Any]:
    """Cumulative step time at each step, val ppl by step, and the train records' summaries."""
    records = read_records(metrics_path)
    train = [r for r in records if r.get("kind") == "train"]
    cumulative, total = {0: 0.0}, 0.0
    for r in train:
        total += r["step_time_s"]
        cumulative[r["step"]] = total
    shares = [r["onpolicy_generation_share"] for r in train
              if r.get("onpolicy_generation_share") is not None]
    nlls = [r["onpolicy_teacher_nll"] for r in train if r.get("onpolicy_teacher_nll") is not None]
    return {
        "cumulative_s": cumulative,
        "val_ppl": {r["step"]: r["val_ppl"] for r in records if r.get("kind") == "val"},
        "step_time_s": total,
        "median_step_s": statistics.median(r["step_time_s"] for r in train),
        "generation_share": statistics.mean(shares) if shares else 0.0,
        "train_teacher_nll_last": nlls[-1] if nlls else None,
    }


def chart_points(result: dict, timeline: dict, teacher, prompts, settings, base: dict) -> list:
    """(step, held-out ppl, sample NLL) at step 0 (the base) and at each checkpoint."""
    points = [(0, base["ppl"], base["sample_nll"])]
    for step, folder in complete_checkpoints(result["out_dir"]):
        if step in timeline["val_ppl"]:
            points.append((step, timeline["val_ppl"][step],
                           sample_nll(folder / "student", teacher, prompts, settings)))
    return points


def study_run(ctx: dict, fraction: float, steps: int, label: str) -> dict:
    """Distil at `fraction` for `steps`; the row of the table and its chart points."""
    config = run_config(ctx["settings"], ctx["summary"], fraction, steps, ctx["out"] / label)
    print(f"[on_policy] {label}: lambda {fraction}, {steps} steps", flush=True)
    result = train_run(config)
    if result.get("status") != "completed":
        raise SystemExit(f"{label}: training ended with status {result.get('status')!r}")
    summary = ctx["summary"]
    metrics = quickstart.held_out(
        result["export_dir"], Path(summary["data_dir"]), config,
        teacher_dir=summary["runs"]["teacher_pretrain"]["export_dir"],
        eval_batches=ctx["settings"]["quickstart"]["eval_batches"],
        last_word=Path(summary["last_word_task"]),
        tokenizer_path=Path(summary["tokenizer"]["path"]),
    )
    timeline = run_timeline(Path(result["metrics_path"]))
    points = chart_points(result, timeline, ctx["teacher"], ctx["prompts"], ctx["sampling"],
                          ctx["base"])
    step_cost = ctx["costs"]["per_step_s"][fraction]
    return {"run": label, "fraction": fraction, "steps": steps,
            "step_cost_s": round(step_cost, 4), "cpu_time_s": round(steps * step_cost, 2),
            "step_time_s": round(timeline["step_time_s"], 2),
            "median_step_s": round(timeline["median_step_s"], 4),
            "generation_share": round(timeline["generation_share"], 4),
            "train_teacher_nll_last": timeline["train_teacher_nll_last"],
            "ppl": metrics["ppl"], "kd": metrics.get("kd"),
            "last_word_ppl": metrics["last_word_ppl"], "last_word_acc": metrics["last_word_acc"],
            "sample_nll": points[-1][2], "points": points, "out_dir": result["out_dir"]}


@torch.no_grad()
def prefill_seconds(teacher, ids: torch.Tensor) -> float:
    """CPU seconds of the teacher's no-grad forward to its final hidden states (what the fused
    head reads): the prefill inside a step, timed alone on the same positions."""
    t0 = time.process_time()
    teacher(ids, return_hidden=True)
    return time.process_time() - t0


def timed_step(student, optimizer, signal, window: dict, spec, step: int, teacher) -> dict:
    """One optimizer step as the trainer runs it (signal.prepare_window writes an on-policy
    micro-batch, distill_micro_step, the optimizer), in CPU seconds, split: "sampling_s" is
    prepare_window's time (at lambda 0 only its bookkeeping, counting the labels)."""
    t0 = time.process_time()
    batch = signal.prepare_window([window], student, step)[0]
    t1 = time.process_time()
    normalizer = float((batch["labels"] != IGNORE_INDEX).sum())
    distill_micro_step(student, signal, batch, spec, normalizer=normalizer)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    t2 = time.process_time()
    return {"step_s": t2 - t0, "sampling_s": t1 - t0,
            "teacher_prefill_s": prefill_seconds(teacher, batch["input_ids"]),
            "positions": list(batch["input_ids"].shape)}


def step_costs(ctx: dict, config) -> dict:
    """Median CPU seconds of an off-policy and an on-policy optimizer step (module docstring,
    (b)), COST_REPEATS of each, interleaved so that a neighbour's burst hits both alike."""
    student = load_pretrained(ctx["summary"]["runs"]["student_base"]["export_dir"],
                              dtype=torch.float32, device="cpu").train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.optim.lr,
                                  betas=tuple(config.optim.betas), fused=True)
    live = LiveTeacher(ctx["teacher"])
    signals = {name: OnPolicyTeacher(live, ctx["sampling"], fraction=fraction, accum_steps=1,
                                     seed=0, rank=0, device=torch.device("cpu"))
               for name, fraction in (("off-policy", 0.0), ("on-policy", 1.0))}
    spec = LossSpec(alpha=config.loss.alpha, temperature=config.loss.temperature,
                    divergence=DIVERGENCE, valid_vocab=config.data.valid_vocab or None)
    window = {k: v[:, : ctx["sampling"].length] for k, v in ctx["prompts"][0].items()}
    times: dict[str, list[dict]] = {name: [] for name in signals}
    for repeat in range(COST_REPEATS + 1):
        for name, signal in signals.items():
            timed = timed_step(student, optimizer, signal, window, spec, repeat, ctx["teacher"])
            if repeat:  # the first of each is the warm-up
                times[name].append(timed)
    split = {}
    for name, runs in times.items():
        median = {key: statistics.median(r[key] for r in runs)
                  for key in ("step_s", "sampling_s", "teacher_prefill_s")}
        median["student_and_rest_s"] = (median["step_s"] - median["sampling_s"]
                                        - median["teacher_prefill_s"])
        split[name] = {**{k: round(v, 4) for k, v in median.items()},
                       "positions": runs[0]["positions"]}
    off, on = split["off-policy"]["step_s"], split["on-policy"]["step_s"]
    return {**split, "ratio": round(on / off, 3), "clock": "process CPU seconds, 1 thread",
            "per_step_s": {0.0: off, 0.5: (off + on) / 2, 1.0: on}}


def equal_time_steps(budget_s: float, step_cost_s: float) -> int:
    """Steps of `step_cost_s` each that fill budget_s (at least one)."""
    return max(1, round(budget_s / step_cost_s))


def draw_chart(rows: list[dict], path: Path) -> str | None:
    """Held-out ppl and sample NLL against steps x step cost (CPU s): solid lines the on-policy
    run and the equal-time runs, dashed the equal-step runs (None without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("[on_policy] chart skipped: pip install matplotlib")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    colours = {0.0: "tab:blue", 0.5: "tab:orange", 1.0: "tab:green"}
    for row in rows:
        steps, ppls, nlls = zip(*row["points"], strict=True)
        times = [step * row["step_cost_s"] for step in steps]
        style = "--" if row["run"].endswith("equal steps") and row["fraction"] < 1 else "-"
        for ax, values in zip(axes, (ppls, nlls), strict=True):
            ax.plot(times, values, style, marker="o", markersize=3,
                    color=colours[row["fraction"]], label=row["run"])
    axes[0].set_ylabel("held-out perplexity")
    axes[1].set_ylabel("teacher NLL of the student's samples (nats/token)")
    for ax in axes:
        ax.set_xlabel("steps x step cost (CPU s, 1 thread)")
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"on-policy distillation at quickstart scale ({DIVERGENCE})")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    staged = path.with_name(f".{path.name}.{os.getpid()}.tmp.png")
    fig.savefig(staged, dpi=110)  # then renamed: no half-written chart replaces a good one
    plt.close(fig)
    os.replace(staged, path)
    return str(path)


def markdown(rows: list[dict], base: dict, cost: dict) -> str:
    lines = ["| run | lambda | steps | CPU time (s) | records' step time (s) | median step (s) "
             "| generation share | held-out ppl | held-out KD | last-word ppl | last-word acc "
             "| teacher NLL of own samples |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| student base | - | 0 | - | - | - | - | {base['ppl']:.2f} | {base['kd']:.3f} | "
             f"{base['last_word_ppl']:.1f} | {base['last_word_acc']:.3f} | "
             f"{base['sample_nll']:.3f} |"]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['fraction']} | {r['steps']} | {r['cpu_time_s']:.1f} | "
            f"{r['step_time_s']:.1f} | "
            f"{r['median_step_s']:.3f} | {r['generation_share']:.1%} | {r['ppl']:.2f} | "
            f"{r['kd']:.3f} | "
            f"{r['last_word_ppl']:.1f} | {r['last_word_acc']:.3f} | {r['sample_nll']:.3f} |")
    lines += ["", "| step (median CPU s) | total | sampling | teacher prefill "
              "| student fwd+bwd, loss, optimizer |", "|---|---:|---:|---:|---:|"]
    for name in ("off-policy", "on-policy"):
        c = cost[name]
        lines.append(f"| {name} ({c['positions'][0]} x {c['positions'][1]}) | {c['step_s']:.3f} "
                     f"| {c['sampling_s']:.3f} | {c['teacher_prefill_s']:.3f} | "
                     f"{c['student_and_rest_s']:.3f} |")
    lines.append(f"\non-policy / off-policy step time: {cost['ratio']:.2f}x")
    return "\n".join(lines) + "\n"


def study(ctx: dict, steps: int) -> list[dict]:
    """(a) every lambda at `steps`; (b) lambda 0 and 0.5 again at the on-policy run's CPU
    time (steps x its step cost)."""
    rows = [study_run(ctx, f, steps, f"{NAMES[f]}, equal steps") for f in FRACTIONS]
    cost = ctx["costs"]["per_step_s"]
    for fraction in FRACTIONS[:-1]:
        n = equal_time_steps(steps * cost[1.0], cost[fraction])
        rows.append(study_run(ctx, fraction, n, f"{NAMES[fraction]}, equal time"))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.on_policy",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--quickstart", help="a finished quickstart folder to reuse (read only)")
    parser.add_argument("--out", default="runs/on_policy", help="run folders go here")
    parser.add_argument("--json", default=str(RESULTS_DIR / "on_policy.json"))
    parser.add_argument("--chart", default=None,
                        help="the PNG (default: beside --json, same name)")
    parser.add_argument("--tiny", action="store_true", help="the quickstart's --tiny scale")
    args = parser.parse_args(argv)
    settings, summary = quickstart_study(args)
    steps = quickstart.stage_config(settings, "distill", {}, check=False).run.steps
    reference = run_config(settings, summary, 1.0, steps, Path(args.out))
    teacher = load_pretrained(summary["runs"]["teacher_pretrain"]["export_dir"],
                              dtype=torch.float32, device="cpu").eval()
    ctx = {"settings": settings, "summary": summary, "out": Path(args.out), "teacher": teacher,
           "prompts": heldout_windows(reference), "sampling": sampling_settings(reference)}
    base = next(r for r in summary["rows"] if r["stage"] == "student_base")
    base["sample_nll"] = sample_nll(summary["runs"]["student_base"]["export_dir"], teacher,
                                    ctx["prompts"], ctx["sampling"])
    ctx["base"] = base
    ctx["costs"] = cost = step_costs(ctx, reference)
    print(f"[on_policy] step costs (CPU s): off-policy {cost['off-policy']['step_s']:.3f}, "
          f"on-policy {cost['on-policy']['step_s']:.3f} (x{cost['ratio']:.2f})", flush=True)
    rows = study(ctx, steps)
    chart = draw_chart(rows, Path(args.chart or Path(args.json).with_suffix(".png")))
    table = markdown(rows, base, cost)
    print(table)
    write_json(Path(args.json), {
        "machine": {"cpu": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "python": platform.python_version(),
                    "torch_threads": torch.get_num_threads()},
        "divergence": DIVERGENCE, "prompt_tokens": ctx["sampling"].prompt_tokens,
        "new_tokens": ctx["sampling"].new_tokens, "steps": steps,
        "time_budget_s": rows[2]["cpu_time_s"], "base": base, "rows": rows,
        "step_cost": cost, "chart": chart, "table": table, "tiny": args.tiny,
    })
    print(f"results written to {args.json}" + (f", chart {chart}" if chart else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
