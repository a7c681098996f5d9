"""Offline teacher: online KD vs top-k caches vs sampled caches vs CE only, side by side.

    python -m benchmarks.teacher_cache [--base runs/quickstart] [--json PATH] [--smoke]

At quickstart scale (engine/quickstart/quickstart.toml): the quickstart's pretrained teacher,
student base
and shards (reused from --base when present, else built there by `python -m engine.quickstart`)
are distilled with the quickstart's [distill] recipe (same data, steps, seed, optimizer) once
per teacher signal:

  online      the live teacher (teacher.path), as the quickstart does
  top-8/64    a cache of the teacher's 8 / 64 most likely tokens + the tail (teacher.cache)
  sampled-8/32  a cache of 8 / 32 draws from the teacher
  ce-only     no teacher (the quickstart's control)

Reported per row: held-out CE / ppl (and KD to the real teacher) on the quickstart's val split,
the run's median wall-clock step time, and for caches the bytes per token and the build time.

Two side-by-side measurements, each in one run:
  * cache build vs the teacher's own forward: tokens/s of building each cache against tokens/s
    of the teacher's plain forward (full logits, same dtype, same batches) over the same data,
    the forward timed before and after the builds (target: build >= 0.9x forward): whole
    builds at the quickstart shapes, and at the seed shapes (random pythia-160m, V 50304) the
    steady state, a build over a few other windows subtracted (benchmarks.common);
  * student step from a top-64 cache vs the online step (teacher forward + dense KD), both a
    full training step (micro-step + AdamW) on the same batch, alternated, in CPU seconds of
    this single-threaded process (wall clock printed beside it): at the quickstart shapes (the
    real models and cache) and at the seed shapes (pythia-160m teacher, pythia-70m student,
    vocab 50304, random weights, 2 x 256 tokens) (target: >= 1.5x).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    ALPHA,
    REPO_ROOT,
    RESULTS_DIR,
    TEMPERATURE,
    build_ours,
    cache_build_rates,
    heldout_vs_teacher,
    make_batch,
    mean_tail_mass,
    median_step_seconds,
    random_top_k_batch,
    seed_cache_build_rates,
    write_json,
)
from engine.data.loader import build_dataset
from engine.data.teacher_cache import CachedTargets, TeacherCache
from engine.kernels.loss_spec import LossSpec
from engine.model.hf_io import load_pretrained
from engine.precision import dtype_of
from engine.quickstart import pipeline as quickstart
from engine.teacher_cache import build_teacher_cache
from engine.train.loop import run as train_run
from engine.train.setup import build_optimizer
from engine.train.step import distill_micro_step
from engine.train.teacher_signal import CachedTeacher, LiveTeacher

DEFAULT_JSON = RESULTS_DIR / "teacher_cache.json"
CACHES = {"top-8": dict(top_k=8), "top-64": dict(top_k=64), "sampled-8": dict(samples=8),
          "sampled-32": dict(samples=32)}
ROWS = ("online", *CACHES, "ce-only")


# ----------------------------------------------------------------------------- the base


def locate_base(base: Path, smoke: bool) -> dict:
    """Teacher, student base, shards and tokenizer of a quickstart folder (built when absent)."""
    marker = base / quickstart.MARKER
    if not marker.is_file():
        args = ["--out-dir", str(base)] + (["--tiny"] if smoke else [])
        print(f"[teacher_cache] no quickstart at {base}: running python -m engine.quickstart "
              f"{' '.join(args)}", flush=True)
        if quickstart.main(args) not in (0, 1):  # 1: it ran but the verdict was negative
            raise SystemExit(f"{base}: the quickstart could not build the base models")
    summary = json.loads(marker.read_text())
    return {"teacher": Path(summary["runs"]["teacher_pretrain"]["export_dir"]),
            "student": Path(summary["runs"]["student_base"]["export_dir"]),
            "data": Path(summary["data_dir"]), "tokenizer": Path(summary["tokenizer"]["path"]),
            "vocab": summary["tokenizer"]["vocab"], "tiny": summary.get("tiny", False)}


def row_config(settings, base, out_dir: Path, row: str, caches: dict):
    """The quickstart's [distill] stage configuration with this row's teacher signal."""
    teacher = {"path": str(base["teacher"]) if row == "online" else "",
               "cache": str(caches[row]) if row in CACHES else ""}
    fill = {"run": {"out_dir": str(out_dir), "resume": "none",
                    "tokenizer": str(base["tokenizer"])},
            "data": {"path": str(base["data"]), "valid_vocab": base["vocab"]},
            "teacher": teacher,
            "student": {"init": "pretrained", "path": str(base["student"])}}
    return quickstart.stage_config(settings, "distill", fill)


# ----------------------------------------------------------------------------- cache builds


def build_caches(base, config, root: Path) -> tuple[dict, dict]:
    """({row: cache folder}, build measurements incl. the teacher-forward comparison)."""
    build = cache_build_rates(base["teacher"], base["data"], root, CACHES,
                              seq_len=config.batch.seq_len, dtype=config.teacher.dtype,
                              temperature=config.loss.temperature)
    return {name: root / name for name in CACHES}, build


# ----------------------------------------------------------------------------- training rows


def train_row(settings, base, out_dir: Path, row: str, caches: dict,
              temperature: float | None = None) -> dict:
    """Distill with one teacher signal; its held-out numbers against the real teacher."""
    config = row_config(settings, base, out_dir, row, caches)
    if temperature is not None:
        config.loss.temperature = temperature
    result = train_run(config)
    held = heldout_vs_teacher(result["export_dir"], base["teacher"], base["data"], config,
                              settings["quickstart"]["eval_batches"])
    print(f"[teacher_cache] {row} (T {config.loss.temperature}): held-out ppl "
          f"{held['ppl']:.3f}", flush=True)
    return {"val_ce": held["ce"], "val_ppl": held["ppl"], "val_kd": held["kd"],
            "tokens": held["tokens"], "steps": config.run.steps,
            "temperature": config.loss.temperature,
            "step_time_s": median_step_seconds(result["out_dir"]),
            "train_kd_last": result["final_metrics"].get("kd")}


def train_rows(settings, base, root: Path, caches: dict) -> dict:
    rows = {row: train_row(settings, base, root / "runs" / row, row, caches) for row in ROWS}
    for row in rows.values():
        row["ppl_vs_online"] = row["val_ppl"] / rows["online"]["val_ppl"]
    return rows


def contrast_rows(settings, base, root: Path, config) -> dict:
    """Online vs top-64 at T = 1, where the teacher's top 64 columns hold most of its mass."""
    cache = root / "caches" / "top-64-T1"
    build_teacher_cache(str(base["teacher"]), str(base["data"]), str(cache), top_k=64,
                        temperature=1.0, seq_len=config.batch.seq_len, batch=8,
                        dtype=config.teacher.dtype, device="cpu", show_progress=False)
    rows = {row: train_row(settings, base, root / "runs" / f"{row}-T1", row, {"top-64": cache},
                           temperature=1.0) for row in ("online", "top-64")}
    rows["top-64"]["mean_tail_mass"] = mean_tail_mass(cache)
    rows["top-64"]["ppl_vs_online"] = rows["top-64"]["val_ppl"] / rows["online"]["val_ppl"]
    return rows


# ----------------------------------------------------------------------------- step ratio


def _timed_step(student, source, batch, optimizer, valid_vocab):
    """(CPU seconds, wall seconds) of one training step: micro-step + AdamW."""
    c0, w0 = time.process_time(), time.perf_counter()
    spec = LossSpec(alpha=ALPHA, temperature=TEMPERATURE, valid_vocab=valid_vocab)
    distill_micro_step(student, source, batch, spec, normalizer=None)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return time.process_time() - c0, time.perf_counter() - w0


def step_ratio(make_student, teacher, batch, valid_vocab, config, steps: int) -> dict:
    """Online step vs cache step on the same batch (the batch carries the cache's targets),
    alternated one step at a time so both see the same machine load."""
    sources = {"online": LiveTeacher(teacher), "cache": CachedTeacher(None)}
    students = {name: make_student() for name in sources}
    optimizers = {name: build_optimizer(config, students[name], torch.device("cpu"))
                  for name in sources}
    samples = {name: ([], []) for name in sources}
    for name in sources:  # warm-up
        _timed_step(students[name], sources[name], batch, optimizers[name], valid_vocab)
    for _ in range(steps):
        for name in sources:
            cpu, wall = _timed_step(students[name], sources[name], batch, optimizers[name],
                                    valid_vocab)
            samples[name][0].append(cpu)
            samples[name][1].append(wall)
    out = {name: {"cpu_s": statistics.median(c), "wall_s": statistics.median(w)}
           for name, (c, w) in samples.items()}
    out["speedup_cpu"] = out["online"]["cpu_s"] / out["cache"]["cpu_s"]
    out["speedup_wall"] = out["online"]["wall_s"] / out["cache"]["wall_s"]
    return out


def quickstart_step_ratio(base, config, cache_folder: Path, steps: int) -> dict:
    """The step ratio at the quickstart shapes: its real teacher, student base and top-64 cache."""
    dataset = build_dataset(base["data"], "packed", config.batch.seq_len)
    cached = CachedTargets(dataset, TeacherCache(cache_folder))
    batch = cached.get_batch(np.arange(config.batch.micro_batch))
    teacher = load_pretrained(base["teacher"], dtype=dtype_of(config.teacher.dtype)).eval()
    teacher.requires_grad_(False)
    return step_ratio(lambda: load_pretrained(base["student"], dtype=torch.float32).train(),
                      teacher, batch, base["vocab"], config, steps)


def seed_step_ratio(config, smoke: bool, steps: int) -> dict:
    """The step ratio at the seed shapes (bf16 teacher and student, as the seed recipe)."""
    names = ("tiny-teacher", "tiny-student") if smoke else ("pythia-160m", "pythia-70m")
    vocab, valid_vocab = (1000, 987) if smoke else (50304, 50277)
    micro_batch, seq_len = (2, 32) if smoke else (2, 256)
    teacher = build_ours(names[0], vocab, 2048, "cpu", seed=1).to(torch.bfloat16).eval()
    teacher.requires_grad_(False)
    batch = random_top_k_batch(make_batch(micro_batch, seq_len, valid_vocab), 64, valid_vocab)
    make_student = lambda: build_ours(names[1], vocab, 2048, "cpu", seed=0).to(torch.bfloat16)
    out = step_ratio(make_student, teacher, batch, valid_vocab, config, steps)
    out["shapes"] = {"teacher": names[0], "student": names[1], "vocab": vocab,
                     "tokens": micro_batch * seq_len, "dtype": "bf16", "cache": "top-64"}
    return out


# ----------------------------------------------------------------------------- the report


def table(report: dict) -> str:
    builds = report["cache_build"]["builds"]
    lines = ["| teacher signal | held-out CE | ppl | ppl / online | KD to teacher | step (s) "
             "| cache B/token | teacher mass outside the cache | build (s) "
             "| build / teacher fwd |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, row in report["rows"].items():
        build = builds.get(name)
        extra = "- | - | - | -"
        if build:
            tail = build["mean_tail_mass"]
            extra = (f"{build['bytes_per_token']} | {'-' if tail is None else f'{tail:.1%}'} | "
                     f"{build['seconds']:.1f} | {build['vs_teacher_forward']:.2f}x")
        lines.append(f"| {name} | {row['val_ce']:.4f} | {row['val_ppl']:.3f} | "
                     f"{row['ppl_vs_online']:.4f} | {row['val_kd']:.4f} | "
                     f"{row['step_time_s']:.3f} | {extra} |")
    contrast = report.get("contrast_T1")
    if contrast:
        top = contrast["top-64"]
        lines.append(f"\nat T = 1: online ppl {contrast['online']['val_ppl']:.3f}, top-64 "
                     f"{top['val_ppl']:.3f} (x{top['ppl_vs_online']:.4f}); teacher mass "
                     f"outside the top 64: {top['mean_tail_mass']:.1%}")
    seed = report["seed_build"]
    for name, build in seed["builds"].items():
        lines.append(f"seed shapes, {name} build: {build['tokens_per_s']:,.0f} tokens/s = "
                     f"{build['vs_teacher_forward']:.2f}x the teacher's forward")
    for shape in ("quickstart", "seed"):
        ratio = report["step_ratio"][shape]
        lines.append(f"step from a top-64 cache vs online step, {shape} shapes: "
                     f"x{ratio['speedup_cpu']:.2f} in CPU time (x{ratio['speedup_wall']:.2f} "
                     f"wall); online {ratio['online']['cpu_s']:.3f} s, cache "
                     f"{ratio['cache']['cpu_s']:.3f} s of CPU per step")
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _settings(smoke: bool) -> dict:
    settings = quickstart.load_settings(quickstart.DEFAULT_CONFIG)
    if smoke:
        settings = quickstart.shrink(settings)
        settings["common"]["batch"].update(seq_len=32, micro_batch=2)
        settings["distill"]["run"].update(steps=2, val_every=0)
        settings["quickstart"]["eval_batches"] = 2
    return settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.teacher_cache",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default=str(REPO_ROOT / "runs" / "quickstart"),
                        help="a quickstart run folder (built there when absent)")
    parser.add_argument("--json", default=str(DEFAULT_JSON))
    parser.add_argument("--work", default="", help="caches and runs (default: a temp folder)")
    parser.add_argument("--steps", type=int, default=9, help="timed steps per step ratio")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, for the tests")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # the quickstart's setting; CPU seconds then mean one core
    settings = _settings(args.smoke)
    base = locate_base(Path(args.base), args.smoke)
    with tempfile.TemporaryDirectory(prefix="teacher-cache-bench-") as scratch:
        work = Path(args.work or scratch)
        config = row_config(settings, base, work / "probe", "online", {})
        folders, build = build_caches(base, config, work / "caches")
        report = {
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count(),
                        "load_average_at_start": os.getloadavg(),
                        "threads": torch.get_num_threads(), "torch": torch.__version__,
                        "python": platform.python_version()},
            "base": {k: str(v) for k, v in base.items()},
            "recipe": {"steps": config.run.steps, "micro_batch": config.batch.micro_batch,
                       "seq_len": config.batch.seq_len, "seed": config.run.seed,
                       "temperature": config.loss.temperature, "alpha": config.loss.alpha,
                       "teacher_dtype": config.teacher.dtype, "precision": config.precision},
            "cache_build": build,
            "rows": train_rows(settings, base, work, folders),
            "contrast_T1": contrast_rows(settings, base, work, config),
            "seed_build": seed_cache_build_rates(work / "seed", args.smoke),
            "step_ratio": {"quickstart": quickstart_step_ratio(base, config, folders["top-64"],
                                                               args.steps),
                           "seed": seed_step_ratio(config, args.smoke, args.steps)},
        }
    report["machine"]["load_average_at_end"] = os.getloadavg()
    report["table"] = table(report)
    write_json(Path(args.json), report)
    print(report["table"])
    print(f"\nwritten: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
