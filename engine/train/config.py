"""Typed training configuration: dataclasses, TOML presets and command-line overrides.

The dataclasses below are the whole schema: each field's type says which values a key accepts
(`Literal[...]` a set of words, `Annotated[T, rule]` a range or form that `validate` checks),
and one generic reader turns TOML values and `--section.key=value` text into those types. So a
typo in a preset or on the command line fails before any model is loaded, naming the key and
the nearest key that does exist. The resolved configuration is written into the run folder so
a run can be reproduced (and resumed) from its own record rather than from today's preset.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from engine.data.atomic import write_json_atomic, write_text_atomic
from engine.data.loader import DATASET_MODES
from engine.eval.tasks import TASKS
from engine.kernels.divergences import DIVERGENCES
from engine.memory import parse_bytes
from engine.model.config import GPTNeoXConfig
from engine.precision import DTYPE_NAMES, PRECISION_MODES

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 only
    import tomli as tomllib


class ConfigError(ValueError):
    """A configuration key or value that cannot be used; the message names it and the fix."""


AUTO = "auto"  # a setting the engine decides from the device (runtime.compile, memory_budget)


def _rule(text: str, ok: Callable[[Any], bool], why: str = "") -> Callable[[Any], str | None]:
    """A value check for `Annotated[T, rule]`: the problem `validate` reports, or None."""
    return lambda value: None if ok(value) else f"must be {text}, got {value}{why}"


POSITIVE = _rule("> 0", lambda v: v > 0)
NON_NEGATIVE = _rule(">= 0", lambda v: v >= 0)
FRACTION = _rule("in [0, 1]", lambda v: 0 <= v <= 1)
FINITE_NON_NEGATIVE = _rule("a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)
# The checked types of the fields (pydantic's names for the same ideas).
PositiveInt, PositiveFloat = Annotated[int, POSITIVE], Annotated[float, POSITIVE]
NonNegativeInt, NonNegativeFloat = Annotated[int, NON_NEGATIVE], Annotated[float, NON_NEGATIVE]
Fraction = Annotated[float, FRACTION]


def _memory_size(text: str) -> str | None:
    """batch.memory_budget: "auto", "" / "none" (no budget) or a size such as "12GiB"."""
    if text.strip().lower() in ("", "none", AUTO):
        return None
    try:
        parse_bytes(text)
    except ValueError as exc:
        return f'{exc} (or "auto", or "" for none)'
    return None


@dataclass
class RunConfig:
    out_dir: str = "runs/distill"
    steps: PositiveInt = 64
    seed: int = 0
    # "auto" continues from the newest complete checkpoint in out_dir, "none" starts fresh
    # (refusing to overwrite existing checkpoints), anything else is a checkpoint folder.
    resume: str = "auto"
    save_every: NonNegativeInt = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: PositiveInt = 2
    log_every: PositiveInt = 1
    val_every: NonNegativeInt = 0  # optimizer steps between validations; 0 = only at the end
    val_batches: NonNegativeInt = 8  # 0 = the whole validation split
    max_bad_steps: PositiveInt = 3  # non-finite steps in a row before the run stops
    export_dir: str = ""  # final Hugging Face folder; empty = <out_dir>/final
    tokenizer: str = ""  # tokenizer.json copied beside the exported student when set
    # A fresh start in an out_dir holding an earlier run's results (final/, metrics.jsonl)
    # and no checkpoint is refused unless this is true; it then starts metrics.jsonl anew.
    overwrite: bool = False


@dataclass
class TeacherConfig:
    path: str = ""  # empty = no teacher: plain cross-entropy (pre)training
    dtype: Literal[DTYPE_NAMES] = "bf16"
    # A teacher cache (neox-distill cache-teacher): distill from it, no teacher model run.
    # With path also set, the live teacher only scores the held-out KD.
    cache: str = ""


@dataclass
class StudentConfig:
    path: str = ""
    init: Literal["pretrained", "scratch"] = "pretrained"
    # Shape used only for init = "scratch".
    num_layers: int = 6
    hidden_size: int = 512
    num_heads: int = 8
    intermediate_size: int = 2048
    vocab_size: int = 50304
    max_positions: int = 2048

    def scratch_model_config(self) -> GPTNeoXConfig:
        """The model shape for init = "scratch"; the rest are GPTNeoXConfig's Pythia defaults."""
        return GPTNeoXConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            max_positions=self.max_positions,
        )


@dataclass
class DataConfig:
    path: str = ""  # a folder written by engine.data.preprocess
    mode: Literal[DATASET_MODES] = "packed"
    val_fraction: Annotated[float, _rule("in [0, 1)", lambda v: 0 <= v < 1)] = 0.01
    pad_id: int = 1
    valid_vocab: NonNegativeInt = 0  # real tokenizer ids; 0 = every logit column is a real token


@dataclass
class BatchConfig:
    micro_batch: PositiveInt = 2
    accum_steps: PositiveInt = 1
    seq_len: PositiveInt = 2048
    # Pick the largest micro_batch the memory plan fits (keeping the tokens per step): "auto" =
    # the device's memory on CUDA and no budget on the CPU; a cap such as "12GiB" wins; "" or
    # "none": use micro_batch as given.
    memory_budget: Annotated[str, _memory_size] = "auto"


@dataclass
class LossConfig:
    alpha: Fraction = 0.5  # weight of the hard-label CE; 1 - alpha weighs the KD term
    temperature: PositiveFloat = 2.0
    backend: Literal["auto", "triton", "torch", "epilogue"] = "auto"
    # The KD term's divergence (docs/loss.md): forward_kl, reverse_kl, jsd (reads beta),
    # skew_forward_kl / skew_reverse_kl (read skew) or tvd; t2_scale multiplies it by T^2.
    divergence: Literal[DIVERGENCES] = "forward_kl"
    beta: Annotated[float, _rule("in [0, 1]", lambda v: 0 <= v <= 1, " (read by jsd)")] = 0.5
    skew: Annotated[float, _rule("in [0, 1]", lambda v: 0 <= v <= 1,
                                 " (read by the skew divergences)")] = 0.1
    t2_scale: bool = True
    # Both LM heads run inside the loss, chunk by chunk: no [tokens x vocab] logits (false: the
    # full logits and kd_loss, kept for comparison).
    fused_head: bool = True


@dataclass
class OptimConfig:
    lr: PositiveFloat = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: NonNegativeFloat = 0.0
    eps: float = 1e-8
    grad_clip: NonNegativeFloat = 0.0  # max global grad norm; 0 = no clipping
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: NonNegativeInt = 0
    min_lr: NonNegativeFloat = 0.0
    fused: bool = True  # fused AdamW (CUDA, and CPU on torch >= 2.4)


@dataclass
class RuntimeConfig:
    activation_checkpointing: bool = False
    # torch.compile of the student's forward: "auto" = on with CUDA, off on the CPU.
    compile: bool | Literal["auto"] = "auto"


@dataclass
class LogConfig:
    # Extra consumers of the metrics.jsonl records (engine/train/loggers.py); rank 0 only.
    tensorboard: bool = False  # event files under <out_dir>/tensorboard (the tensorboard extra)
    wandb: bool = False  # a Weights & Biases run (the wandb extra; WANDB_MODE=offline works)
    wandb_project: str = "neox-distill"


@dataclass
class EvalConfig:
    """Task scores while training (engine/train/watch.py) and the lost-update metric."""

    # "KIND=PATH" with KIND lambada, mc or ppl (engine.eval's tasks); needs run.tokenizer.
    tasks: list[str] = field(default_factory=list)
    every: NonNegativeInt = 0  # optimizer steps between task scores; 0 = only at step 0 and the end
    limit: NonNegativeInt = 0  # documents per task; 0 = all
    batch_size: PositiveInt = 8  # sequences per scoring forward
    alarm: NonNegativeFloat = 0.1  # warn when a task's ppl is this fraction above step 0's; 0 = off
    alarm_action: Literal["warn", "stop"] = "warn"  # "stop": save a checkpoint, exit non-zero
    lost_updates: bool = True  # update_lost_frac per step in precision "bf16-pure"


@dataclass
class DistConfig:
    """How ranks share the work under torchrun (engine/train/fsdp.py; README "Several GPUs")."""

    # ddp: every rank holds the whole student and its optimizer state; fsdp: torch's FSDP2
    # (fully_shard) shards them over the ranks, block by block.
    strategy: Literal["ddp", "fsdp"] = "ddp"
    # fsdp: free each block's gathered weights after its forward and gather them again for
    # its backward (less memory, one more all-gather per block and micro-batch).
    reshard_after_forward: bool = True
    # fsdp: "shard" the frozen teacher too, "replicate" it on every rank, or "auto": replicate
    # when the memory plan fits the budget, else shard (the choice is logged).
    teacher: Literal["auto", "shard", "replicate"] = "auto"
    # fsdp: keep the student's sharded weights, gradients and AdamW state in host memory
    # (FSDP2's CPUOffloadPolicy; the optimizer step then runs on the CPU).
    cpu_offload: bool = False


@dataclass
class OnPolicyConfig:
    """On-policy distillation (docs/loss.md): the student continues prompts, the teacher grades."""

    # GKD's lambda: the share of micro-batches the student writes (0: off-policy only; 1: all).
    fraction: Fraction = 0.0
    prompt_tokens: PositiveInt = 64  # the prompt: the first tokens of a training window
    new_tokens: PositiveInt = 64  # tokens the student samples after it
    temperature: Annotated[float, FINITE_NON_NEGATIVE] = 1.0  # 0 = greedy
    top_p: Annotated[float, _rule("in (0, 1] (1 = no cut)", lambda v: 0 < v <= 1)] = 1.0
    top_k: NonNegativeInt = 0  # 0 = no cut
    stop_token: Annotated[int, _rule(">= -1", lambda v: v >= -1)] = 0  # -1: never stop early


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    data: DataConfig = field(default_factory=DataConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    # bf16-autocast: fp32 master weights and AdamW state, bf16 compute (the default);
    # bf16-pure: bf16 weights and optimizer state, like the seed recipe; fp32: no autocast.
    precision: Literal[PRECISION_MODES] = "bf16-autocast"
    device: Literal["auto", "cpu", "cuda"] = "auto"

    def to_dict(self) -> dict[str, Any]:
        """Nested plain data: what config.json holds (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def to_toml(self) -> str:
        return _toml_table(self.to_dict())


def _leaf_types(cls: type, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted key, annotated type) of every setting under the dataclass `cls`, in order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        typ = hints[f.name]
        if dataclasses.is_dataclass(typ):
            yield from _leaf_types(typ, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name, typ


@functools.cache
def _key_types() -> dict[str, Any]:
    return dict(_leaf_types(Config))


def valid_keys() -> list[str]:
    """Every dotted key the configuration accepts, in declaration order."""
    return list(_key_types())


def _unknown_key(key: str, known: list[str] | None = None) -> ConfigError:
    """'unknown key', with the nearest of the `known` keys (default: all) when one is close."""
    near = difflib.get_close_matches(key, known or valid_keys(), n=1, cutoff=0.6)
    hint = (f"did you mean {near[0]}?" if near
            else "neox-distill train --help lists every key")
    return ConfigError(f"{key}: unknown key ({hint})")


_UNIONS = (typing.Union, types.UnionType)  # Union[bool, Literal["auto"]] and int | str


def _coerce(key: str, typ: Any, value: Any, *, from_text: bool) -> Any:
    """Turn a TOML value (or command-line text) into the field's type, or raise ConfigError."""
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin is Annotated:  # the rule is validate's; the value is read as the bare type
        return _coerce(key, args[0], value, from_text=from_text)
    bad = ConfigError(f"{key}: cannot use {value!r} as {_type_name(typ)}")
    if origin is Literal:
        if value in args:
            return value
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(args)}")
    if origin in _UNIONS:  # the first member that accepts it; "AUTO" reads like "TRUE"
        value = value.strip().lower() if isinstance(value, str) else value
        for member in args:
            try:
                return _coerce(key, member, value, from_text=from_text)
            except ConfigError:
                pass
        raise bad
    if origin in (list, tuple):
        if from_text and isinstance(value, str):  # a tuple may also be written (a, b)
            value = _text_list(value.strip().strip("()") if origin is tuple else value, bad)
        if not isinstance(value, (list, tuple)):
            raise bad
        items = args * len(value) if origin is list else args
        if len(items) != len(value):
            raise bad
        return origin(
            _coerce(key, t, v, from_text=from_text) for t, v in zip(items, value, strict=True))
    if from_text and isinstance(value, str) and typ in _FROM_TEXT:
        try:
            value = _FROM_TEXT[typ](value.strip())
        except (KeyError, ValueError):
            raise bad from None
    if isinstance(value, bool) != (typ is bool):  # True is an int to Python, not to us
        raise bad
    if typ is float and isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    if typ in (bool, int, str) and isinstance(value, typ):
        return value
    raise bad


_BOOL_WORDS = dict.fromkeys(("true", "1", "yes", "on"), True) | dict.fromkeys(
    ("false", "0", "no", "off"), False)
# How a boolean, integer or number is read from command-line text.
_FROM_TEXT: dict[type, Callable[[str], Any]] = {
    bool: lambda text: _BOOL_WORDS[text.lower()],
    int: lambda text: int(text.replace("_", "")),
    float: float,
}


def _text_list(text: str, bad: ConfigError) -> list:
    """A command-line list: a JSON/TOML-style ["a", "b"] or plain comma-separated a,b."""
    text = text.strip()
    if text.startswith("["):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            raise bad from None
        if not isinstance(value, list):
            raise bad
        return value
    return [part.strip() for part in text.split(",") if part.strip()]


def _type_name(typ: Any) -> str:
    origin, args = typing.get_origin(typ), typing.get_args(typ)
    if origin in _UNIONS:  # 'true, false or "auto"'
        words = [word for t in args for word in (
            ("true", "false") if t is bool else
            [json.dumps(a) for a in typing.get_args(t)] if typing.get_origin(t) is Literal else
            [_type_name(t)])]
        return ", ".join(words[:-1]) + " or " + words[-1]
    if origin in (list, tuple):
        return "a list of " + ", ".join(t.__name__ for t in args)
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        typ, str(typ))


def _set(config: Config, key: str, value: Any, *, from_text: bool) -> None:
    typ = _key_types().get(key)
    if typ is None:
        raise _unknown_key(key)
    *sections, name = key.split(".")
    target = functools.reduce(getattr, sections, config)
    setattr(target, name, _coerce(key, typ, value, from_text=from_text))


def apply_dict(config: Config, data: dict[str, Any], *, source: str = "config",
               prefix: str = "") -> Config:
    """Apply a nested dict (a parsed TOML file or a saved config) onto `config` in place."""
    keys = _key_types()
    for name, value in data.items():
        key = prefix + name
        if key in keys:
            try:
                _set(config, key, value, from_text=False)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
        elif any(k.startswith(key + ".") for k in keys):  # a section: a table of keys
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{key}] must be a table of keys")
            apply_dict(config, value, source=source, prefix=key + ".")
        else:  # a top-level name: the nearest section or top-level key; else the nearest key
            top = list(dict.fromkeys(k.split(".")[0] for k in keys))
            raise ConfigError(f"{source}: {_unknown_key(key, None if prefix else top)}")
    return config


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Split ["--a.b=1", "--c.d", "2"] into [("a.b", "1"), ("c.d", "2")]."""
    pairs, rest = [], list(args)
    while rest:
        arg = rest.pop(0)
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"{arg}: expected --section.key=value (neox-distill train "
                              "--help lists every key)")
        key, sep, value = arg[2:].partition("=")
        if not sep:
            if not rest:
                raise ConfigError(f"--{key}: needs a value (--{key}=VALUE or --{key} VALUE)")
            value = rest.pop(0)
        pairs.append((key, value))
    return pairs


def validate(config: Config) -> Config:
    """The fields' own rules (their `Annotated` checks), then the checks across fields."""
    problems = []
    for key, typ in _key_types().items():
        value = functools.reduce(getattr, key.split("."), config)
        for rule in getattr(typ, "__metadata__", ()):
            problem = rule(value)
            if problem:
                problems.append(f"{key}: {problem}")
    if config.student.init == "pretrained" and not config.student.path:
        problems.append("student.path: required when student.init = 'pretrained'")
    if not config.data.path:
        problems.append("data.path: required (a folder written by neox-distill preprocess)")
    problems.extend(_eval_task_problems(config))
    problems.extend(_dist_problems(config))
    problems.extend(_onpolicy_problems(config))
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def memory_budget_bytes(config: Config, device_memory: int | None) -> int | None:
    """The budget batch.memory_budget names, in bytes: "auto" is `device_memory` (None on a
    CPU: no budget), "" or "none" is None, anything else is parsed ("12GiB")."""
    budget = config.batch.memory_budget.strip().lower()
    if budget in ("", "none"):
        return None
    if budget == AUTO:
        return device_memory
    return parse_bytes(config.batch.memory_budget)


def parse_task_spec(spec: str) -> tuple[str, str, str]:
    """(kind, name, path) of an eval.tasks entry "KIND=PATH"; the name is the file's stem
    ("lambada_openai" for lambada=data/lambada_openai.jsonl), which tells two files apart."""
    kind, sep, path = spec.partition("=")
    kind, path = kind.strip(), path.strip()
    if not sep or kind not in TASKS or not path:
        raise ConfigError(
            f"eval.tasks: {spec!r} is not KIND=PATH with KIND one of {', '.join(TASKS)} "
            '(e.g. "lambada=lambada_openai.jsonl")'
        )
    return kind, Path(path).name.split(".")[0] or path, path


def _eval_task_problems(config: Config) -> list[str]:
    """eval.tasks entries that cannot be parsed, share a name, or lack run.tokenizer."""
    problems, names = [], set()
    for spec in config.eval.tasks:
        try:
            _, name, _ = parse_task_spec(spec)
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        if name in names:
            problems.append(f"eval.tasks: two tasks are named {name!r} (their file names); "
                            "rename one file")
        names.add(name)
    if config.eval.tasks and not config.run.tokenizer:
        problems.append("eval.tasks needs run.tokenizer (the tokenizer.json that encodes the "
                        "task files, the student's own)")
    return problems


def _dist_problems(config: Config) -> list[str]:
    """[dist] keys that only mean something with dist.strategy = "fsdp"."""
    if config.dist.strategy == "fsdp":
        return []
    problems = []
    if config.dist.teacher != "auto":
        problems.append(f"dist.teacher={config.dist.teacher!r} needs dist.strategy=fsdp (under "
                        "ddp every rank holds the whole teacher)")
    if config.dist.cpu_offload:
        problems.append("dist.cpu_offload=true needs dist.strategy=fsdp")
    return problems


def _onpolicy_problems(config: Config) -> list[str]:
    """onpolicy.fraction > 0 needs a live teacher and room in the window for prompt + sample."""
    on = config.onpolicy
    if on.fraction == 0:
        return []
    problems = []
    if config.teacher.cache:
        problems.append(f"onpolicy.fraction={on.fraction} cannot train from teacher.cache: a "
                        "cache holds the teacher's distribution over the corpus, not over the "
                        "student's new samples (set teacher.path instead)")
    elif not config.teacher.path:
        problems.append(f"onpolicy.fraction={on.fraction} needs teacher.path: the teacher "
                        "grades the student's samples")
    if on.prompt_tokens + on.new_tokens > config.batch.seq_len:
        problems.append(f"onpolicy.prompt_tokens ({on.prompt_tokens}) + onpolicy.new_tokens "
                        f"({on.new_tokens}) exceeds batch.seq_len ({config.batch.seq_len})")
    return problems


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                *, check: bool = True) -> Config:
    """Defaults, then the TOML preset at `path`, then `--section.key=value` overrides.

    `check=False` skips the cross-field validation (tools that only read shapes use it).
    """
    config = Config()
    if path is not None:
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:  # TOML is UTF-8; the codec's message names no file
            raise ConfigError(f"{path}: not valid TOML: not UTF-8 text ({exc.reason} at "
                              f"byte {exc.start})") from None
        apply_dict(config, data, source=str(path))
    for key, value in parse_overrides(list(overrides or [])):
        _set(config, key, value, from_text=True)
    return validate(config) if check else config


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (e.g. a checkpoint's config.json)."""
    return apply_dict(Config(), data, source="saved config")


def _toml_table(table: dict[str, Any], name: str = "") -> str:
    """TOML for a nested dict of plain data: its keys, then one [table] per nested dict.

    A JSON scalar or array is TOML too (UTF-8 text; only DEL must be escaped beyond JSON's
    escapes), and to_dict holds nothing JSON cannot write.
    """
    lines = [f"[{name}]"] if name else []
    lines += [f"{k} = {json.dumps(v, ensure_ascii=False, allow_nan=False)}"
              for k, v in table.items() if not isinstance(v, dict)]
    text = "\n".join(lines).replace("\x7f", "\\u007f") + "\n"
    for k, v in table.items():
        if isinstance(v, dict):
            text += "\n" + _toml_table(v, f"{name}.{k}" if name else k)
    return text


# The first line of the config.toml a run writes: what tells the run's own config.toml from a
# user's (engine/train/run_folder.py).
RESOLVED_TOML_HEADER = "# neox-distill: the resolved configuration of the run in this folder\n"


def write_resolved(config: Config, folder: str | os.PathLike) -> None:
    """Write config.toml and config.json into `folder` (created if missing), each atomically."""
    folder = Path(folder)
    write_text_atomic(folder / "config.toml", RESOLVED_TOML_HEADER + config.to_toml())
    write_json_atomic(folder / "config.json", config.to_dict())
