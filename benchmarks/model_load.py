"""Load time and peak memory of our load_pretrained vs transformers' from_pretrained, plus parity.

    python -m benchmarks.model_load [--json benchmarks/results/model_load.json]

Builds a random pythia-160m-shaped checkpoint stored in float16 (as EleutherAI released it),
then loads it with each library in its own fresh subprocess. Peak memory is the kernel's
high-water mark of the child's own address space (VmHWM, reset after the imports through
/proc/self/clear_refs). Plain ru_maxrss would not do: Linux carries the parent's peak across
fork/exec into the child's ru_maxrss, and the parent here has just built a 160m model. It is
the fallback where /proc is absent. "load peak" is the RSS growth during the load call; the
weights themselves are 0.65 GB in fp32 and 0.32 GB in bf16.
The parity section prints max |logit difference| / max |reference logit| for both Pythia
shapes, the reference being transformers in fp32 on random weights (every parameter
perturbed), so the numbers quoted in issue 2 come from this one command.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, model_config, proc_status_mib, reset_peak_rss
from engine.data.atomic import write_json_atomic
from engine.model import GPTNeoX, GPTNeoXConfig, load_pretrained, save_pretrained
from engine.precision import dtype_of

DEFAULT_JSON = RESULTS_DIR / "model_load.json"
LOAD_DTYPES = ("float32", "bfloat16")


def _peak_mb() -> float:
    hwm = proc_status_mib("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _current_mb() -> float:
    rss = proc_status_mib("VmRSS")
    return rss if rss is not None else _peak_mb()


def child(loader: str, path: str, dtype_name: str) -> None:
    """Runs in a fresh interpreter: import, then time one load; print one JSON line."""
    torch.set_num_threads(min(4, os.cpu_count() or 1))
    dtype = dtype_of(dtype_name)
    if loader == "ours":

        def load():
            return load_pretrained(path, dtype=dtype)
    else:
        from transformers import GPTNeoXForCausalLM
        from transformers.utils import logging

        logging.disable_progress_bar()

        def load():
            return GPTNeoXForCausalLM.from_pretrained(path, dtype=dtype)

    reset = reset_peak_rss()
    before = _current_mb()
    start = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - start
    peak = _peak_mb()
    params = sum(p.numel() for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {dtype}
    print(json.dumps({"seconds": seconds, "rss_before_mb": before, "rss_peak_mb": peak,
                      "params": params, "peak_source": "VmHWM" if reset else "ru_maxrss"}))


def measure_loads(path: Path, repeats: int) -> list[dict]:
    rows = []
    for dtype_name in LOAD_DTYPES:
        for loader in ("ours", "transformers"):
            runs = []
            for _ in range(repeats):
                result = subprocess.run(
                    [sys.executable, "-m", "benchmarks.model_load", "--child", loader,
                     "--path", str(path), "--dtype", dtype_name],
                    capture_output=True, text=True, check=False,
                )
                if result.returncode != 0:
                    raise RuntimeError(f"{loader} load failed:\n{result.stderr[-3000:]}")
                runs.append(json.loads(result.stdout.strip().splitlines()[-1]))
            rows.append({
                "loader": loader,
                "dtype": dtype_name,
                "params": runs[0]["params"],
                "seconds_median": statistics.median(r["seconds"] for r in runs),
                "seconds_all": [r["seconds"] for r in runs],
                "rss_after_imports_mb": statistics.median(r["rss_before_mb"] for r in runs),
                "rss_peak_mb": statistics.median(r["rss_peak_mb"] for r in runs),
                "load_peak_mb": statistics.median(
                    r["rss_peak_mb"] - r["rss_before_mb"] for r in runs
                ),
                "peak_source": runs[0]["peak_source"],
            })
    return rows


def build_checkpoint(folder: Path) -> dict:
    torch.manual_seed(0)
    model = GPTNeoX(model_config("pythia-160m"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    save_pretrained(model, folder, dtype=torch.float16)
    size = sum(f.stat().st_size for f in folder.iterdir())
    (folder / "model.safetensors").read_bytes()  # warm the page cache for every loader alike
    return {"shape": "pythia-160m", "stored_dtype": "float16", "bytes": size,
            "params": model.num_parameters()}


@torch.no_grad()
def measure_parity(seq_len: int, batch: int) -> list[dict]:
    from tests.hf_models import random_pythia

    rows = []
    for size in ("70m", "160m"):
        hf = random_pythia(size, seed=0)
        ours = GPTNeoX(GPTNeoXConfig.from_hf_dict(hf.config.to_dict()))
        state = {k.replace("lm_head.", "embed_out.", 1) if k.startswith("lm_head.") else k: v
                 for k, v in hf.state_dict().items()}
        ours.load_state_dict(state, strict=True)
        ours.eval()
        ids = torch.randint(0, 50277, (batch, seq_len), generator=torch.Generator().manual_seed(1))
        reference = hf(ids).logits.float()
        scale = reference.abs().max().item()
        ours_fp32 = ours(ids).float()
        hf.to(torch.bfloat16)
        ours.to(torch.bfloat16)
        hf_bf16 = hf(ids).logits.float()
        ours_bf16 = ours(ids).float()

        def rel(a, b, scale=scale):
            return (a - b).abs().max().item() / scale

        rows.append({
            "shape": f"pythia-{size}",
            "seq_len": seq_len,
            "batch": batch,
            "max_abs_logit": scale,
            "fp32_ours_vs_hf": rel(ours_fp32, reference),
            "bf16_ours_vs_hf_fp32": rel(ours_bf16, reference),
            "bf16_ours_vs_hf_bf16": rel(ours_bf16, hf_bf16),
            "bf16_hf_vs_hf_fp32": rel(hf_bf16, reference),
        })
        del hf, ours
    return rows


def print_tables(checkpoint: dict, loads: list[dict], parity: list[dict]) -> None:
    print(f"\ncheckpoint: {checkpoint['shape']} stored {checkpoint['stored_dtype']}, "
          f"{checkpoint['bytes'] / 1e6:.0f} MB, {checkpoint['params']:,} parameters")
    if loads:
        print(f"\n{'load as':9} {'loader':13} {'seconds':>8} {'load peak MB':>13} "
              f"{'process peak MB':>16} {'time ratio':>11} {'mem ratio':>10}")
        by_key = {(r["dtype"], r["loader"]): r for r in loads}
        for row in loads:
            base = by_key[(row["dtype"], "transformers")]
            print(f"{row['dtype']:9} {row['loader']:13} {row['seconds_median']:8.2f} "
                  f"{row['load_peak_mb']:13.0f} {row['rss_peak_mb']:16.0f} "
                  f"{row['seconds_median'] / base['seconds_median']:11.2f} "
                  f"{row['load_peak_mb'] / max(base['load_peak_mb'], 1e-9):10.2f}")
        print("(ratios are ours / transformers; CPU timings, compare only within this run)")
    if parity:
        print("\nparity: max|diff| / max|fp32 reference logit| (reference = transformers fp32)")
        print(f"{'shape':12} {'seq':>5} {'fp32 ours':>10} {'bf16 ours':>10} "
              f"{'bf16 HF':>10} {'ours-HF bf16':>13}")
        for row in parity:
            print(f"{row['shape']:12} {row['seq_len']:5d} {row['fp32_ours_vs_hf']:10.2e} "
                  f"{row['bf16_ours_vs_hf_fp32']:10.2e} {row['bf16_hf_vs_hf_fp32']:10.2e} "
                  f"{row['bf16_ours_vs_hf_bf16']:13.2e}")
        print("(tests require fp32 <= 1e-4 and bf16 <= 2e-2)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.model_load", description=__doc__)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--repeats", type=int, default=3, help="subprocess loads per row")
    parser.add_argument("--seq-len", type=int, default=256, help="parity sequence length")
    parser.add_argument("--batch", type=int, default=2, help="parity batch size")
    parser.add_argument("--skip-load", action="store_true")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--child", choices=["ours", "transformers"], help=argparse.SUPPRESS)
    parser.add_argument("--path", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", choices=LOAD_DTYPES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.path, args.dtype)
        return 0

    torch.set_num_threads(min(4, os.cpu_count() or 1))
    with tempfile.TemporaryDirectory(prefix="model_load_") as tmp:
        folder = Path(tmp) / "pythia-160m-random-fp16"
        checkpoint = build_checkpoint(folder)
        loads = [] if args.skip_load else measure_loads(folder, args.repeats)
    parity = [] if args.skip_parity else measure_parity(args.seq_len, args.batch)
    print_tables(checkpoint, loads, parity)
    import transformers

    payload = {
        "benchmark": "model_load",
        "checkpoint": checkpoint,
        "load": loads,
        "parity": parity,
        "env": {"torch": torch.__version__, "transformers": transformers.__version__,
                "python": platform.python_version(), "cpu_count": os.cpu_count(),
                "machine": platform.machine(), "device": "cpu"},
    }
    write_json_atomic(args.json, payload)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
