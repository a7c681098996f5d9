"""`python -m engine.eval`: held-out perplexity and lm-evaluation-harness scoring of model folders.

    python -m engine.eval --model DIR --task lambada mc --data lambada.jsonl piqa.jsonl
    python -m engine.eval --model DIR --compare BASE --task ppl --data SHARDS --heldout packed
    python -m engine.eval --model DIR --teacher T --task samples --data SHARDS --heldout packed

`samples` (engine/eval/samples.py) samples continuations of held-out prompts from each model
and reports the teacher's NLL of them: the quantity on-policy distillation lowers.

Prints the results JSON (or writes it with --json); with --compare, one Markdown table of
every model (engine/eval/compare.py), optionally a PNG chart.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from engine.data.atomic import write_text_atomic
from engine.data.loader import DATASET_MODES
from engine.eval.compare import is_our_chart, markdown_table, save_bar_chart
from engine.eval.requests import EvalInputError, TextEncoder
from engine.eval.samples import SAMPLES_TASK, evaluate_samples
from engine.eval.tasks import (
    TASKS,
    ScoringSetup,
    evaluate_heldout,
    evaluate_lambada,
    evaluate_mc,
    evaluate_ppl,
)
from engine.kernels.divergences import DIVERGENCES
from engine.kernels.loss_spec import LossSpec
from engine.model.hf_io import load_pretrained
from engine.on_policy import SamplingSettings
from engine.precision import DTYPE_NAMES, dtype_of

# The harness tasks share one signature: (setup, encoder, data file, limit, samples).
HARNESS_TASKS = {"lambada": evaluate_lambada, "mc": evaluate_mc}
# The tasks of this command: the training loop's watched tasks (TASKS) and `samples`.
CLI_TASKS = (*TASKS, SAMPLES_TASK)


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="neox-distill eval",
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
        "--task", nargs="+", required=True, choices=CLI_TASKS, help="one task per --data file"
    )
    parser.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="jsonl(.zst) file per task; for ppl and samples also a shard folder or "
        ".idx/.bin prefix",
    )
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per forward")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32")
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
        help="ppl: also report KD (T^2 D(teacher, model), D per --divergence, default the "
        "forward KL) and the teacher's CE on the tokens; samples: the model that scores the "
        "samples (required)",
    )
    _add_kd_arguments(parser)
    _add_sampling_arguments(parser)
    parser.add_argument(
        "--heldout",
        choices=DATASET_MODES,
        help="ppl over shards: score the training loader's val split (packed windows or "
        "padded documents of max-length tokens), exactly as the training validation does; "
        "samples: prompt with that split's sequences",
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


def _add_kd_arguments(parser) -> None:
    """The KD term's settings (ppl with --teacher), named as the run's [loss] keys."""
    parser.add_argument("--temperature", type=float, default=2.0, help="KD temperature (ppl)")
    parser.add_argument(
        "--divergence",
        choices=DIVERGENCES,
        default="forward_kl",
        help="the KD term's divergence, as the run's loss.divergence (default forward_kl)",
    )
    parser.add_argument("--beta", type=float, default=0.5, help="jsd's beta (loss.beta)")
    parser.add_argument("--skew", type=float, default=0.1,
                        help="the skew divergences' mixing weight (loss.skew)")
    parser.add_argument(
        "--t2-scale",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="multiply the KD term by T^2 (loss.t2_scale; default on)",
    )


def _add_sampling_arguments(parser) -> None:
    """The samples task's settings, named as the run's [onpolicy] keys where they exist."""
    parser.add_argument("--prompt-tokens", type=int, default=32,
                        help="samples: prompt length, the first N tokens of each document "
                        "holding more (shorter ones are skipped and counted; default 32)")
    parser.add_argument("--new-tokens", type=int, default=32,
                        help="samples: tokens sampled after each prompt (default 32)")
    parser.add_argument("--sample-temperature", type=float, default=1.0,
                        help="samples: sampling temperature, 0 greedy (default 1.0)")
    parser.add_argument("--top-k", type=int, help="samples: keep the k most likely tokens")
    parser.add_argument("--top-p", type=float, help="samples: nucleus mass in (0, 1]")
    parser.add_argument("--stop-token", type=int,
                        help="samples: a token id that ends a row (default: none)")
    parser.add_argument("--seed", type=int, default=0,
                        help="samples: the sampler's seed (same seed, same numbers on the CPU)")


# SamplingSettings' names of its fields -> the flags that set them.
SAMPLING_FLAGS = {"prompt_tokens": "--prompt-tokens", "new_tokens": "--new-tokens",
                  "temperature": "--sample-temperature", "top_k": "--top-k", "top_p": "--top-p"}


def _sampling_settings(args) -> SamplingSettings | None:
    """The samples task's SamplingSettings (ValueError naming a bad one), None without it."""
    if SAMPLES_TASK not in args.task:
        return None
    try:
        return SamplingSettings(prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens,
                                temperature=args.sample_temperature, top_k=args.top_k,
                                top_p=args.top_p, stop_token=args.stop_token,
                                valid_vocab=args.valid_vocab)
    except ValueError as error:  # "top_k: must be ..." -> "--top-k: must be ..."
        key, _, reason = str(error).partition(":")
        raise ValueError(f"{SAMPLING_FLAGS.get(key, key)}:{reason}") from None


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


def _kd_spec(args) -> LossSpec:
    """The KD term --temperature, --divergence, --beta, --skew and --t2-scale describe
    (ValueError naming a bad one)."""
    return LossSpec(temperature=args.temperature, divergence=args.divergence, beta=args.beta,
                    skew=args.skew, t2_scale=args.t2_scale)


def _checked_max_length(args, config, model_dir: str) -> int:
    """--max-length (default max_positions), --valid-vocab and --pad-id against the model."""
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
    if args.heldout == "padded" and not 0 <= args.pad_id < config.vocab_size:
        raise EvalInputError(
            f"--pad-id {args.pad_id} is outside the {config.vocab_size} embedding rows of "
            f"{model_dir} (use an id in [0, {config.vocab_size}))"
        )
    return max_length


def evaluate_folder(model_dir: str, args, label: str, teacher=None) -> list[dict]:
    """Load one model folder and run every (task, data) pair of `args` on it."""
    model = load_pretrained(model_dir, dtype=dtype_of(args.dtype), device=_device_of(args))
    config = model.config
    max_length = _checked_max_length(args, config, model_dir)
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
        if task in HARNESS_TASKS and encoder is None:
            raise EvalInputError(
                f"task {task} needs a tokenizer: pass --tokenizer or put tokenizer.json "
                f"in {model_dir}"
            )
        if task in HARNESS_TASKS:
            metrics = HARNESS_TASKS[task](setup, encoder, data, args.limit, args.samples)
        elif task == SAMPLES_TASK:
            metrics = evaluate_samples(
                setup, encoder, data, teacher=teacher, settings=_sampling_settings(args),
                seed=args.seed, limit=args.limit, model_vocab=config.vocab_size,
                eos_id=encoder.eos_id if encoder is not None else config.eos_token_id,
                heldout=args.heldout, val_fraction=args.val_fraction, pad_id=args.pad_id)
        elif args.heldout:
            metrics = evaluate_heldout(
                setup,
                data,
                packed=args.heldout == "packed",
                val_fraction=args.val_fraction,
                pad_id=args.pad_id,
                limit=args.limit,
                teacher=teacher,
                spec=_kd_spec(args),
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
                spec=_kd_spec(args),
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


def is_our_results(path: Path) -> bool:
    """A results JSON this command wrote: an object with its "settings" and "results"."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return (isinstance(document, dict) and isinstance(document.get("settings"), dict)
            and isinstance(document.get("results"), list))


def check_outputs(args) -> None:
    """--json / --png: refuse, before any model is loaded, an existing path this command did
    not write (a data file, a model's config, a user's picture); its own are replaced."""
    for flag, value, ours in (("--json", args.json, is_our_results),
                              ("--png", args.png, is_our_chart)):
        path = Path(value) if value else None
        if path is None or not path.exists():
            continue
        if not path.is_file():
            raise ValueError(f"{flag} {path}: is a folder, not a file (give a file path)")
        if not ours(path):
            raise ValueError(f"{flag} {path}: exists and was not written by engine.eval; not "
                             "overwriting it (give a new file path)")


def _check_task_arguments(args) -> str:
    """ValueError naming a bad flag for the tasks asked, before any model is loaded; returns
    the KD term's label."""
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be positive, got {args.temperature}")
    if (args.teacher or args.heldout) and not set(args.task) <= {"ppl", SAMPLES_TASK}:
        raise ValueError("--teacher and --heldout apply to the ppl and samples tasks only")
    if SAMPLES_TASK in args.task and not args.teacher:
        raise ValueError("--task samples needs --teacher: the model that scores the samples")
    _sampling_settings(args)  # ValueError names a bad sampling flag
    return _kd_spec(args).divergence_label()  # ValueError names a bad argument


def _sampling_summary(args) -> dict:
    """The samples task's settings for the results JSON (nothing without the task)."""
    if SAMPLES_TASK not in args.task:
        return {}
    return {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens,
            "sample_temperature": args.sample_temperature, "top_k": args.top_k,
            "top_p": args.top_p, "stop_token": args.stop_token, "seed": args.seed}


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        check_outputs(args)
        if len(args.task) != len(args.data):
            raise ValueError(
                f"--task names {len(args.task)} task(s) but --data {len(args.data)} file(s): "
                "give one data file per task"
            )
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        divergence = _check_task_arguments(args)
        teacher = None
        if args.teacher:
            teacher = load_pretrained(
                args.teacher, dtype=dtype_of(args.dtype), device=_device_of(args)
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
            "divergence": divergence if args.teacher else None,
            "heldout": args.heldout,
            "val_fraction": args.val_fraction if args.heldout else None,
            **_sampling_summary(args),
        }
        document = _json_safe({"settings": settings, "results": rows})
        text = json.dumps(document, indent=2, allow_nan=False) + "\n"
        if args.json:
            write_text_atomic(args.json, text)
            print(f"engine.eval: results written to {args.json}", file=sys.stderr)
        elif not args.compare:
            sys.stdout.write(text)
        if args.compare or args.png:
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
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
