"""Sampling throughput: our batched KV-cache sampler against transformers' generate.

    python -m benchmarks.sampling [--repeats 5] [--json benchmarks/results/sampling.json]
                                  [--device cpu|cuda]

Both engines get the same random pythia-70m-shaped weights (ours saved as a checkpoint and
loaded by transformers' GPTNeoXForCausalLM.from_pretrained), the same batch of 32 random prompts
of 64 tokens, and decode 64 new tokens greedily in fp32 on the CPU (or --device cuda, what the
GPU suite's sampling section runs): ours through engine.sampling.sample, transformers through
`generate(do_sample=False, use_cache=True)` with its default cache and no end-of-sequence stop
(every row writes all 64 tokens in both). Rounds alternate the order of the two engines (a busy
minute of a shared machine hits both alike); the report is the median tokens/s of each, the
ratio of the medians and the per-round ratios, and the same from the process's CPU time
(time.process_time: with one thread, the time the engine really ran, which a busy machine's
waits do not inflate). Generated tokens per second count the new tokens only (B x new_tokens
per call, the prefill included in the time). The greedy tokens of the two engines are compared
too. --smoke runs tiny shapes once (the test does). Every timed call ends with a device sync.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import RESULTS_DIR, build_ours, device_name, sync, write_json
from engine.model.hf_io import save_pretrained
from engine.sampling import sample

DEFAULT_JSON = RESULTS_DIR / "sampling.json"
FULL = dict(model="pythia-70m", vocab=50304, batch=32, prompt=64, new_tokens=64)
SMOKE = dict(model="tiny-student", vocab=1000, batch=2, prompt=8, new_tokens=4)


def transformers_twin(ours: torch.nn.Module, folder: Path, device="cpu"):
    """transformers' GPTNeoXForCausalLM loaded from our model saved into `folder` (fp32)."""
    from transformers import GPTNeoXForCausalLM

    save_pretrained(ours, folder, dtype=torch.float32)
    return GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()


def engines(ours, theirs, new_tokens: int) -> dict:
    """name -> callable(prompts) -> new tokens [B, new_tokens], both greedy."""
    from transformers import GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, use_cache=True,
                              eos_token_id=None, pad_token_id=0)

    def run_ours(prompts):
        return sample(ours, prompts, new_tokens, temperature=0.0).tokens

    def run_theirs(prompts):
        with torch.no_grad():
            out = theirs.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  generation_config=config)
        return out[:, prompts.shape[1]:]

    return {"ours": run_ours, "transformers": run_theirs}


def measure(sizes: dict, repeats: int, seed: int = 0, device="cpu") -> dict:
    """Interleaved rounds of both engines on the same weights and prompts; medians."""
    device = torch.device(device)
    ours = build_ours(sizes["model"], sizes["vocab"], 2048, device, seed=seed).eval()
    with tempfile.TemporaryDirectory() as scratch:
        theirs = transformers_twin(ours, Path(scratch) / "model", device)
    prompts = torch.randint(0, sizes["vocab"], (sizes["batch"], sizes["prompt"]),
                            generator=torch.Generator().manual_seed(seed)).to(device)
    runs = engines(ours, theirs, sizes["new_tokens"])
    tokens = {name: run(prompts) for name, run in runs.items()}  # warm-up, and the outputs
    agree = (tokens["ours"] == tokens["transformers"]).float().mean().item()
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    cpu_seconds: dict[str, list[float]] = {name: [] for name in runs}
    for round_ in range(repeats):
        order = list(runs) if round_ % 2 == 0 else list(reversed(runs))
        for name in order:
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            runs[name](prompts)
            sync(device)
            seconds[name].append(time.perf_counter() - start)
            cpu_seconds[name].append(time.process_time() - cpu_start)
    generated = sizes["batch"] * sizes["new_tokens"]
    rates = {name: [generated / s for s in values] for name, values in seconds.items()}
    medians = {name: statistics.median(values) for name, values in rates.items()}
    per_round = [a / b for a, b in zip(rates["ours"], rates["transformers"], strict=True)]
    cpu_medians = {name: generated / statistics.median(values)
                   for name, values in cpu_seconds.items()}
    return {"shapes": sizes, "repeats": repeats, "seconds": seconds,
            "tokens_per_s": rates, "median_tokens_per_s": medians,
            "ratio_of_medians": medians["ours"] / medians["transformers"],
            "per_round_ratio": per_round, "greedy_token_agreement": agree,
            "cpu_seconds": cpu_seconds, "median_tokens_per_cpu_s": cpu_medians,
            "cpu_ratio_of_medians": cpu_medians["ours"] / cpu_medians["transformers"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--repeats", type=int, default=5, help="rounds of both engines")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: steadiest on a shared machine)")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one round")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where both engines run (the GPU suite passes cuda)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be >= 1")
    torch.set_num_threads(args.threads)
    sizes = SMOKE if args.smoke else FULL
    load_before = os.getloadavg()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    device = torch.device("cuda", torch.cuda.current_device()) if args.device == "cuda" else (
        torch.device("cpu"))
    result = measure(sizes, 1 if args.smoke else args.repeats, device=device)
    result.update(device=device_name(device),
                  machine=f"cpu ({platform.machine()}), {os.cpu_count()} cores",
                  threads=args.threads, torch=torch.__version__, dtype="float32",
                  load_average_before=load_before, load_average_after=os.getloadavg())
    med = result["median_tokens_per_s"]
    print(f"{sizes['model']} shape, random weights, fp32 {result['device']} ({args.threads} "
          f"CPU threads), batch "
          f"{sizes['batch']}, prompt {sizes['prompt']}, {sizes['new_tokens']} new tokens, "
          f"greedy; {result['repeats']} interleaved rounds, load "
          f"{load_before[0]:.1f} -> {result['load_average_after'][0]:.1f}")
    for name in ("ours", "transformers"):
        rounds = " / ".join(f"{r:.0f}" for r in result["tokens_per_s"][name])
        print(f"  {name:<13} {med[name]:8.1f} tokens/s (median; rounds {rounds})")
    print(f"  ours / transformers: x{result['ratio_of_medians']:.2f} (per round: "
          + " / ".join(f"{r:.2f}" for r in result["per_round_ratio"]) + ")")
    cpu = result["median_tokens_per_cpu_s"]
    print(f"  per second of this process's CPU time (steadier on a shared machine): ours "
          f"{cpu['ours']:.1f}, transformers {cpu['transformers']:.1f}, "
          f"x{result['cpu_ratio_of_medians']:.2f}")
    print(f"  greedy tokens equal in {100 * result['greedy_token_agreement']:.1f}% of places")
    write_json(args.json, result)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
