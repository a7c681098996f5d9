"""One distillation training step: the fused head, full logits and a transformers-based step.

    python -m benchmarks.train_step [--seq-len 2048] [--micro-batch 1] [--steps 4] [--smoke]
                                    [--json PATH]

Every variant does the same work on the same token batch: a frozen pythia-160m-shaped teacher
forward, a pythia-70m-shaped student forward + backward of
(1 - alpha) * T^2 * KL(teacher_T || student_T) + alpha * CE over the valid tokens, then an
AdamW step.

- ours: engine.model.GPTNeoX (SDPA attention) through engine.train.step.distill_micro_step with
  the fused heads + loss (loss.fused_head = true, the default): both models stop at their final
  hidden states and engine.kernels.kd_head_loss runs both LM heads chunk by chunk, so neither
  [tokens x vocab] logits tensor ever exists.
- ours_logits: the same step with full logits and kd_loss (loss.fused_head = false), whose
  gradient is written into the logits buffer.
- transformers: GPTNeoXForCausalLM teacher and student with the loss written the naive way
  (log_softmax / softmax over the full logits, KL and CE by autograd).
- optimizer: ours uses fused AdamW, which engine.train builds on CPU and CUDA; the baseline
  uses torch's default AdamW (HF Trainer's "adamw_torch"). --baseline-fused-adamw gives the
  baseline the fused one too, isolating the model + loss difference.

Speed on CPU is measured in tokens per CPU-second of a single-threaded process (--threads 1):
on a shared machine wall-clock time mostly measures the neighbours; the wall-clock ratio is
printed beside it. On a GPU, wall-clock tokens/s.

Each variant runs in its own subprocess so its peak memory (CPU: peak RSS of the process;
CUDA: torch's max allocated) is its own. Default shape: 1 x 2048 tokens (issue 11: the fused
head's peak RSS at least 0.6 GB below full logits, tokens per CPU-second not lower), fp32 on
CPU, bf16 autocast on CUDA. On CPU only ratios are meaningful; absolute numbers are printed for
a GPU. Weights are random: speed and memory do not depend on their values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import (
    REPO_ROOT,
    RESULTS_DIR,
    build_ours,
    build_transformers,
    logits_micro_step,
    make_batch,
    ours_micro_step,
    proc_status_mib,
    transformers_micro_step,
)
from engine.data.atomic import write_json_atomic
from engine.metrics import peak_memory_bytes

DEFAULT_JSON = RESULTS_DIR / "train_step.json"
VARIANTS = ("transformers", "ours_logits", "ours")
MICRO_STEPS = {"ours": ours_micro_step, "ours_logits": logits_micro_step,
               "transformers": transformers_micro_step}


def run_variant(args) -> dict:
    """Time `args.steps` full training steps of one variant in this process."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    autocast = torch.bfloat16 if device.type == "cuda" else None
    student_shape, teacher_shape = args.student, args.teacher
    vocab, valid_vocab = args.vocab, args.valid_vocab
    ours = args.variant != "transformers"
    builder = build_ours if ours else build_transformers
    student = builder(student_shape, vocab, args.seq_len, device, seed=0)
    teacher = builder(teacher_shape, vocab, args.seq_len, device, seed=1).eval()
    teacher.requires_grad_(False)
    student.train()
    # Ours: fused AdamW, as engine.train builds it on CPU and CUDA. The transformers variant:
    # torch's default AdamW (HF Trainer's "adamw_torch"), unless --baseline-fused-adamw.
    fused = ours or args.baseline_fused_adamw
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, fused=fused or None)
    # Some ignored targets (the first eighth of row 0), as padding would give.
    batch = make_batch(args.micro_batch, args.seq_len, valid_vocab, device,
                       ignored_prefix=args.seq_len // 8)
    micro_step = MICRO_STEPS[args.variant]

    def step() -> float:
        stats = micro_step(student, teacher, batch, valid_vocab, None, autocast_dtype=autocast)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(stats["loss"])

    rss_before = int((proc_status_mib("VmRSS") or 0) * 2**20) if device.type == "cpu" else 0
    losses = [step() for _ in range(args.warmup)]
    if device.type == "cuda":
        torch.cuda.synchronize()
    times, cpu_times = [], []
    for _ in range(args.steps):
        start, cpu_start = time.perf_counter(), time.process_time()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    tokens = args.micro_batch * args.seq_len
    best, median = min(times), sorted(times)[len(times) // 2]
    cpu_median = sorted(cpu_times)[len(cpu_times) // 2]
    return {
        "variant": args.variant,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "tokens_per_step": tokens,
        "step_s_median": median,
        "step_s_best": best,
        "tokens_per_s": tokens / median,
        "cpu_s_median": cpu_median,
        "tokens_per_cpu_s": tokens / cpu_median,
        "peak_memory_bytes": peak_memory_bytes(device),
        "rss_before_steps_bytes": rss_before,
        "losses": losses,
        "threads": torch.get_num_threads(),
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="timed steps (median is reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=1,
                        help="run the variants this many times in rotation; report the median")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per variant (1: CPU time is then a stable measure "
                        "of work on a shared machine)")
    parser.add_argument("--baseline-fused-adamw", action="store_true",
                        help="give the transformers variant the fused AdamW too (isolates the "
                        "model + loss difference)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, 1 step: paths only")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--student", default="pythia-70m", help=argparse.SUPPRESS)
    parser.add_argument("--teacher", default="pythia-160m", help=argparse.SUPPRESS)
    parser.add_argument("--vocab", type=int, default=50304, help=argparse.SUPPRESS)
    parser.add_argument("--valid-vocab", type=int, default=50277, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_variants(args) -> dict | None:
    """Each variant in its own process, --rounds times in rotation (a shared machine's busy
    minutes then hit every variant alike); per variant the round with the median speed, with
    every round's speed kept beside it. None when a variant failed."""
    rounds: dict[str, list[dict]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant in VARIANTS:
            result = _run_variant_process(args, variant)
            if result is None:
                return None
            rounds[variant].append(result)
    results = {}
    for variant, rows in rounds.items():
        rows = sorted(rows, key=lambda r: r["tokens_per_cpu_s"])
        results[variant] = {**rows[len(rows) // 2],
                            "rounds_tokens_per_cpu_s": [r["tokens_per_cpu_s"] for r in rows],
                            "rounds_peak_memory_bytes": [r["peak_memory_bytes"] for r in rows]}
    return results


def _run_variant_process(args, variant: str) -> dict | None:
    """One variant's timed steps in a fresh process (its own peak memory)."""
    cmd = [
        sys.executable, "-m", "benchmarks.train_step", "--variant", variant,
        "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
        "--steps", str(args.steps), "--warmup", str(args.warmup), "--student", args.student,
        "--teacher", args.teacher, "--vocab", str(args.vocab),
        "--valid-vocab", str(args.valid_vocab), "--threads", str(args.threads),
    ]
    if args.baseline_fused_adamw:
        cmd.append("--baseline-fused-adamw")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / f"{variant}.json"
        proc = subprocess.run([*cmd, "--result-file", str(out)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(proc.stdout + proc.stderr, file=sys.stderr)
            print(f"error: variant {variant} failed", file=sys.stderr)
            return None
        return json.loads(out.read_text())


def compare(results: dict) -> dict:
    """The ratios the benchmark reports: ours against transformers and against full logits.
    On a (shared) CPU tokens per CPU-second of the single-threaded process measure the work
    without the noise of other processes; on a GPU, wall-clock tokens/s."""
    ours, base, logits = results["ours"], results["transformers"], results["ours_logits"]
    key = "tokens_per_s" if ours["device"] != "cpu" else "tokens_per_cpu_s"
    return {
        "speed_metric": key,
        "tokens_per_s_ratio": ours[key] / base[key],
        "wall_tokens_per_s_ratio": ours["tokens_per_s"] / base["tokens_per_s"],
        "peak_memory_ratio": ours["peak_memory_bytes"] / base["peak_memory_bytes"],
        "fused_vs_logits_tokens_per_s": ours[key] / logits[key],
        "fused_saves_peak_bytes": logits["peak_memory_bytes"] - ours["peak_memory_bytes"],
    }


def print_report(args, results: dict, ratios: dict) -> None:
    ours = results["ours"]
    on_gpu = ours["device"] != "cpu"
    print(f"device: {ours['device']} ({platform.processor() or platform.machine()}, "
          f"{ours['threads']} threads)")
    print(f"shape: student {args.student}, teacher {args.teacher}, vocab {args.vocab}, "
          f"micro-batch {args.micro_batch} x seq {args.seq_len}, {args.steps} timed steps, "
          f"{args.rounds} round(s); "
          f"AdamW: ours fused, transformers "
          f"{'fused' if args.baseline_fused_adamw else 'default (foreach)'}")
    header = (f"{'variant':<14}{'step (median)':>16}{'tokens/s':>12}{'tokens/CPU-s':>14}"
              f"{'peak memory':>16}")
    print(header)
    print("-" * len(header))
    for name in VARIANTS:
        r = results[name]
        step_text = f"{r['step_s_median'] * 1e3:.1f} ms" if on_gpu else "-"
        tps = f"{r['tokens_per_s']:,.0f}" if on_gpu else "-"
        print(f"{name:<14}{step_text:>16}{tps:>12}{r['tokens_per_cpu_s']:>14,.0f}"
              f"{r['peak_memory_bytes'] / 2**20:>13.0f} MiB")
    what = "tokens/s" if on_gpu else "tokens per CPU-second"
    print(f"ours / transformers: {what} x{ratios['tokens_per_s_ratio']:.2f} (wall-clock "
          f"x{ratios['wall_tokens_per_s_ratio']:.2f}), peak memory "
          f"x{ratios['peak_memory_ratio']:.2f}")
    print(f"fused head / full logits: {what} x{ratios['fused_vs_logits_tokens_per_s']:.2f} "
          f"(target >= 1), peak {'allocated' if on_gpu else 'RSS'} lower by "
          f"{ratios['fused_saves_peak_bytes'] / 2**30:.2f} GiB (target >= 0.6 GB)")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.variant:  # child process: one variant, result to a file
        result = run_variant(args)
        args.result_file.write_text(json.dumps(result))
        return 0
    if args.smoke:
        args.student, args.teacher = "tiny-student", "tiny-teacher"
        args.vocab, args.valid_vocab = 1000, 990
        args.seq_len, args.steps, args.warmup = 32, 1, 1
    results = run_variants(args)
    if results is None:
        return 1
    ratios = compare(results)
    print_report(args, results, ratios)
    summary = {
        "benchmark": "train_step",
        "shape": {"student": args.student, "teacher": args.teacher, "vocab": args.vocab,
                  "micro_batch": args.micro_batch, "seq_len": args.seq_len,
                  "steps": args.steps, "smoke": args.smoke, "threads": args.threads,
                  "rounds": args.rounds,
                  "baseline_fused_adamw": args.baseline_fused_adamw},
        "results": results,
        **ratios,
    }
    write_json_atomic(args.json, summary)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
