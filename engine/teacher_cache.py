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
import os
import shlex
from pathlib import Path

import torch

from engine.data.loader import build_dataset
from engine.data.teacher_cache import FORMAT_NAME, FORMAT_VERSION, CacheError, model_fingerprint
from engine.data.teacher_cache_encode import KINDS, record_dtype
from engine.data.teacher_cache_job import build_cache
from engine.dist import resolve_device
from engine.model.hf_io import load_pretrained
from engine.precision import canonical_name, dtype_of

# Teacher logit rows encoded at once: 1024 x 50304 fp32 = 206 MB, like the evaluation's chunks.
CHUNK_ROWS = 1024


def _record_layout(kind: str, width: int, vocab: int) -> dict:
    ids = "uint16" if vocab <= 1 << 16 else "int32"
    values = "float16" if kind == "top_k" else "uint16"
    layout = {"ids": ids, "values": values, "aux": "float32", "count": "uint16",
              "flags": "uint16", "width": width}
    layout["bytes"] = record_dtype(width, ids, values).itemsize
    return layout


def _check_request(kind: str, width: int, temperature: float, valid_vocab: int, vocab: int):
    if kind not in KINDS:
        raise CacheError(f"kind {kind!r} must be one of {KINDS}")
    if not temperature > 0:
        raise CacheError(f"--temperature {temperature} must be > 0")
    if not 1 <= valid_vocab <= vocab:
        raise CacheError(f"--valid-vocab {valid_vocab} must be in [1, {vocab}] (the teacher's "
                         "vocabulary)")
    if kind == "top_k" and not 1 <= width <= valid_vocab:
        raise CacheError(f"--top-k {width} must be in [1, {valid_vocab}] (the scored vocabulary)")
    if kind == "sampled" and not 1 <= width < 1 << 16:
        raise CacheError(f"--samples {width} must be in [1, 65535] (counts are uint16)")


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
                 "fingerprint": dataset.fingerprint(), "tokens": shards.total_tokens,
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
    """
    if (top_k is None) == (samples is None):
        raise CacheError("give exactly one of --top-k K and --samples S")
    kind, width = ("top_k", top_k) if top_k is not None else ("sampled", samples)
    if batch < 1:
        raise CacheError(f"--batch {batch} must be >= 1")
    dataset = build_dataset(data, mode, seq_len, pad_id)
    run_device = resolve_device(device)
    model = load_pretrained(teacher, dtype=dtype_of(dtype), device=run_device).eval()
    vocab = model.config.vocab_size
    if valid_vocab is None:
        known = (dataset.shards.tokenizer_info() or {}).get("vocab_size")
        valid_vocab = known if known and known <= vocab else vocab
    _check_request(kind, width, temperature, valid_vocab, vocab)
    if seq_len > model.config.max_positions:
        raise CacheError(f"--seq-len {seq_len} exceeds the teacher's max_positions "
                         f"{model.config.max_positions}")
    settings = cache_settings(kind=kind, width=width, temperature=temperature,
                              valid_vocab=valid_vocab, seed=seed, batch=batch, dataset=dataset,
                              teacher_dir=teacher, teacher_vocab=vocab, teacher_dtype=dtype)
    command = resume_command(dict(teacher=teacher, data=data, out=out, top_k=top_k,
                                  samples=samples, temperature=temperature, seq_len=seq_len,
                                  mode=mode, pad_id=pad_id, batch=batch, valid_vocab=valid_vocab,
                                  dtype=dtype, device=device, seed=seed))
    return build_cache(Path(out), settings, command, dataset,
                       teacher_chunk_function(model, run_device),
                       show_progress=show_progress, checkpoint_seconds=checkpoint_seconds)
