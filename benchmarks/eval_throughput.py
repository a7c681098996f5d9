"""Evaluation throughput of engine.eval for a pythia-70m-shaped model, side by side.

    python -m benchmarks.eval_throughput [--json benchmarks/results/eval_throughput.json]

Two workloads, each run through the real task code (engine.eval.tasks):
- ppl: rolling-window perplexity over a token shard folder (random tokens; the content does
  not change the arithmetic), every token scored;
- lambada-style: harness log-likelihood requests with contexts of 40-120 tokens and 1-3
  continuation tokens, batched, sorted, right-padded.

Each workload runs twice on the same random-weight model: with our GPTNeoX, where the
vocabulary projection runs only on scored positions (hidden_states + embed_out), and through
a wrapper that only offers forward() -> full logits, the way any other module is scored. The
table prints tokens/s and the ratio between the two. On a CPU these are ratios to read, not
absolute claims; on a GPU (--device cuda) the absolute numbers mean something.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, model_config
from engine.data.atomic import write_json_atomic
from engine.data.shards import ShardWriter
from engine.eval.requests import Request, request_items
from engine.eval.tasks import ScoringSetup, evaluate_ppl, score_items
from engine.model import GPTNeoX
from engine.precision import dtype_of

DEFAULT_JSON = RESULTS_DIR / "eval_throughput.json"


class FullLogitsOnly(torch.nn.Module):
    """Hides hidden_states/embed_out so the scoring falls back to full [B, T, V] logits."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.inner = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.inner(input_ids)


def write_random_shards(folder: Path, documents: int, mean_length: int, seed: int) -> int:
    rng = np.random.default_rng(seed)
    sizes = rng.integers(mean_length // 2, mean_length * 3 // 2, size=documents)
    tokens = rng.integers(2, 50277, size=int(sizes.sum()), dtype=np.int64)
    tokens[np.cumsum(sizes) - 1] = 0  # EOS closes every document, as engine.data.preprocess writes
    writer = ShardWriter(folder / "shard_00000", np.uint16)
    writer.add_documents(tokens, sizes)
    writer.finish()
    return int(sizes.sum())


def lambada_style_requests(count: int, seed: int):
    rng = random.Random(seed)
    return [
        Request(
            [rng.randrange(2, 50277) for _ in range(rng.randint(40, 120))],
            [rng.randrange(2, 50277) for _ in range(rng.randint(1, 3))],
        )
        for _ in range(count)
    ]


def timed(fn, device: str):
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--ppl-documents", type=int, default=8)
    parser.add_argument("--ppl-doc-tokens", type=int, default=600, help="mean document length")
    parser.add_argument("--max-length", type=int, default=512, help="ppl window length")
    parser.add_argument("--requests", type=int, default=96, help="lambada-style requests")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    dtype = dtype_of(args.dtype)

    config = model_config("pythia-70m")
    model = GPTNeoX(config).to(device=args.device, dtype=dtype).eval()
    variants = {"scored rows only": model, "full logits": FullLogitsOnly(model)}
    requests = lambada_style_requests(args.requests, args.seed)
    request_tokens = sum(len(r.context) + len(r.continuation) - 1 for r in requests)
    items = request_items(requests, args.max_length, str)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        shards = Path(scratch) / "shards"
        shards.mkdir()
        corpus_tokens = write_random_shards(
            shards, args.ppl_documents, args.ppl_doc_tokens, args.seed
        )
        for name, variant in variants.items():
            setup = ScoringSetup(
                model=variant,
                max_length=args.max_length,
                batch_size=args.batch_size,
                progress=False,
            )
            # Warm-up: allocator, kernels, rotary tables (score_items runs under no_grad).
            score_items(setup, items[:4])
            ppl, seconds = timed(
                lambda setup=setup: evaluate_ppl(
                    setup, None, shards, model_vocab=config.vocab_size
                ),
                args.device,
            )
            assert ppl["tokens"] == corpus_tokens
            rows.append(
                dict(
                    workload="ppl",
                    variant=name,
                    tokens=corpus_tokens,
                    seconds=seconds,
                    ce=ppl["ce"],
                )
            )
            (loglik, _), seconds = timed(lambda setup=setup: score_items(setup, items), args.device)
            rows.append(
                dict(
                    workload="lambada-style",
                    variant=name,
                    tokens=request_tokens,
                    seconds=seconds,
                    requests=len(requests),
                    mean_ll=float(loglik.mean()),
                )
            )

    print(
        f"pythia-70m shape, random weights, {args.dtype} on {args.device} "
        f"({args.threads} threads), batch {args.batch_size}, ppl window {args.max_length}"
    )
    header = f"{'workload':<14} {'variant':<17} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}"
    print(header + f" {'vs full logits':>15}")
    print("-" * (len(header) + 16))
    workloads = ["ppl", "lambada-style"]
    rows.sort(key=lambda r: (workloads.index(r["workload"]), r["variant"] == "full logits"))
    for row in rows:
        row["tokens_per_s"] = row["tokens"] / row["seconds"]
    for row in rows:
        base = next(
            r for r in rows if r["workload"] == row["workload"] and r["variant"] == "full logits"
        )
        row["speedup_vs_full_logits"] = row["tokens_per_s"] / base["tokens_per_s"]
        print(
            f"{row['workload']:<14} {row['variant']:<17} {row['tokens']:>7} "
            f"{row['seconds']:>8.2f} {row['tokens_per_s']:>9.0f} "
            f"{row['speedup_vs_full_logits']:>14.2f}x"
        )
    for workload in workloads:
        pair = [r for r in rows if r["workload"] == workload]
        key = "ce" if workload == "ppl" else "mean_ll"
        print(f"{workload}: both variants agree on {key}: {pair[0][key]:.6f} vs {pair[1][key]:.6f}")

    record = {
        "benchmark": "eval_throughput",
        "model": "pythia-70m shape (random init)",
        "device": args.device,
        "device_name": torch.cuda.get_device_name()
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine(),
        "dtype": args.dtype,
        "threads": args.threads,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "rows": rows,
    }
    write_json_atomic(args.json, record, trailing_newline=False)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
