"""Preprocessing and loader throughput, side by side in one run.

    python -m benchmarks.preprocess [--input FILE] [--tokenizer FILE] [--json PATH]

Preprocessing: our end-to-end ``engine.data.preprocess`` (decompress, parse, tokenise, write
shards) against the raw ``tokenizers`` throughput on the same texts already in memory:
``Tokenizer.encode_batch`` on all texts in one call and in ~1 MiB batches (what a streaming
tool can do), and ``encode_batch_fast`` in the same batches. The ratio is taken against the
fastest raw variant, so it is the strict one. Modes are interleaved over the repeats and
the best time of each is kept, which matters on a shared, noisy machine.

Loader: tokens/s of ``BatchLoader`` over the shards just written, packed and padded,
micro-batch 2 x 2048 (padded also reports the real, non-padding tokens/s).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer

import engine.data.preprocess as prep
from engine.data.atomic import write_json_atomic
from engine.data.jsonl import iter_records
from engine.data.loader import BatchLoader, PackedDataset, PaddedDataset
from engine.kernels.constants import IGNORE_INDEX

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED = REPO_ROOT.parent / "shared"
DEFAULT_INPUT = SHARED / "data" / "pile-sample-train.jsonl.zst"
DEFAULT_TOKENIZER = SHARED / "tokenizers" / "gpt-neox-20b-tokenizer.json"
DEFAULT_JSON = REPO_ROOT / "benchmarks" / "results" / "preprocess.json"
ENCODE_BATCH_REF = "raw encode_batch (all texts, one call)"


def read_texts(path: Path, max_docs: int | None) -> list[str]:
    texts = []
    for record in iter_records(path, 0):
        if record.text is not None:
            texts.append(record.text)
            if max_docs and len(texts) == max_docs:
                break
    return texts


def batches_of(texts: list[str], batch_bytes: int) -> list[list[str]]:
    batches, current, size = [], [], 0
    for text in texts:
        current.append(text)
        size += len(text)
        if size >= batch_bytes:
            batches.append(current)
            current, size = [], 0
    if current:
        batches.append(current)
    return batches


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", type=Path, default=DEFAULT_INPUT)
    parser.add_argument("--tokenizer", type=Path, default=DEFAULT_TOKENIZER)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    parser.add_argument("--max-docs", type=int, default=None,
                        help="use only the first N documents (a written subset file)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--workers", default="1,2", help="comma-separated --workers values")
    parser.add_argument("--loader-batches", type=int, default=3000)
    args = parser.parse_args(argv)
    for path in (args.input, args.tokenizer):
        if not path.is_file():
            parser.error(f"{path} not found (pass --input/--tokenizer)")
    return args


def subset_file(source: Path, max_docs: int, work: Path) -> Path:
    """The first max_docs documents of source as a .jsonl.zst of their own."""
    import zstandard

    texts = read_texts(source, max_docs)
    subset = work / "subset.jsonl.zst"
    payload = "".join(json.dumps({"text": t}) + "\n" for t in texts).encode()
    subset.write_bytes(zstandard.ZstdCompressor().compress(payload))
    return subset


def preprocess_modes(texts, tokenizer_path: Path, source: Path, workers: list[int], work: Path):
    """{mode name: fn() -> tokens}: raw tokenizer variants and our end-to-end preprocess."""
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    batches = batches_of(texts, prep.BATCH_BYTES)

    def raw(method: str, grouped: bool):
        def go():
            encode = getattr(tokenizer, method)
            groups = batches if grouped else [texts]
            return sum(len(e.ids) + 1 for g in groups for e in encode(g))
        return go

    def ours(count: int):
        def go():
            out = work / f"out_w{count}"
            shutil.rmtree(out, ignore_errors=True)
            manifest = prep.preprocess([source], tokenizer_path, out, workers=count,
                                       show_progress=False)
            return manifest["totals"]["tokens"]
        return go

    modes = {
        ENCODE_BATCH_REF: raw("encode_batch", False),
        "raw encode_batch (1 MiB batches)": raw("encode_batch", True),
    }
    if hasattr(tokenizer, "encode_batch_fast"):
        modes["raw encode_batch_fast (1 MiB batches)"] = raw("encode_batch_fast", True)
    for count in workers:
        modes[f"engine.data.preprocess end-to-end, workers={count}"] = ours(count)
    return modes


def time_modes(modes: dict, repeats: int) -> tuple[list[dict], dict[str, int], str]:
    """Best time of each mode over interleaved repeats; rows with both ratios."""
    best: dict[str, float] = {}
    tokens: dict[str, int] = {}
    for _ in range(repeats):
        for name, fn in modes.items():
            start = time.perf_counter()
            tokens[name] = fn()
            best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
    fastest_raw = min((n for n in modes if n.startswith("raw")), key=lambda n: best[n])
    rows = [{
        "mode": name,
        "seconds": best[name],
        "tokens": tokens[name],
        "tokens_per_s": tokens[name] / best[name],
        "vs_fastest_raw": best[fastest_raw] / best[name],
        "vs_encode_batch_one_call": best[ENCODE_BATCH_REF] / best[name],
    } for name in modes]
    return rows, tokens, fastest_raw


def loader_throughput(shards: Path, batches: int) -> list[dict]:
    """Tokens/s of BatchLoader over the shards, packed and padded, micro-batch 2 x 2048."""
    rows = []
    for label, dataset in (("packed", PackedDataset(shards, 2048)),
                           ("padded", PaddedDataset(shards, 2048))):
        it = iter(BatchLoader(dataset, 2, seed=0))
        next(it)
        count = real = 0
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
            count += batch["input_ids"].numel()
            real += int((batch["labels"] != IGNORE_INDEX).sum()) if label == "padded" else 0
        elapsed = time.perf_counter() - start
        rows.append({
            "variant": label,
            "batches": batches,
            "tokens_per_s": count / elapsed,
            "real_tokens_per_s": (real / elapsed) if label == "padded" else count / elapsed,
        })
    return rows


def print_tables(result: dict, tokens: dict[str, int], manifest: dict) -> None:
    print(f"input {Path(result['input']).name}: {result['documents']:,} documents, "
          f"{result['text_mb']:.1f} MB of text, {tokens[ENCODE_BATCH_REF]:,} tokens incl. EOS; "
          f"read+parse alone {result['read_parse_seconds']:.2f} s")
    print(f"shards: {manifest['totals']['shards']} x {manifest['dtype']}, "
          f"{sum(s['bin_bytes'] for s in manifest['shards']) / 1e6:.1f} MB .bin")
    print(f"{'mode':44s} {'seconds':>8s} {'tokens/s':>12s} {'vs fastest raw':>15s} "
          f"{'vs encode_batch':>16s}")
    for row in result["preprocess"]:
        print(f"{row['mode']:44s} {row['seconds']:8.2f} {row['tokens_per_s']:12,.0f} "
              f"{row['vs_fastest_raw']:15.2f} {row['vs_encode_batch_one_call']:16.2f}")
    print(f"{'loader (micro-batch 2 x 2048)':44s} {'tokens/s':>12s} {'real tokens/s':>15s}")
    for row in result["loader"]:
        print(f"{row['variant']:44s} {row['tokens_per_s']:12,.0f} "
              f"{row['real_tokens_per_s']:15,.0f}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_preprocess_"))
    try:
        source = subset_file(args.input, args.max_docs, work) if args.max_docs else args.input
        start = time.perf_counter()
        texts = read_texts(source, None)
        read_s = time.perf_counter() - start
        workers = [int(w) for w in args.workers.split(",")]
        modes = preprocess_modes(texts, args.tokenizer, source, workers, work)
        rows, tokens, fastest_raw = time_modes(modes, args.repeats)
        shards = work / f"out_w{workers[0]}"
        manifest = json.loads((shards / "manifest.json").read_text())
        loader_rows = loader_throughput(shards, args.loader_batches)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    result = {
        "benchmark": "preprocess",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_average": os.getloadavg()},
        "input": str(source), "documents": len(texts),
        "text_mb": sum(len(t.encode()) for t in texts) / 1e6,
        "read_parse_seconds": read_s,
        "shards": manifest["totals"]["shards"],
        "shard_bin_bytes": [s["bin_bytes"] for s in manifest["shards"]],
        "preprocess": rows, "fastest_raw": fastest_raw, "loader": loader_rows,
    }
    print_tables(result, tokens, manifest)
    write_json_atomic(args.json, result, indent=1)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
