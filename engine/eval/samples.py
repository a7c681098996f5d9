"""The `samples` task: what on-policy training lowers, measured on held-out prompts.

A model continues prompts (the first `prompt_tokens` tokens of held-out documents or windows)
by sampling, exactly as an on-policy training step does (engine.on_policy.student_batch), and
a teacher scores what it wrote: `teacher_nll` is the teacher's mean negative log-likelihood
per generated token of the model's own samples (engine.on_policy.teacher_nll_sum, fp32,
temperature 1), `teacher_ppl` its exp, `mean_new_tokens` the mean length the model wrote
(below `new_tokens` only when a stop token ends rows early). Off-policy distillation lowers
the teacher's NLL of the *teacher's* text; this is the same quantity on the student's.

The draws come from one torch.Generator seeded with `seed`, batch after batch in prompt
order: the same seed, prompts and batch size give the same samples and numbers on the CPU.
`sampled_teacher_nll` is the Python entry (a [N, P] tensor of prompts in, a dict out) that a
study calls; `evaluate_samples` reads the prompts from a data file for `python -m
engine.eval --task samples`.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from engine.data.loader import build_dataset
from engine.eval.heldout import heldout_batches, heldout_loader
from engine.eval.requests import EvalInputError, TextEncoder, corpus_documents
from engine.eval.scoring import eval_mode
from engine.kernels.constants import IGNORE_INDEX
from engine.model.network import autocast_context, model_device
from engine.on_policy import SamplingSettings, student_batch, teacher_nll_sum
from engine.sampling import new_generator

SAMPLES_TASK = "samples"


def _teacher_head(model, teacher, settings: SamplingSettings) -> torch.Tensor:
    """The teacher's head rows the samples can land on (settings.valid_vocab, else the
    model's vocabulary); ValueError when the teacher has fewer rows than that."""
    columns = settings.valid_vocab or model.config.vocab_size
    if columns > teacher.config.vocab_size:
        raise EvalInputError(
            f"the teacher's vocab_size {teacher.config.vocab_size} is smaller than the "
            f"{columns} tokens the model samples from (give --valid-vocab <= "
            f"{teacher.config.vocab_size})")
    return teacher.embed_out.weight[:columns]


@torch.no_grad()
def sampled_teacher_nll(model: torch.nn.Module, teacher: torch.nn.Module,
                        prompts: torch.Tensor, settings: SamplingSettings, *, seed: int = 0,
                        batch_size: int = 8,
                        autocast_dtype: torch.dtype | None = None) -> dict:
    """Sample continuations of `prompts` [N, P >= settings.prompt_tokens] (token ids) from
    `model` and score them with `teacher` (both our GPTNeoX).

    Returns {"documents": N, "tokens": generated tokens scored, "teacher_nll": mean NLL per
    generated token, "teacher_ppl": its exp, "mean_new_tokens": generated tokens per prompt}.
    Both models' train/eval modes are restored."""
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.shape[0] == 0:
        raise EvalInputError(f"prompts: expected a non-empty [N, P] tensor of token ids, got "
                             f"{getattr(prompts, 'shape', type(prompts).__name__)}")
    if batch_size < 1:
        raise EvalInputError(f"batch_size: must be >= 1, got {batch_size}")
    device = model_device(model)
    generator = new_generator(seed, device)
    head = _teacher_head(model, teacher, settings)
    teacher_device = model_device(teacher)
    nll, tokens = 0.0, 0
    with eval_mode(teacher):
        for start in range(0, prompts.shape[0], batch_size):
            rows = prompts[start: start + batch_size].to(device)
            batch = student_batch(model, rows, settings, generator=generator,
                                  autocast_dtype=autocast_dtype)
            input_ids = batch["input_ids"].to(teacher_device)
            labels = batch["labels"].to(teacher_device)
            with autocast_context(teacher_device.type, autocast_dtype):
                hidden = teacher.hidden_states(input_ids)
            nll += float(teacher_nll_sum(hidden, labels, head))
            tokens += int((labels != IGNORE_INDEX).sum())
    mean = nll / tokens
    return {"documents": int(prompts.shape[0]), "tokens": tokens, "teacher_nll": mean,
            "teacher_ppl": math.exp(mean) if mean < 700 else float("inf"),
            "mean_new_tokens": tokens / prompts.shape[0]}


def corpus_prompts(path: Path, encoder: TextEncoder | None, prompt_tokens: int, *,
                   model_vocab: int, eos_id: int,
                   limit: int | None) -> tuple[torch.Tensor | None, int]:
    """(prompts [N, prompt_tokens] or None, documents skipped): the first prompt_tokens tokens
    of each document of a jsonl corpus or of shards that has more tokens than that as stored
    (its text, then the EOS that ends it), so a prompt never ends on a document's end;
    shorter documents are skipped and counted. `limit` caps the prompts."""
    kept, skipped = [], 0
    for _, tokens in corpus_documents(path, encoder, model_vocab, eos_id):
        if len(tokens) <= prompt_tokens:
            skipped += 1
            continue
        kept.append(torch.from_numpy(tokens[:prompt_tokens].copy()))
        if limit is not None and len(kept) >= limit:
            break
    return (torch.stack(kept) if kept else None), skipped


def heldout_prompts(path: Path, prompt_tokens: int, *, packed: bool, seq_len: int,
                    val_fraction: float, pad_id: int, batch_size: int,
                    limit: int | None) -> tuple[torch.Tensor | None, int]:
    """(prompts, sequences skipped) from the training loader's validation split of a shard
    folder (engine/eval/heldout.py): the first prompt_tokens of every held-out sequence whose
    document reaches past them (packed windows always do; a padded document of fewer tokens
    would prompt with padding and is skipped). `limit` counts sequences read."""
    if prompt_tokens > seq_len:
        raise EvalInputError(f"--prompt-tokens {prompt_tokens} is longer than the held-out "
                             f"sequences (--max-length {seq_len})")
    dataset = build_dataset(path, "packed" if packed else "padded", seq_len, pad_id)
    loader = heldout_loader(dataset, batch_size, val_fraction=val_fraction)
    if len(loader.items) == 0:
        raise EvalInputError(
            f"{path}: val_fraction {val_fraction} of {len(dataset)} sequences holds out none")
    kept, skipped = [], 0
    for batch in heldout_batches(loader, max_sequences=limit):
        # Position t predicts token t + 1, so labels hold the document's tokens after the first.
        long_enough = (batch["labels"] != IGNORE_INDEX).sum(dim=1) >= prompt_tokens
        kept.append(batch["input_ids"][long_enough, :prompt_tokens].cpu())
        skipped += int((~long_enough).sum())
    prompts = torch.cat(kept)
    return (prompts if len(prompts) else None), skipped


def evaluate_samples(setup, encoder: TextEncoder | None, path: str | Path, *,
                     teacher: torch.nn.Module | None, settings: SamplingSettings,
                     seed: int = 0, limit: int | None = None, model_vocab: int,
                     eos_id: int = 0, heldout: str | None = None, val_fraction: float = 0.01,
                     pad_id: int = 1) -> dict:
    """The `samples` task on a jsonl corpus or shards (`heldout` None), or on the training
    loader's validation split of a shard folder ("packed" / "padded" sequences of
    setup.max_length tokens). `setup` is the task's engine.eval.tasks.ScoringSetup."""
    if teacher is None:
        raise EvalInputError("task samples needs --teacher: the model that scores the samples")
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: data not found")
    if heldout is None:
        prompts, skipped = corpus_prompts(path, encoder, settings.prompt_tokens,
                                          model_vocab=model_vocab, eos_id=eos_id, limit=limit)
    else:
        prompts, skipped = heldout_prompts(
            path, settings.prompt_tokens, packed=heldout == "packed", seq_len=setup.max_length,
            val_fraction=val_fraction, pad_id=pad_id, batch_size=setup.batch_size, limit=limit)
    if prompts is None:
        raise EvalInputError(f"{path}: no document holds more than --prompt-tokens "
                             f"{settings.prompt_tokens} tokens ({skipped} too short)")
    metrics = sampled_teacher_nll(setup.model, teacher, prompts, settings, seed=seed,
                                  batch_size=setup.batch_size,
                                  autocast_dtype=setup.autocast_dtype)
    return {"task": SAMPLES_TASK, **metrics, "skipped_short": skipped,
            "prompt_tokens": settings.prompt_tokens, "new_tokens": settings.new_tokens,
            "temperature": settings.temperature, "top_k": settings.top_k,
            "top_p": settings.top_p, "stop_token": settings.stop_token, "seed": seed}
