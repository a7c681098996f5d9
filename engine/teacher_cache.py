"""Run a teacher over token shards once and store what distillation needs (the teacher cache).

`build_teacher_cache` loads the teacher, builds the training dataset exactly as engine.train
will read it (same mode, seq_len, pad_id), and hands engine.data.teacher_cache_job the function that
turns a batch of token ids into the teacher's logits at the trained positions. Those logits
come from one forward to the final hidden states, then the head on the trained positions
only, a chunk of rows at a time, so no [tokens x vocab] tensor of a whole batch exists.
`neox-distill cache-teacher` is the command line.
"""

from __future__ import annotations

import json
import math
import os
import shlex
from pathlib import Path

import torch

from engine.data.loader import DATASET_MODES, build_dataset
from engine.data.shards import MANIFEST_NAME
from engine.data.teacher_cache import FORMAT_NAME, FORMAT_VERSION, CacheError, model_fingerprint
from engine.data.teacher_cache_encode import record_dtype
from engine.data.teacher_cache_job import build_cache, named_write_errors, refuse_foreign
from engine.dist import resolve_device
from engine.model.hf_io import load_pretrained
from engine.precision import canonical_name, dtype_of
from engine.train.lock import LOCK_NAME, RunLock

# Teacher logit rows encoded at once: 1024 x 50304 fp32 = 206 MB, like the evaluation's chunks.
CHUNK_ROWS = 1024


def _record_layout(kind: str, width: int, vocab: int) -> dict:
    ids = "uint16" if vocab <= 1 << 16 else "int32"
    values = "float16" if kind == "top_k" else "uint16"
    layout = {"ids": ids, "values": values, "aux": "float32", "count": "uint16",
              "flags": "uint16", "width": width}
    layout["bytes"] = record_dtype(width, ids, values).itemsize
    return layout


def check_arguments(*, top_k, samples, temperature, seq_len, mode, pad_id, batch, valid_vocab,
                    dtype, device, seed) -> tuple[str, int]:
    """(kind, width) of the request; CacheError naming the option for every value that is
    wrong whatever the data and teacher (checked before anything is read or written)."""
    if (top_k is None) == (samples is None):
        raise CacheError("give exactly one of --top-k K and --samples S")
    kind, width = ("top_k", top_k) if top_k is not None else ("sampled", samples)
    if kind == "top_k" and width < 1:
        raise CacheError(f"--top-k {width} must be >= 1")
    if kind == "sampled" and not 1 <= width < 1 << 16:
        raise CacheError(f"--samples {width} must be in [1, 65535] (counts are uint16)")
    if not (math.isfinite(temperature) and temperature > 0):
        raise CacheError(f"--temperature {temperature} must be a finite number > 0 (at inf "
                         "every token is equally likely: the cache would hold no teacher)")
    if seq_len < 1:
        raise CacheError(f"--seq-len {seq_len} must be >= 1")
    if mode not in DATASET_MODES:
        raise CacheError(f"--mode {mode!r} must be one of {', '.join(DATASET_MODES)}")
    if mode == "padded" and pad_id < 0:
        raise CacheError(f"--pad-id {pad_id} must be a token id (>= 0)")
    if batch < 1:
        raise CacheError(f"--batch {batch} must be >= 1")
    if valid_vocab is not None and valid_vocab < 1:
        raise CacheError(f"--valid-vocab {valid_vocab} must be >= 1")
    if not 0 <= seed < 1 << 63:
        raise CacheError(f"--seed {seed} must be in [0, 2**63)")
    for option, check, value in (("--dtype", canonical_name, dtype),
                                 ("--device", resolve_device, device)):
        try:
            check(value)
        except ValueError as exc:
            raise CacheError(f"{option} {value}: {exc}") from None
    return kind, width


def _resolve_vocab(kind, width, valid_vocab, dataset, teacher_config, *, data, mode,
                   pad_id, seq_len) -> int:
    """The scored vocabulary (--valid-vocab, by default the shards' tokenizer's), checked
    against the teacher and the shards; CacheError naming the option otherwise."""
    vocab = teacher_config.vocab_size
    info = dataset.shards.tokenizer_info() or {}
    known = info.get("vocab_size")
    if known and known > vocab:
        raise CacheError(f"--data {data}: tokenised with a {known}-token tokenizer, more than "
                         f"the teacher's {vocab} embedding rows (use a teacher made for it)")
    valid_vocab = valid_vocab or known or vocab
    if not 1 <= valid_vocab <= vocab:
        raise CacheError(f"--valid-vocab {valid_vocab} must be in [1, {vocab}] (the teacher's "
                         "vocabulary)")
    largest = info.get("max_token_id")
    if largest is not None and largest >= valid_vocab:
        raise CacheError(f"--valid-vocab {valid_vocab}: the shards hold token id {largest} "
                         f"({data}/{MANIFEST_NAME}), which training could not score; use "
                         f"--valid-vocab {largest + 1} or more")
    if kind == "top_k" and width > valid_vocab:
        raise CacheError(f"--top-k {width} must be in [1, {valid_vocab}] (the scored vocabulary)")
    if mode == "padded" and pad_id >= vocab:
        raise CacheError(f"--pad-id {pad_id} is outside the teacher's {vocab} embedding rows "
                         f"(use an id in [0, {vocab}))")
    if seq_len > teacher_config.max_positions:
        raise CacheError(f"--seq-len {seq_len} exceeds the teacher's max_positions "
                         f"{teacher_config.max_positions}")
    return valid_vocab


def cache_settings(*, kind, width, temperature, valid_vocab, seed, batch, dataset,
                   teacher_dir, teacher_vocab, teacher_dtype) -> dict:
    """What determines the cache's bytes (the manifest minus shards and totals); a resumed or
    repeated build must match it exactly."""
    shards = dataset.shards
    tokenizer = shards.tokenizer_info()
    return {
        "format": FORMAT_NAME, "format_version": FORMAT_VERSION,
        "kind": kind, "width": int(width), "temperature": float(temperature),
        "valid_vocab": int(valid_vocab), "seed": int(seed) if kind == "sampled" else None,
        "record": _record_layout(kind, int(width), teacher_vocab),
        "data": {"mode": "packed" if hasattr(dataset, "window") else "padded",
                 "seq_len": dataset.seq_len, "pad_id": getattr(dataset, "pad_id", None),
                 "fingerprint": dataset.fingerprint(), "content": shards.content_fingerprint(),
                 "tokens": shards.total_tokens,
                 "shards": [{"name": s.name, "tokens": s.total_tokens} for s in shards.shards]},
        "tokenizer": None if tokenizer is None else
        {k: tokenizer[k] for k in ("sha256", "fingerprint", "vocab_size")},
        "teacher": {"fingerprint": model_fingerprint(teacher_dir), "vocab_size": teacher_vocab,
                    "dtype": canonical_name(teacher_dtype),
                    "config": json.loads((Path(teacher_dir) / "config.json").read_text())},
        "batch": int(batch),
    }


def resume_command(args: dict) -> str:
    """The command line that continues this build (from the same working directory)."""
    words = ["neox-distill", "cache-teacher"]
    for key, value in args.items():
        if value is not None:
            words += [f"--{key.replace('_', '-')}", str(value)]
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(words)}"


def teacher_chunk_function(teacher, device: torch.device):
    """(input_ids, positions) -> the teacher's logits at those positions (flat indices into
    the [B, T] batch), CHUNK_ROWS rows at a time, in the head's dtype: one forward to the final
    hidden states, then the head on the chosen rows only (padding never reaches the head)."""

    def chunks(input_ids: torch.Tensor, positions: torch.Tensor):
        with torch.no_grad():
            hidden = teacher.hidden_states(input_ids.to(device))
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions.to(device))
            for start in range(0, rows.shape[0], CHUNK_ROWS):
                yield teacher.embed_out(rows[start:start + CHUNK_ROWS])

    return chunks


def build_teacher_cache(teacher: str, data: str, out: str, *, top_k: int | None = None,
                        samples: int | None = None, temperature: float = 2.0,
                        seq_len: int = 2048, mode: str = "packed", pad_id: int = 1,
                        batch: int = 8, valid_vocab: int | None = None, dtype: str = "bf16",
                        device: str = "auto", seed: int = 0, show_progress: bool | None = None,
                        checkpoint_seconds: float = 10.0) -> dict:
    """Build (or resume, or find finished) the cache of `teacher` over `data`; its manifest.

    Exactly one of top_k and samples. The rest as in `neox-distill cache-teacher --help`.
    Every argument is checked, and --out found new, empty or a cache folder, before anything
    is written; the build then holds a lock on --out (engine.train.lock, as a run holds its
    out_dir), so a second build into the same folder is refused instead of racing it.
    """
    kind, width = check_arguments(top_k=top_k, samples=samples, temperature=temperature,
                                  seq_len=seq_len, mode=mode, pad_id=pad_id, batch=batch,
                                  valid_vocab=valid_vocab, dtype=dtype, device=device, seed=seed)
    dataset = build_dataset(data, mode, seq_len, pad_id)
    refuse_foreign(Path(out), (LOCK_NAME,))
    run_device = resolve_device(device)
    model = load_pretrained(teacher, dtype=dtype_of(dtype), device=run_device).eval()
    valid_vocab = _resolve_vocab(kind, width, valid_vocab, dataset, model.config, data=data,
                                 mode=mode, pad_id=pad_id, seq_len=seq_len)
    settings = cache_settings(kind=kind, width=width, temperature=temperature,
                              valid_vocab=valid_vocab, seed=seed, batch=batch, dataset=dataset,
                              teacher_dir=teacher, teacher_vocab=model.config.vocab_size,
                              teacher_dtype=dtype)
    command = resume_command(dict(teacher=teacher, data=data, out=out, top_k=top_k,
                                  samples=samples, temperature=temperature, seq_len=seq_len,
                                  mode=mode, pad_id=pad_id, batch=batch, valid_vocab=valid_vocab,
                                  dtype=dtype, device=device, seed=seed))
    lock = RunLock(out, setting="--out", holder="neox-distill cache-teacher build")
    with named_write_errors(lock.path):
        lock.acquire()
    try:
        return build_cache(Path(out), settings, command, dataset,
                           teacher_chunk_function(model, run_device),
                           show_progress=show_progress, checkpoint_seconds=checkpoint_seconds,
                           owned=(LOCK_NAME,))
    finally:
        # A complete cache is its manifest and shards: the lock goes, still held. A build
        # that opened the old file meanwhile and locks it later finds the manifest too, and
        # past the manifest a build only reads.
        if (Path(out) / MANIFEST_NAME).is_file():
            lock.path.unlink(missing_ok=True)
        lock.release()
