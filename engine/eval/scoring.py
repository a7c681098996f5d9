"""Held-out evaluation: perplexity, KD to a teacher, and lm-evaluation-harness task scoring.

Two entry points share one scoring core, so a number printed by `python -m engine.eval` and the
training loop's periodic validation (`heldout_metrics`) come from the same arithmetic:

- `heldout_metrics(student, batches, teacher=...)`: token CE / ppl over labelled batches and,
  with a teacher, the per-token KD term the training loss uses.
- the CLI (`python -m engine.eval --model DIR --task ppl|lambada|mc --data FILE`), whose tasks
  live in engine/eval_tasks.py and whose `--compare` table lives in engine/compare.py.

All probability math is fp32 on chunks of rows, whatever the model's dtype: bf16 logits give
visibly wrong log-probabilities, and a [tokens, 50304] fp32 matrix for a whole batch would not
fit beside a training run. When the model exposes `hidden_states` and `embed_out` (our GPTNeoX),
the vocabulary projection runs only on the positions that are scored: for pythia-70m the head
is more than half of the FLOPs per token, and harness tasks score a few tokens per request.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from data.atomic import write_text_atomic
from engine.step import autocast_context, model_device

IGNORE_INDEX = -100
# Rows of logits turned into log-probabilities at once: 1024 x 50304 x 4 B = 206 MB per tensor.
DEFAULT_CHUNK_ROWS = 1024



@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None):
    """Switch models to eval mode and restore each one's previous mode afterwards.

    The training loop calls heldout_metrics in the middle of training: leaving the student in
    eval mode (or a frozen teacher in train mode) would silently change what follows.
    """
    present = [m for m in models if m is not None]
    previous = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, was_training in zip(present, previous, strict=True):
            m.train(was_training)


def _as_logits(output) -> torch.Tensor:
    """Our GPTNeoX returns a tensor; transformers models return an output with `.logits`."""
    return output.logits if hasattr(output, "logits") else output


def _head_split(model: torch.nn.Module):
    """(hidden_states function, head module) when the model exposes both, else None."""
    hidden = getattr(model, "hidden_states", None)
    head = getattr(model, "embed_out", None)
    if callable(hidden) and isinstance(head, torch.nn.Module):
        return hidden, head
    return None


def selected_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[torch.Tensor]:
    """Yield fp32 logits [rows, V] for `positions` (flat indices into B*T), chunk by chunk.

    Must run under torch.no_grad(). The forward runs once; only the chosen rows are projected
    (or, for a model without `hidden_states`/`embed_out`, sliced out of the full logits).
    Autocast is entered per chunk, never across a `yield`, so the caller's math stays fp32.
    """
    device = input_ids.device
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # evaluation needs no gradient hooks, and the wrapper hides the head
    split = _head_split(model)
    with autocast_context(device.type, autocast_dtype):
        if split is not None:
            hidden_fn, head = split
            hidden = hidden_fn(input_ids)
            rows = hidden.reshape(-1, hidden.shape[-1])
        else:
            head = None
            logits = _as_logits(model(input_ids))
            rows = logits.reshape(-1, logits.shape[-1])
    for start in range(0, positions.numel(), chunk_rows):
        index = positions[start : start + chunk_rows]
        with autocast_context(device.type, autocast_dtype):
            chunk = rows.index_select(0, index)
            if head is not None:
                chunk = head(chunk)
        yield chunk.float()


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood), inf rather than OverflowError for a hopeless model."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def _no_grad_iter(iterator: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Advance a generator under no_grad (its forward runs lazily, at the first next())."""
    while True:
        with torch.no_grad():
            item = next(iterator, None)
        if item is None:
            return
        yield item


def _restrict_vocab(logits: torch.Tensor, valid_vocab: int | None) -> torch.Tensor:
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        return logits[:, :valid_vocab]
    return logits


def _check_targets(targets: torch.Tensor, columns: int, what: str) -> None:
    """Every label id indexes a scored column; one host sync for the whole batch."""
    if targets.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(targets)).tolist()
    if high >= columns or low < 0:
        raise ValueError(
            f"{what}: label ids must lie in [0, {columns}) (the scored vocabulary), "
            f"found min {low} max {high}"
        )


def score_batch(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    valid_vocab: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sums for harness-style scoring of one padded batch (labels already shifted).

    Returns (loglik [B] float64, all_greedy [B] bool, scored_tokens [B] int64) on the CPU:
    the summed log p(label) over labelled positions, whether the argmax equals the label at
    every labelled position, and how many positions were labelled. The model should be in
    eval mode (engine.eval_tasks.score_items sees to it once per call).
    """
    batch, length = labels.shape
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    targets = flat_labels.index_select(0, positions)
    row_of = torch.div(positions, length, rounding_mode="floor")
    loglik = torch.zeros(batch, dtype=torch.float64, device=labels.device)
    mismatches = torch.zeros(batch, dtype=torch.int64, device=labels.device)
    counts = torch.bincount(row_of, minlength=batch)
    offset = 0
    chunks = selected_logits(
        model, input_ids, positions, autocast_dtype=autocast_dtype, chunk_rows=chunk_rows
    )
    for logits in _no_grad_iter(chunks):
        logits = _restrict_vocab(logits, valid_vocab)
        rows = logits.shape[0]
        chunk_targets = targets[offset : offset + rows]
        chunk_rows_of = row_of[offset : offset + rows]
        if offset == 0:  # every chunk has the same columns: check all targets once
            _check_targets(targets, logits.shape[-1], "score_batch")
        target_logp = F.log_softmax(logits, dim=-1).gather(1, chunk_targets[:, None]).squeeze(1)
        loglik.index_add_(0, chunk_rows_of, target_logp.double())
        wrong = (logits.argmax(dim=-1) != chunk_targets).long()
        mismatches.index_add_(0, chunk_rows_of, wrong)
        offset += rows
    return loglik.cpu(), (mismatches == 0).cpu(), counts.cpu()


def heldout_metrics(
    student: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    teacher: torch.nn.Module | None = None,
    temperature: float = 2.0,
    valid_vocab: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    reduce_across_ranks: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> dict[str, float]:
    """Token-level held-out metrics of `student` (and its distance to `teacher`) over `batches`.

    `batches` yields dicts with "input_ids" and "labels" ([B, T] int64; labels already shifted,
    -100 = not scored), e.g. a `data.loader.BatchLoader(split="val")`. Logit columns
    >= `valid_vocab` (the padded rows of Pythia's 50304-row head) are excluded from every
    softmax and argmax, exactly as the training loss does.

    Returns python numbers:
      "ce"          mean token cross-entropy (nats) of the student,
      "ppl"         exp(ce),
      "tokens"      number of scored tokens,
    and with a teacher also
      "kd"          mean per token of T^2 * KL(softmax(t/T) || softmax(s/T)) (the KD term of
                    the training loss),
      "teacher_ce"  the teacher's mean token cross-entropy on the same tokens.

    Runs under torch.no_grad() (not inference_mode: a module that caches a tensor during this
    call, such as a rotary table, must still be usable by the next training step), puts the
    models in eval mode and restores their previous modes. With `reduce_across_ranks` the sums
    are all-reduced over the default torch.distributed group before the means, so ranks that
    each evaluate their share of a split validation set report the same global numbers.
    """
    if temperature <= 0:
        raise ValueError(f"heldout_metrics: temperature must be positive, got {temperature}")
    device = model_device(student)
    ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    kd_sum = torch.zeros((), dtype=torch.float64, device=device)
    teacher_ce_sum = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    with eval_mode(student, teacher), torch.no_grad():
        for number, batch in enumerate(batches):
            try:
                input_ids = batch["input_ids"].to(device, non_blocking=True)
                labels = batch["labels"].to(device, non_blocking=True)
            except (KeyError, TypeError) as error:
                raise ValueError(
                    f"heldout_metrics: batch {number} must be a dict with tensors 'input_ids' "
                    f"and 'labels' ({error!r})"
                ) from None
            if input_ids.shape != labels.shape or input_ids.dim() != 2:
                raise ValueError(
                    f"heldout_metrics: batch {number} input_ids {tuple(input_ids.shape)} and "
                    f"labels {tuple(labels.shape)} must both be [B, T]"
                )
            flat_labels = labels.reshape(-1)
            positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
            if positions.numel() == 0:
                continue
            targets = flat_labels.index_select(0, positions)
            student_chunks = selected_logits(
                student,
                input_ids,
                positions,
                autocast_dtype=autocast_dtype,
                chunk_rows=chunk_rows,
            )
            teacher_chunks = (
                selected_logits(
                    teacher,
                    input_ids,
                    positions,
                    autocast_dtype=autocast_dtype,
                    chunk_rows=chunk_rows,
                )
                if teacher is not None
                else None
            )
            offset = 0
            for s_logits in student_chunks:
                s_logits = _restrict_vocab(s_logits, valid_vocab)
                rows = s_logits.shape[0]
                chunk_targets = targets[offset : offset + rows]
                if offset == 0:  # every chunk has the same columns: check all targets once
                    _check_targets(targets, s_logits.shape[-1], f"heldout_metrics batch {number}")
                ce_sum += F.cross_entropy(s_logits, chunk_targets, reduction="sum").double()
                if teacher_chunks is not None:
                    t_logits = _restrict_vocab(next(teacher_chunks), valid_vocab)
                    if t_logits.shape[-1] != s_logits.shape[-1]:
                        raise ValueError(
                            f"heldout_metrics: teacher scores {t_logits.shape[-1]} vocabulary "
                            f"columns but the student {s_logits.shape[-1]}; pass valid_vocab "
                            "to compare the shared tokenizer rows"
                        )
                    teacher_ce_sum += F.cross_entropy(
                        t_logits, chunk_targets, reduction="sum"
                    ).double()
                    t_logp = F.log_softmax(t_logits / temperature, dim=-1)
                    s_logp = F.log_softmax(s_logits / temperature, dim=-1)
                    # p_t * (log p_t - log p_s); exp of a finite log-prob is never 0*log(0) NaN.
                    kl = (t_logp.exp() * (t_logp - s_logp)).sum()
                    kd_sum += (temperature**2) * kl.double()
                offset += rows
            tokens += positions.numel()
    if reduce_across_ranks and dist.is_available() and dist.is_initialized():
        packed = torch.stack([ce_sum, kd_sum, teacher_ce_sum, tokens])
        dist.all_reduce(packed)
        ce_sum, kd_sum, teacher_ce_sum, tokens = packed.unbind()
    count = int(tokens.item())
    if count == 0:
        raise ValueError("heldout_metrics: the batches hold no labelled token (all are -100)")
    ce = float(ce_sum.item()) / count
    metrics = {"ce": ce, "ppl": perplexity(ce), "tokens": count}
    if teacher is not None:
        metrics["kd"] = float(kd_sum.item()) / count
        metrics["teacher_ce"] = float(teacher_ce_sum.item()) / count
    return metrics


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _build_parser():
    import argparse

    from engine.eval_tasks import TASKS

    parser = argparse.ArgumentParser(
        prog="python -m engine.eval",
        description="Held-out perplexity and lm-evaluation-harness-compatible scoring "
        "(lambada, multiple choice) of GPT-NeoX model folders.",
    )
    parser.add_argument("--model", required=True, help="model folder (config.json + safetensors)")
    parser.add_argument(
        "--compare",
        nargs="+",
        default=[],
        metavar="DIR",
        help="more model folders evaluated on the same data; prints one Markdown table "
        "(the JSON then goes only to --json)",
    )
    parser.add_argument(
        "--tokenizer", help="tokenizer.json (default: the model folder's tokenizer.json)"
    )
    parser.add_argument(
        "--task", nargs="+", required=True, choices=TASKS, help="one task per --data file"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="jsonl(.zst) file per task; for ppl also a shard folder or .idx/.bin prefix",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 ... (default: auto)")
    parser.add_argument(
        "--max-length", type=int, help="model input length (default: the model's max_positions)"
    )
    parser.add_argument(
        "--stride", type=int, help="ppl: new tokens scored per window (default: max-length)"
    )
    parser.add_argument(
        "--valid-vocab",
        type=int,
        help="exclude logit columns >= N (default: none, as lm-evaluation-harness)",
    )
    parser.add_argument(
        "--teacher",
        help="ppl: also report KD (T^2 KL(teacher||model)) and the teacher's CE on the tokens",
    )
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature (ppl)")
    parser.add_argument(
        "--heldout",
        choices=("packed", "padded"),
        help="ppl over shards: score the training loader's val split (packed windows or "
        "padded documents of max-length tokens), exactly as the training validation does",
    )
    parser.add_argument(
        "--val-fraction", type=float, default=0.01, help="--heldout: the run's data.val_fraction"
    )
    parser.add_argument("--pad-id", type=int, default=1, help="--heldout padded: the pad id")
    parser.add_argument(
        "--limit",
        type=int,
        help="only the first N documents of each file (--heldout: the first N sequences)",
    )
    parser.add_argument("--json", help="write the results JSON here instead of stdout")
    parser.add_argument(
        "--samples",
        action="store_true",
        help="lambada/mc: include every document's log-likelihoods in the JSON",
    )
    parser.add_argument("--png", help="also save the comparison as a PNG bar chart")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar even on a terminal"
    )
    return parser


def _data_name(path: str) -> str:
    """'piqa' for piqa.jsonl.zst, the folder name for a shard folder."""
    name = Path(path).name
    for suffix in (".zst", ".jsonl", ".json", ".idx", ".bin"):
        name = name.removesuffix(suffix)
    return name or str(path)


def _model_labels(paths: list[str]) -> list[str]:
    """Folder names, or parent/name where two models share a folder name."""
    names = [Path(p).resolve().name for p in paths]
    return [
        f"{Path(p).resolve().parent.name}/{n}" if names.count(n) > 1 else n
        for p, n in zip(paths, names, strict=True)
    ]


def _json_safe(value):
    """NaN / inf (a standard error of one document, a hopeless ppl) become null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def _device_of(args) -> str:
    if args.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return args.device


def evaluate_folder(model_dir: str, args, label: str, teacher=None) -> list[dict]:
    """Load one model folder and run every (task, data) pair of `args` on it."""
    from engine.eval_tasks import (
        EvalInputError,
        ScoringSetup,
        TextEncoder,
        evaluate_heldout,
        evaluate_lambada,
        evaluate_mc,
        evaluate_ppl,
    )
    from engine.model import GPTNeoX

    model = GPTNeoX.from_pretrained(model_dir, dtype=DTYPES[args.dtype], device=_device_of(args))
    config = model.config
    max_length = args.max_length or config.max_positions
    if not 0 < max_length <= config.max_positions:
        raise EvalInputError(
            f"--max-length {max_length} must be in [1, {config.max_positions}] "
            f"(max_positions of {model_dir})"
        )
    if args.valid_vocab is not None and not 0 < args.valid_vocab <= config.vocab_size:
        raise EvalInputError(
            f"--valid-vocab {args.valid_vocab} must be in [1, {config.vocab_size}] "
            f"(vocab_size of {model_dir})"
        )
    tokenizer_path = args.tokenizer or Path(model_dir) / "tokenizer.json"
    encoder = None
    if args.tokenizer or Path(tokenizer_path).is_file():
        encoder = TextEncoder(tokenizer_path, eos_id=config.eos_token_id)
        encoder.check_fits(config.vocab_size, str(model_dir))
    setup = ScoringSetup(
        model=model,
        max_length=max_length,
        batch_size=args.batch_size,
        valid_vocab=args.valid_vocab,
        progress=False if args.no_progress else None,
    )
    rows = []
    for task, data in zip(args.task, args.data, strict=True):
        if task in ("lambada", "mc") and encoder is None:
            raise EvalInputError(
                f"task {task} needs a tokenizer: pass --tokenizer or put tokenizer.json "
                f"in {model_dir}"
            )
        if task == "lambada":
            metrics = evaluate_lambada(setup, encoder, data, limit=args.limit, samples=args.samples)
        elif task == "mc":
            metrics = evaluate_mc(setup, encoder, data, limit=args.limit, samples=args.samples)
        elif args.heldout:
            metrics = evaluate_heldout(
                setup,
                data,
                packed=args.heldout == "packed",
                val_fraction=args.val_fraction,
                pad_id=args.pad_id,
                limit=args.limit,
                teacher=teacher,
                temperature=args.temperature,
            )
        else:
            metrics = evaluate_ppl(
                setup,
                encoder,
                data,
                model_vocab=config.vocab_size,
                eos_id=encoder.eos_id if encoder is not None else config.eos_token_id,
                stride=args.stride,
                limit=args.limit,
                teacher=teacher,
                temperature=args.temperature,
            )
        rows.append(
            {
                "model": str(model_dir),
                "model_label": label,
                "name": _data_name(data),
                "data": str(data),
                "max_length": max_length,
                **metrics,
            }
        )
    del model
    return rows


def main(argv: list[str] | None = None) -> int:
    import json
    import sys

    args = _build_parser().parse_args(argv)
    try:
        if len(args.task) != len(args.data):
            raise ValueError(
                f"--task names {len(args.task)} task(s) but --data {len(args.data)} file(s): "
                "give one data file per task"
            )
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.temperature <= 0:
            raise ValueError(f"--temperature must be positive, got {args.temperature}")
        if (args.teacher or args.heldout) and set(args.task) != {"ppl"}:
            raise ValueError("--teacher and --heldout apply to the ppl task only")
        teacher = None
        if args.teacher:
            from engine.model import GPTNeoX

            teacher = GPTNeoX.from_pretrained(
                args.teacher, dtype=DTYPES[args.dtype], device=_device_of(args)
            )
        models = [args.model, *args.compare]
        rows = []
        for model_dir, label in zip(models, _model_labels(models), strict=True):
            rows.extend(evaluate_folder(model_dir, args, label, teacher))
        settings = {
            "batch_size": args.batch_size,
            "dtype": args.dtype,
            "max_length": args.max_length,
            "stride": args.stride,
            "valid_vocab": args.valid_vocab,
            "limit": args.limit,
            "teacher": args.teacher,
            "temperature": args.temperature if args.teacher else None,
            "heldout": args.heldout,
            "val_fraction": args.val_fraction if args.heldout else None,
        }
        document = _json_safe({"settings": settings, "results": rows})
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        if args.json:
            write_text_atomic(args.json, text)
            print(f"engine.eval: results written to {args.json}", file=sys.stderr)
        elif not args.compare:
            sys.stdout.write(text)
        if args.compare or args.png:
            from engine.compare import markdown_table, save_bar_chart

            if args.compare:
                sys.stdout.write(markdown_table(rows))
            if args.png:
                try:
                    save_bar_chart(rows, args.png)
                    print(f"engine.eval: bar chart written to {args.png}", file=sys.stderr)
                except ImportError:
                    print(
                        "engine.eval: matplotlib is not installed (pip install -e '.[plot]'); "
                        f"the PNG {args.png} was skipped",
                        file=sys.stderr,
                    )
    except (ValueError, OSError) as error:
        print(f"engine.eval: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
