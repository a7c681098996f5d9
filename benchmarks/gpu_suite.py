"""The GPU validation suite: everything the engine promises on a GPU, in one short call.

    python3 -m benchmarks.gpu_suite [--out DIR] [--smoke]

Sections (each guarded: a failure is recorded with its traceback and the others still run):
  1. kernel correctness on the device (benchmarks.kd_loss.gpu_correctness)
  2. kernel speed at 4096 and 16384 tokens x 50304 bf16 (benchmarks.kd_loss.gpu_speed)
  3. the seed recipe end to end with random-weight pythia-160m teacher / pythia-70m student
     (engine.model.GPTNeoX): micro-batch 2 x 2048, bf16 autocast, fused AdamW, timed micro-steps
     through engine.step.distill_micro_step + optimizer steps: tokens/s, MFU, peak memory and
     the memory plan's prediction; then, in a fresh subprocess capped with
     torch.cuda.set_per_process_memory_fraction to a 12 GiB card, the same step and the
     largest micro-batch that runs (mb = 2, 4, 6, ... until out of memory, bounded in time)
  4. the same step through transformers' GPTNeoXForCausalLM with the naive loss, for the ratio
  (and the seed step again with both models under torch.compile, the engine's runtime.compile)
The summary table is printed last; everything is also written to DIR/gpu_suite.json.

`--smoke` runs every code path at tiny sizes on whatever device there is (CPU in CI) in about
a minute (kernel speed once: at smoke size both token counts are the same 64 tokens), so the
real run cannot die of a typo. Needs only torch (+ triton on a GPU); transformers is optional
(section 4 is skipped without it); zstandard is never imported.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from data.atomic import write_json_atomic

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "benchmarks" / "results"
DEFAULT_SMOKE_OUT = REPO_ROOT / "runs" / "gpu_suite_smoke"
CARD_BYTES = 12 * 2**30  # the user's RTX 3060
H100_PEAK_BF16 = 989e12  # dense bf16 datasheet, H100/H200 SXM
ALPHA, TEMPERATURE = 0.5, 2.0
PYTHIA_VALID_VOCAB = 50277

# Sizes: (teacher, student) shapes, vocab, seq_len, micro-batch, warm-up and timed micro-steps,
# micro-steps per optimizer step, kernel-speed token counts, mb search limit and time bound.
FULL = dict(teacher="pythia-160m", student="pythia-70m", vocab=50304, valid_vocab=50277,
            seq_len=2048, micro_batch=2, warmup=4, steps=20, accum=4, speed_tokens=(4096, 16384),
            search_max_mb=64, search_seconds=120, worker_timeout=300)
SMOKE = dict(teacher="tiny-teacher", student="tiny-student", vocab=1000, valid_vocab=987,
             seq_len=64, micro_batch=2, warmup=2, steps=4, accum=2, speed_tokens=(4096,),
             search_max_mb=4, search_seconds=20, worker_timeout=120)
TINY_SHAPES = {
    "tiny-teacher": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    "tiny-student": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
}


# ----------------------------------------------------------------------------- helpers


def _device() -> torch.device:
    # With an explicit index: set_per_process_memory_fraction refuses a bare "cuda".
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()})"


def model_config(name: str, vocab: int, seq_len: int):
    from engine.memory import PYTHIA_COMMON, PYTHIA_SHAPES
    from engine.model import GPTNeoXConfig

    shape = PYTHIA_SHAPES.get(name) or TINY_SHAPES[name]
    fields = {**PYTHIA_COMMON, **shape, "vocab_size": vocab,
              "max_positions": max(seq_len, 2048 if name in PYTHIA_SHAPES else seq_len)}
    return GPTNeoXConfig(**fields)


def make_batch(micro_batch: int, seq_len: int, valid_vocab: int, device, seed: int):
    """Random tokens (packed-style: every target valid but the last), on the device."""
    gen = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, valid_vocab, (micro_batch, seq_len + 1), generator=gen)
    return {"input_ids": input_ids[:, :-1].to(device), "labels": input_ids[:, 1:].to(device)}


def error_record(exc: BaseException) -> dict:
    """What a guarded section or engine records when it raised (call inside the except)."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _peak_flops(device) -> float | None:
    if device.type != "cuda":
        return None
    from engine.metrics import peak_flops

    return peak_flops(device) or (H100_PEAK_BF16 if "H1" in device_name(device) or "H2"
                                  in device_name(device) else None)


def _optimizer(model, device):
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), **kwargs)


# ----------------------------------------------------------------------------- the training step


def build_ours(sizes, device):
    from engine.model import GPTNeoX

    torch.manual_seed(0)
    teacher_cfg = model_config(sizes["teacher"], sizes["vocab"], sizes["seq_len"])
    student_cfg = model_config(sizes["student"], sizes["vocab"], sizes["seq_len"])
    teacher = GPTNeoX(teacher_cfg).to(device=device, dtype=torch.bfloat16).eval()
    teacher.requires_grad_(False)
    student = GPTNeoX(student_cfg).to(device=device, dtype=torch.float32).train()
    return teacher, student


def ours_micro_step(student, teacher, batch, valid_vocab, normalizer):
    from engine.step import distill_micro_step

    return distill_micro_step(
        student, teacher, batch, alpha=ALPHA, temperature=TEMPERATURE, valid_vocab=valid_vocab,
        normalizer=normalizer, autocast_dtype=torch.bfloat16,
    )


def build_transformers(sizes, device):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    def hf(name: str):
        cfg = model_config(name, sizes["vocab"], sizes["seq_len"])
        config = GPTNeoXConfig(
            vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_heads,
            intermediate_size=cfg.intermediate_size, max_position_embeddings=cfg.max_positions,
            rotary_pct=cfg.rotary_pct, rotary_emb_base=cfg.rotary_base,
            layer_norm_eps=cfg.layer_norm_eps, use_parallel_residual=True,
            tie_word_embeddings=False, hidden_act="gelu", attention_dropout=0.0,
            hidden_dropout=0.0,
        )
        rope = getattr(config, "rope_parameters", None)  # transformers >= 5 reads these
        if isinstance(rope, dict):
            rope["partial_rotary_factor"] = cfg.rotary_pct
            rope["rope_theta"] = float(cfg.rotary_base)
        return GPTNeoXForCausalLM(config)

    torch.manual_seed(0)
    teacher = hf(sizes["teacher"]).to(device=device, dtype=torch.bfloat16).eval()
    teacher.requires_grad_(False)
    student = hf(sizes["student"]).to(device=device, dtype=torch.float32).train()
    return teacher, student


def transformers_micro_step(student, teacher, batch, valid_vocab, normalizer):
    """The step as one writes it with stock parts: HF models, full-vocab fp32 softmaxes."""
    from benchmarks.kd_loss import naive_kd_loss

    device_type = batch["input_ids"].device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=torch.bfloat16):
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    with torch.autocast(device_type, dtype=torch.bfloat16):
        s_logits = student(input_ids=batch["input_ids"]).logits
    vocab = s_logits.shape[-1]
    loss = naive_kd_loss(s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab),
                         batch["labels"].reshape(-1), alpha=ALPHA, temperature=TEMPERATURE,
                         valid_vocab=valid_vocab)
    loss.backward()
    return {"loss": loss.detach()}


def time_training(student, teacher, micro_step, sizes, device, *, micro_batch=None,
                  warmup=None, steps=None) -> dict:
    """Warm up, then time sizes['steps'] micro-steps with an optimizer step every accum."""
    mb = micro_batch or sizes["micro_batch"]
    warmup = sizes["warmup"] if warmup is None else warmup
    steps = sizes["steps"] if steps is None else steps
    accum, valid_vocab = sizes["accum"], sizes["valid_vocab"]
    optimizer = _optimizer(student, device)
    batches = [make_batch(mb, sizes["seq_len"], valid_vocab, device, seed=i) for i in range(accum)]
    normalizer = float(sum(int((b["labels"] != -100).sum()) for b in batches))

    def window(n_micro: int) -> float:
        loss = torch.zeros((), device=device)
        for i in range(n_micro):
            stats = micro_step(student, teacher, batches[i % accum], valid_vocab, normalizer)
            loss += stats["loss"]
            if (i + 1) % accum == 0:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        return float(loss)

    # Whole windows only, so the optimizer's state exists before timing and no gradient is
    # left half-accumulated.
    warm_loss = window(max(1, -(-warmup // accum)) * accum)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    steps = max(1, -(-steps // accum)) * accum
    t0 = time.perf_counter()
    loss = window(steps)
    _sync(device)
    seconds = time.perf_counter() - t0
    tokens = steps * mb * sizes["seq_len"]
    out = {
        "micro_batch": mb,
        "seq_len": sizes["seq_len"],
        "micro_steps": steps,
        "accum": accum,
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "warmup_loss": warm_loss,
        "timed_loss_sum": loss,
        "finite": bool(torch.isfinite(torch.tensor(loss))),
    }
    if device.type == "cuda":
        out["peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
        out["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        free, total = torch.cuda.mem_get_info(device)
        # Device memory in use that the caching allocator does not hold: context, handles.
        out["non_allocator_bytes"] = int(total - free - torch.cuda.memory_reserved(device))
    return out


# ----------------------------------------------------------------------------- sections


def section_kernel_correctness(sizes, smoke: bool) -> dict:
    from benchmarks.kd_loss import gpu_correctness

    rows = gpu_correctness(smoke=smoke)
    return {
        "cases": rows,
        "passed": all(r["passed"] for r in rows),
        "max_loss_rel_err": max(r["loss_rel_err"] for r in rows),
        "max_grad_rel_err": max(r["grad_rel_err"] for r in rows),
    }


def section_kernel_speed(sizes, smoke: bool) -> dict:
    from benchmarks.kd_loss import gpu_speed

    out = {}
    for n in sizes["speed_tokens"]:
        try:  # one size failing (say, out of memory for the eager composite) keeps the other
            out[str(n)] = gpu_speed(n_tokens=n, smoke=smoke)
        except Exception as exc:
            out[str(n)] = error_record(exc)
        _free(_device())
    return out


def section_seed_recipe(sizes, smoke: bool) -> dict:
    from engine.memory import largest_micro_batch, plan_memory

    device = _device()
    teacher, student = build_ours(sizes, device)
    result = time_training(student, teacher, ours_micro_step, sizes, device)
    plan = plan_memory(teacher.config, student.config, micro_batch=sizes["micro_batch"],
                       seq_len=sizes["seq_len"], precision="bf16-autocast")
    flops = plan.flops_per_token
    peak = _peak_flops(device)
    result.update(
        device=device_name(device),
        flops_per_token=flops,
        mfu=result["tokens_per_s"] * flops / peak if peak else None,
        peak_flops=peak,
        plan_allocated_peak_bytes=plan.allocated_peak,
        plan_total_bytes=plan.total,
        plan_largest_micro_batch_12gib=largest_micro_batch(
            teacher.config, student.config, seq_len=sizes["seq_len"], budget_bytes=CARD_BYTES),
        plan_largest_micro_batch_12gib_checkpointing=largest_micro_batch(
            teacher.config, student.config, seq_len=sizes["seq_len"], budget_bytes=CARD_BYTES,
            activation_checkpointing=True),
    )
    if "peak_allocated_bytes" in result:
        result["plan_over_measured"] = plan.allocated_peak / result["peak_allocated_bytes"]
    del teacher, student
    _free(device)
    return result


def section_seed_recipe_compiled(sizes, smoke: bool) -> dict:
    """The seed step with student and teacher under torch.compile (the engine's
    runtime.compile option): models this small are launch-bound in eager mode."""
    device = _device()
    teacher, student = build_ours(sizes, device)
    result = time_training(torch.compile(student), torch.compile(teacher), ours_micro_step,
                           sizes, device)
    del teacher, student
    _free(device)
    return result


def section_transformers(sizes, smoke: bool) -> dict:
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    device = _device()
    teacher, student = build_transformers(sizes, device)
    result = time_training(student, teacher, transformers_micro_step, sizes, device)
    result["transformers_version"] = transformers.__version__
    del teacher, student
    _free(device)
    return result


def section_capped(sizes, smoke: bool, out_dir: Path) -> dict:
    """Run the capped measurements in a fresh process so the cap and allocator start clean."""
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        result_path = Path(tmp) / "capped.json"
        cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--worker-capped", str(result_path)]
        if smoke:
            cmd.append("--smoke")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True,
                                  timeout=sizes["worker_timeout"])
        except subprocess.TimeoutExpired as exc:
            return {"error": f"capped worker timed out after {exc.timeout} s"}
        if not result_path.is_file():
            tail = (proc.stdout + proc.stderr)[-4000:]
            return {"error": f"capped worker exited {proc.returncode} without a result", "log":
                    tail}
        result = json.loads(result_path.read_text())
        result["worker_seconds"] = time.perf_counter() - t0
        result["worker_returncode"] = proc.returncode
        return result


def _is_oom(exc: BaseException) -> bool:
    """Out of memory as torch, cuBLAS or Triton report it."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "alloc_failed" in text


def capped_worker(sizes, smoke: bool, result_path: Path) -> int:
    """In a fresh process: cap the allocator to a 12 GiB card, run the seed step, then find
    the largest micro-batch (2, 4, 6, ...) that still runs a window without running out."""
    from engine.memory import CUDA_CONTEXT_BYTES

    device = _device()
    result: dict[str, Any] = {"device": device_name(device)}
    if device.type == "cuda":
        # The driver's context lives outside the allocator but inside the card's 12 GiB.
        cap = CARD_BYTES - CUDA_CONTEXT_BYTES
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
        result.update(cap_bytes=cap, cap_note="12 GiB card minus the plan's CUDA context reserve")
    else:
        result["cap_note"] = "no cap on CPU (smoke): the code path only"

    teacher, student = build_ours(sizes, device)
    attempts = []

    def attempt(mb: int, *, full: bool) -> bool:
        """One measured run at micro-batch mb (the search uses one window of warm-up and one
        timed window: enough to allocate everything a longer run would)."""
        student.zero_grad(set_to_none=True)
        _free(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        short = {} if full else {"warmup": sizes["accum"], "steps": sizes["accum"]}
        try:
            row = time_training(student, teacher, ours_micro_step, sizes, device, micro_batch=mb,
                                **short)
            attempts.append({"micro_batch": mb, "ok": True, **row})
            return True
        except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError too
            if not _is_oom(exc):
                raise
            attempts.append({"micro_batch": mb, "ok": False, "oom": True,
                             "error": str(exc).splitlines()[0][:300]})
            return False
        finally:
            student.zero_grad(set_to_none=True)
            _free(device)

    result["seed_micro_batch_fits"] = attempt(sizes["micro_batch"], full=True)
    started = time.perf_counter()
    largest = sizes["micro_batch"] if result["seed_micro_batch_fits"] else 0
    mb = sizes["micro_batch"] + 2
    stopped = "limit"
    while mb <= sizes["search_max_mb"]:
        if time.perf_counter() - started > sizes["search_seconds"]:
            stopped = "time bound"
            break
        if not attempt(mb, full=False):
            stopped = "out of memory"
            break
        largest = mb
        mb += 2
    result.update(attempts=attempts, measured_largest_micro_batch=largest, search_stopped=stopped)
    write_json(result_path, result)
    return 0


# ----------------------------------------------------------------------------- report


def _gib(n) -> str:
    return f"{n / 2**30:.2f} GiB" if isinstance(n, (int, float)) else "n/a"


def summary_rows(report: dict) -> list[tuple[str, str, str]]:
    """(check, measured, target) rows for the final table."""
    rows: list[tuple[str, str, str]] = []
    sec = report["sections"]
    for name, body in sec.items():
        if "error" in body:
            rows.append((name, "FAILED: " + body["error"].strip().splitlines()[-1][:70], "-"))
    kc = sec.get("kernel_correctness", {})
    if "passed" in kc:
        rows.append(("kernel vs float64 reference",
                     f"{'PASS' if kc['passed'] else 'FAIL'} ({len(kc['cases'])} cases, max grad "
                     f"rel err {kc['max_grad_rel_err']:.1e})", "all pass"))
    for n, speed in sec.get("kernel_speed", {}).items():
        if isinstance(speed, dict) and "error" in speed:
            rows.append((f"kernel speed {n} tokens", "FAILED: " + speed["error"][:70], "-"))
        if not isinstance(speed, dict) or "variants" not in speed:
            continue
        v = speed["variants"]
        best = min(("ours", "ours_inplace"), key=lambda k: v[k]["median_ms"] if k in v else 1e30)
        ours = v[best]
        rows.append((f"kernel {speed['n_tokens']}x{speed['vocab']} {speed['dtype']}",
                     f"{ours['median_ms']:.3f} ms, {ours['fraction_of_copy'] * 100:.0f}% of copy "
                     f"bw, x{ours['speedup_vs_eager']:.1f} eager, x"
                     f"{v['naive_compiled']['median_ms'] / ours['median_ms']:.1f} compiled",
                     ">= 80% copy bw, >= 3x eager"))
    seed = sec.get("seed_recipe", {})
    if "tokens_per_s" in seed:
        mfu = f", MFU {seed['mfu'] * 100:.1f}%" if seed.get("mfu") else ""
        rows.append(("seed step tokens/s", f"{seed['tokens_per_s']:,.0f}{mfu}",
                     ">= 250,000 (H100)"))
        rows.append(("seed peak memory (measured / plan)",
                     f"{_gib(seed.get('peak_allocated_bytes'))} / "
                     f"{_gib(seed['plan_allocated_peak_bytes'])}", "plan >= measured"))
        rows.append(("largest mb in 12 GiB (plan)",
                     f"{seed['plan_largest_micro_batch_12gib']} (checkpointing: "
                     f"{seed['plan_largest_micro_batch_12gib_checkpointing']})", ">= 2"))
    compiled = sec.get("seed_recipe_compiled", {})
    if "tokens_per_s" in compiled:
        rows.append(("seed step tokens/s, torch.compile", f"{compiled['tokens_per_s']:,.0f}",
                     ">= 250,000 (H100)"))
    capped = sec.get("capped_12gib", {})
    if "seed_micro_batch_fits" in capped:
        first = capped["attempts"][0] if capped.get("attempts") else {}
        rows.append(("seed mb under 12 GiB cap",
                     ("fits" if capped["seed_micro_batch_fits"] else "OUT OF MEMORY")
                     + f", peak {_gib(first.get('peak_allocated_bytes'))}", "fits"))
        rows.append(("largest mb under cap (measured)",
                     f"{capped['measured_largest_micro_batch']} (stopped: "
                     f"{capped['search_stopped']})", "-"))
    hf = sec.get("transformers", {})
    if "skipped" in hf:
        rows.append(("transformers step", "skipped: " + hf["skipped"], "-"))
    elif "tokens_per_s" in hf and "tokens_per_s" in seed:
        ratio = seed["tokens_per_s"] / hf["tokens_per_s"]
        mem = ""
        if hf.get("peak_allocated_bytes") and seed.get("peak_allocated_bytes"):
            mem = (f", peak memory {_gib(seed['peak_allocated_bytes'])} vs "
                   f"{_gib(hf['peak_allocated_bytes'])}")
        rows.append(("ours / transformers step", f"x{ratio:.2f} tokens/s{mem}", ">= 1.5x"))
    return rows


def format_summary(report: dict) -> str:
    rows = summary_rows(report)
    w0 = max(len(r[0]) for r in rows) + 2
    w1 = max(len(r[1]) for r in rows) + 2
    lines = [f"GPU suite summary - device: {report['device']} ({report['mode']})",
             f"{'check':<{w0}}{'measured':<{w1}}target", "-" * (w0 + w1 + 28)]
    lines += [f"{a:<{w0}}{b:<{w1}}{c}" for a, b, c in rows]
    lines.append(f"total {report['wall_s']:.0f} s; JSON: {report['json_path']}")
    return "\n".join(lines)


def write_json(path: Path, payload: dict) -> None:
    """The suite's report as JSON, atomically (also used by benchmarks.step_profile)."""
    write_json_atomic(path, payload, default=str, trailing_newline=False)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m benchmarks.gpu_suite",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=None, help="folder for gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, any device, < 2 min")
    parser.add_argument("--worker-capped", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    if args.smoke and not torch.cuda.is_available():
        # Tiny CPU work: intra-op threads only contend with each other (and with CI).
        torch.set_num_threads(1)

    if args.worker_capped:
        return capped_worker(sizes, args.smoke, Path(args.worker_capped))

    started = time.perf_counter()
    device = _device()
    print(f"device: {device_name(device)}", flush=True)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    out_dir = Path(args.out) if args.out else (DEFAULT_SMOKE_OUT if args.smoke else DEFAULT_OUT)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / ("gpu_suite_smoke.json" if args.smoke else "gpu_suite.json")
    report: dict[str, Any] = {
        "device": device_name(device),
        "mode": "smoke" if args.smoke else "full",
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "cuda": torch.version.cuda,
        "sizes": sizes,
        "sections": {},
        "json_path": str(json_path),
    }
    print(f"torch {torch.__version__}, triton {triton_version}, python "
          f"{platform.python_version()}, mode {report['mode']}", flush=True)

    sections = [
        ("kernel_correctness", lambda: section_kernel_correctness(sizes, args.smoke)),
        ("kernel_speed", lambda: section_kernel_speed(sizes, args.smoke)),
        ("seed_recipe", lambda: section_seed_recipe(sizes, args.smoke)),
        ("seed_recipe_compiled", lambda: section_seed_recipe_compiled(sizes, args.smoke)),
        ("transformers", lambda: section_transformers(sizes, args.smoke)),
        ("capped_12gib", lambda: section_capped(sizes, args.smoke, out_dir)),
    ]
    for name, run in sections:
        t0 = time.perf_counter()
        print(f"== {name} ...", flush=True)
        try:
            body = run()
        except Exception as exc:  # guarded: record and go on to the next section
            body = error_record(exc)
            print(body["traceback"], file=sys.stderr, flush=True)
        body["section_seconds"] = round(time.perf_counter() - t0, 2)
        report["sections"][name] = body
        print(f"== {name}: {'FAILED' if 'error' in body else 'done'} in "
              f"{body['section_seconds']:.1f} s", flush=True)
        _free(device)
        write_json(json_path, report)  # after every section, so a crash keeps what ran

    report["wall_s"] = round(time.perf_counter() - started, 1)
    write_json(json_path, report)
    print()
    print(format_summary(report))
    failed = [n for n, b in report["sections"].items() if "error" in b]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
