"""`neox-distill cache-teacher`: run the teacher once, distill from its cache many times.

    neox-distill cache-teacher --teacher DIR --data SHARDS --out CACHE --top-k 64
    neox-distill cache-teacher --teacher DIR --data SHARDS --out CACHE --samples 32
    python -m engine.train --config ... --teacher.cache=CACHE      # no teacher loaded

Exit status 0 (built, or already built with these settings), 1 on any error (one line naming
the file), 130 when interrupted (run the same command again to continue).
"""

from __future__ import annotations

import argparse
import errno
import sys

from engine.teacher_cache import build_teacher_cache
from engine.train.file_writes import describe_write_error, is_disk_full
from engine.train.lock import RunLocked

DESCRIPTION = """\
Runs a teacher over token shards (an engine.data.preprocess folder) and stores, for every position
training will use, a few columns of the teacher's distribution at --temperature. Training
then reads the cache (teacher.cache=CACHE) instead of running the teacher.

Two kinds of cache (choose one):
  --top-k K     the teacher's K most likely next tokens with their log-probabilities, plus
                the probability left on all other tokens (the tail). The loss compares the
                K + 1 buckets exactly (K = the whole vocabulary is plain distillation); it
                misses how the teacher spreads its tail. 4K + 8 bytes per token.
  --samples S   S draws from the teacher's distribution (with replacement), stored as the
                distinct tokens drawn and how often. The loss is then an unbiased estimate of
                the distillation loss and its gradient (Sparse Logit Sampling, 2025): noisier
                per step, but with no bias from the cut-off tail. 4S + 8 bytes per token.

The cache is aligned with the shards token by token for one data mode and sequence length:
training with another --mode, --seq-len, --pad-id, other shards, another temperature or
tokenizer is refused. The build is resumable: if it is interrupted, run the same command
again; the result is byte-identical to an uninterrupted build."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neox-distill cache-teacher",
                                     description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True, help="teacher model folder (HF GPT-NeoX)")
    parser.add_argument("--data", required=True,
                        help="token shards (neox-distill preprocess output)")
    parser.add_argument("--out", required=True, help="cache folder (new, empty, or this job's)")
    kind = parser.add_mutually_exclusive_group(required=True)
    kind.add_argument("--top-k", type=int, help="keep the K most likely tokens + the tail")
    kind.add_argument("--samples", type=int, help="keep S draws from the teacher")
    parser.add_argument("--temperature", type=float, default=2.0,
                        help="the distillation temperature (loss.temperature; default 2)")
    parser.add_argument("--seq-len", type=int, default=2048, help="batch.seq_len (default 2048)")
    parser.add_argument("--mode", choices=("packed", "padded"), default="packed",
                        help="data.mode (default packed)")
    parser.add_argument("--pad-id", type=int, default=1, help="data.pad_id (padded mode)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per teacher forward")
    parser.add_argument("--valid-vocab", type=int, default=None,
                        help="data.valid_vocab (default: the shards' tokenizer vocabulary)")
    parser.add_argument("--dtype", default="bf16", help="teacher dtype (teacher.dtype; bf16)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (--samples only)")
    return parser


def describe_os_error(exc: OSError) -> str:
    """One line for an OSError of the build: the file first, then why; for a full disk or a
    file-size limit, that the build continues where it stopped once there is room."""
    where = f"{exc.filename}: " if exc.filename else ""
    if is_disk_full(exc) or exc.errno == errno.EFBIG:
        why = ("file too large (the file-size limit, ulimit -f)" if exc.errno == errno.EFBIG
               else describe_write_error(exc))
        return (f"{where}{why}; make room, then run the same command again to continue "
                "where the build stopped")
    return f"{where}{exc.strerror or exc}"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        manifest = build_teacher_cache(
            args.teacher, args.data, args.out, top_k=args.top_k, samples=args.samples,
            temperature=args.temperature, seq_len=args.seq_len, mode=args.mode,
            pad_id=args.pad_id, batch=args.batch, valid_vocab=args.valid_vocab,
            dtype=args.dtype, device=args.device, seed=args.seed)
    except (ValueError, RunLocked) as exc:  # CacheError, ShardError, bad settings, a lock
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"error: {describe_os_error(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: run the same command again to continue", file=sys.stderr)
        return 130
    totals = manifest["totals"]
    print(f"{args.out}: {manifest['kind']} cache, width {manifest['width']}, T "
          f"{manifest['temperature']}: {totals['rows']:,} positions in {totals['shards']} "
          f"shard(s), {totals['bytes']:,} bytes ({totals['bytes_per_token']} per token)",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
