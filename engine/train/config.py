"""Typed training configuration: dataclasses, TOML presets and command-line overrides.

One place decides what a key means and which values it accepts, so a typo in a preset or on
the command line fails before any model is loaded, naming the nearest key that does exist.
The resolved configuration is written into the run folder so a run can be reproduced (and
resumed) from its own record rather than from whatever the preset says today.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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


# Allowed values of the string fields that are really enumerations.
CHOICES: dict[str, tuple[str, ...]] = {
    "teacher.dtype": DTYPE_NAMES,
    "student.init": ("pretrained", "scratch"),
    "data.mode": DATASET_MODES,
    "loss.backend": ("auto", "triton", "torch", "epilogue"),
    "loss.divergence": DIVERGENCES,
    "optim.schedule": ("constant", "cosine"),
    "precision": PRECISION_MODES,
    "device": ("auto", "cpu", "cuda"),
    "eval.alarm_action": ("warn", "stop"),
    "dist.strategy": ("ddp", "fsdp"),
    "dist.teacher": ("auto", "shard", "replicate"),
}


@dataclass
class RunConfig:
    out_dir: str = "runs/distill"
    steps: int = 64
    seed: int = 0
    # "auto" continues from the newest complete checkpoint in out_dir, "none" starts fresh
    # (refusing to overwrite existing checkpoints), anything else is a checkpoint folder.
    resume: str = "auto"
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 2
    log_every: int = 1
    val_every: int = 0  # optimizer steps between validations; 0 = only at the end
    val_batches: int = 8  # 0 = the whole validation split
    max_bad_steps: int = 3  # non-finite steps in a row before the run stops
    export_dir: str = ""  # final Hugging Face folder; empty = <out_dir>/final
    tokenizer: str = ""  # tokenizer.json copied beside the exported student when set
    # A fresh start in an out_dir holding an earlier run's results (final/, metrics.jsonl)
    # and no checkpoint is refused unless this is true; it then starts metrics.jsonl anew.
    overwrite: bool = False


@dataclass
class TeacherConfig:
    path: str = ""  # empty = no teacher: plain cross-entropy (pre)training
    dtype: str = "bf16"
    # A teacher cache (neox-distill cache-teacher): distill from it, no teacher model run.
    # With path also set, the live teacher only scores the held-out KD.
    cache: str = ""


@dataclass
class StudentConfig:
    path: str = ""
    init: str = "pretrained"
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
    mode: str = "packed"
    val_fraction: float = 0.01
    pad_id: int = 1
    valid_vocab: int = 0  # real tokenizer ids; 0 = every logit column is a real token


@dataclass
class BatchConfig:
    micro_batch: int = 2
    accum_steps: int = 1
    seq_len: int = 2048
    # Pick the largest micro_batch the memory plan fits (keeping the tokens per step): "auto" =
    # the device's memory on CUDA and no budget on the CPU; a cap such as "12GiB" wins; "" or
    # "none": use micro_batch as given.
    memory_budget: str = "auto"


@dataclass
class LossConfig:
    alpha: float = 0.5  # weight of the hard-label CE; 1 - alpha weighs the KD term
    temperature: float = 2.0
    backend: str = "auto"
    # The KD term's divergence (docs/loss.md): forward_kl, reverse_kl, jsd (reads beta),
    # skew_forward_kl / skew_reverse_kl (read skew) or tvd; t2_scale multiplies it by T^2.
    divergence: str = "forward_kl"
    beta: float = 0.5
    skew: float = 0.1
    t2_scale: bool = True
    # Both LM heads run inside the loss, chunk by chunk: no [tokens x vocab] logits (false: the
    # full logits and kd_loss, kept for comparison).
    fused_head: bool = True


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping
    schedule: str = "constant"
    warmup_steps: int = 0
    min_lr: float = 0.0
    fused: bool = True  # fused AdamW (CUDA, and CPU on torch >= 2.4)


@dataclass
class RuntimeConfig:
    activation_checkpointing: bool = False
    # torch.compile of the student's forward: "auto" = on with CUDA, off on the CPU.
    compile: bool | str = "auto"


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
    every: int = 0  # optimizer steps between task scores; 0 = only at step 0 and the end
    limit: int = 0  # documents per task; 0 = all
    batch_size: int = 8  # sequences per scoring forward
    alarm: float = 0.1  # warn when a task's ppl is this fraction above step 0's; 0 = off
    alarm_action: str = "warn"  # "stop": save a checkpoint and exit non-zero
    lost_updates: bool = True  # update_lost_frac per step in precision "bf16-pure"


@dataclass
class DistConfig:
    """How ranks share the work under torchrun (engine/train/fsdp.py; README "Several GPUs")."""

    # ddp: every rank holds the whole student and its optimizer state; fsdp: torch's FSDP2
    # (fully_shard) shards them over the ranks, block by block.
    strategy: str = "ddp"
    # fsdp: free each block's gathered weights after its forward and gather them again for
    # its backward (less memory, one more all-gather per block and micro-batch).
    reshard_after_forward: bool = True
    # fsdp: "shard" the frozen teacher too, "replicate" it on every rank, or "auto": replicate
    # when the memory plan fits the budget, else shard (the choice is logged).
    teacher: str = "auto"
    # fsdp: keep the student's sharded weights, gradients and AdamW state in host memory
    # (FSDP2's CPUOffloadPolicy; the optimizer step then runs on the CPU).
    cpu_offload: bool = False


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
    # bf16-autocast: fp32 master weights and AdamW state, bf16 compute (the default);
    # bf16-pure: bf16 weights and optimizer state, like the seed recipe; fp32: no autocast.
    precision: str = "bf16-autocast"
    device: str = "auto"

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["optim"]["betas"] = list(self.optim.betas)
        return out

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def valid_keys() -> list[str]:
    """Every dotted key the configuration accepts, in declaration order."""
    keys = []
    for name, typ in _field_types(Config).items():
        if dataclasses.is_dataclass(typ):
            keys.extend(f"{name}.{k}" for k in _field_types(typ))
        else:
            keys.append(name)
    return keys


def _unknown_key(key: str, known: list[str] | None = None) -> ConfigError:
    """'unknown key', with the nearest of the `known` keys (default: all) when one is close."""
    near = difflib.get_close_matches(key, known or valid_keys(), n=1, cutoff=0.6)
    hint = (f"did you mean {near[0]}?" if near
            else "neox-distill train --help lists every key")
    return ConfigError(f"{key}: unknown key ({hint})")


def _coerce(key: str, typ: Any, value: Any, *, from_text: bool) -> Any:
    """Turn a TOML value (or command-line text) into the field's type, or raise ConfigError."""
    bad = ConfigError(f"{key}: cannot use {value!r} as {_type_name(typ)}")
    if typ == bool | str:  # a switch that may also be left to the engine: true, false, "auto"
        if isinstance(value, str) and value.strip().lower() == AUTO:
            return AUTO
        return _coerce_bool(value, from_text, bad)
    if typ is bool:
        return _coerce_bool(value, from_text, bad)
    if typ is int:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if from_text and isinstance(value, str):
            try:
                return int(value.strip().replace("_", ""))
            except ValueError:
                raise bad from None
        raise bad
    if typ is float:
        if isinstance(value, bool):
            raise bad
        if isinstance(value, (int, float)):
            result = float(value)
        elif from_text and isinstance(value, str):
            try:
                result = float(value.strip())
            except ValueError:
                raise bad from None
        else:
            raise bad
        if not math.isfinite(result):
            raise bad
        return result
    if typ is str:
        if isinstance(value, str):
            return value
        raise bad
    if typing.get_origin(typ) is list:
        (item_type,) = typing.get_args(typ)
        if from_text and isinstance(value, str):
            value = _text_list(value, bad)
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(key, item_type, v, from_text=from_text) for v in value]
    if typing.get_origin(typ) is tuple:
        item_types = typing.get_args(typ)
        if from_text and isinstance(value, str):
            text = value.strip().strip("[]()")
            value = [part for part in text.split(",") if part.strip()]
        if not isinstance(value, (list, tuple)) or len(value) != len(item_types):
            raise bad
        return tuple(
            _coerce(key, t, v, from_text=from_text) for t, v in zip(item_types, value, strict=True)
        )
    raise ConfigError(f"{key}: unsupported field type {typ!r}")  # pragma: no cover


def _coerce_bool(value: Any, from_text: bool, bad: ConfigError) -> bool:
    if isinstance(value, bool):
        return value
    if from_text and isinstance(value, str):
        text = value.strip().lower()
        if text in ("true", "1", "yes", "on"):
            return True
        if text in ("false", "0", "no", "off"):
            return False
    raise bad


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
    if typ == bool | str:
        return 'true, false or "auto"'
    if typing.get_origin(typ) is list:
        return "a list of " + typing.get_args(typ)[0].__name__
    if typing.get_origin(typ) is tuple:
        return "a list of " + ", ".join(t.__name__ for t in typing.get_args(typ))
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}.get(
        typ, str(typ)
    )


def _set(config: Config, key: str, value: Any, *, from_text: bool) -> None:
    parts = key.split(".")
    top = _field_types(Config)
    if len(parts) == 1 and parts[0] in top and not dataclasses.is_dataclass(top[parts[0]]):
        target, name, typ = config, parts[0], top[parts[0]]
    elif len(parts) == 2 and parts[0] in top and dataclasses.is_dataclass(top[parts[0]]):
        fields = _field_types(top[parts[0]])
        if parts[1] not in fields:
            raise _unknown_key(key)
        target, name, typ = getattr(config, parts[0]), parts[1], fields[parts[1]]
    else:
        raise _unknown_key(key)
    coerced = _coerce(key, typ, value, from_text=from_text)
    choices = CHOICES.get(key)
    if choices is not None and coerced not in choices:
        raise ConfigError(f"{key}: {coerced!r} is not one of {', '.join(choices)}")
    setattr(target, name, coerced)


def apply_dict(config: Config, data: dict[str, Any], *, source: str = "config") -> Config:
    """Apply a nested dict (a parsed TOML file or a saved config) onto `config` in place."""
    top = _field_types(Config)
    for name, value in data.items():
        if name not in top:
            raise ConfigError(f"{source}: {_unknown_key(name, list(top))}")
        if dataclasses.is_dataclass(top[name]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: [{name}] must be a table of keys")
            items = [(f"{name}.{key}", item) for key, item in value.items()]
        else:
            items = [(name, value)]
        for key, item in items:
            try:
                _set(config, key, item, from_text=False)
            except ConfigError as exc:
                raise ConfigError(f"{source}: {exc}") from None
    return config


def parse_overrides(args: list[str]) -> list[tuple[str, str]]:
    """Split ["--a.b=1", "--c.d", "2"] into [("a.b", "1"), ("c.d", "2")]."""
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"{arg}: expected --section.key=value (neox-distill train "
                              "--help lists every key)")
        body = arg[2:]
        if "=" in body:
            key, value = body.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"--{body}: needs a value (--{body}=VALUE or --{body} VALUE)")
            key, value = body, args[i + 1]
            i += 2
        pairs.append((key, value))
    return pairs


def validate(config: Config) -> Config:
    """Cross-field checks that single-field parsing cannot make."""
    problems = []
    positive = {
        "run.steps": config.run.steps,
        "run.log_every": config.run.log_every,
        "run.keep_last": config.run.keep_last,
        "run.max_bad_steps": config.run.max_bad_steps,
        "batch.micro_batch": config.batch.micro_batch,
        "batch.accum_steps": config.batch.accum_steps,
        "batch.seq_len": config.batch.seq_len,
        "loss.temperature": config.loss.temperature,
        "eval.batch_size": config.eval.batch_size,
    }
    for key, value in positive.items():
        if value <= 0:
            problems.append(f"{key}: must be > 0, got {value}")
    for key, value in {
        "run.save_every": config.run.save_every,
        "run.val_every": config.run.val_every,
        "run.val_batches": config.run.val_batches,
        "optim.warmup_steps": config.optim.warmup_steps,
        "optim.grad_clip": config.optim.grad_clip,
        "optim.weight_decay": config.optim.weight_decay,
        "optim.min_lr": config.optim.min_lr,
        "data.valid_vocab": config.data.valid_vocab,
        "eval.every": config.eval.every,
        "eval.limit": config.eval.limit,
        "eval.alarm": config.eval.alarm,
    }.items():
        if value < 0:
            problems.append(f"{key}: must be >= 0, got {value}")
    if not 0.0 <= config.loss.alpha <= 1.0:
        problems.append(f"loss.alpha: must be in [0, 1], got {config.loss.alpha}")
    for key in ("beta", "skew"):
        value = getattr(config.loss, key)
        if not 0.0 <= value <= 1.0:
            problems.append(f"loss.{key}: must be in [0, 1], got {value} "
                            f"(read by {'jsd' if key == 'beta' else 'the skew divergences'})")
    problems += _budget_problems(config.batch.memory_budget)
    if config.optim.lr <= 0:
        problems.append(f"optim.lr: must be > 0, got {config.optim.lr}")
    if not 0.0 <= config.data.val_fraction < 1.0:
        problems.append(f"data.val_fraction: must be in [0, 1), got {config.data.val_fraction}")
    if config.student.init == "pretrained" and not config.student.path:
        problems.append("student.path: required when student.init = 'pretrained'")
    if not config.data.path:
        problems.append("data.path: required (a folder written by neox-distill preprocess)")
    problems.extend(_eval_task_problems(config))
    problems.extend(_dist_problems(config))
    if problems:
        raise ConfigError("; ".join(problems))
    return config


def kd_settings(config: Config) -> dict[str, Any]:
    """The KD term's settings as keyword arguments of the step and of heldout_metrics."""
    loss = config.loss
    return dict(temperature=loss.temperature, divergence=loss.divergence, beta=loss.beta,
                skew=loss.skew, t2_scale=loss.t2_scale)


def _budget_problems(budget: str) -> list[str]:
    if budget.strip().lower() in ("", "none", AUTO):
        return []
    try:
        parse_bytes(budget)
    except ValueError as exc:
        return [f"batch.memory_budget: {exc} (or \"auto\", or \"\" for none)"]
    return []


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


def load_config(
    path: str | os.PathLike | None = None,
    overrides: list[str] | None = None,
    *,
    check: bool = True,
) -> Config:
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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # JSON string escapes are valid TOML basic strings
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def dumps_toml(data: dict[str, Any]) -> str:
    """Write a two-level dict (top-level scalars, then one table per section) as TOML."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, table in data.items():
        if isinstance(table, dict):
            lines.append("")
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in table.items())
    return "\n".join(lines) + "\n"


# The first line of the config.toml a run writes: what tells the run's own config.toml from a
# user's (engine/train/run_folder.py).
RESOLVED_TOML_HEADER = "# neox-distill: the resolved configuration of the run in this folder\n"


def write_resolved(config: Config, folder: str | os.PathLike) -> None:
    """Write config.toml and config.json into `folder` (created if missing), each atomically."""
    folder = Path(folder)
    write_text_atomic(folder / "config.toml", RESOLVED_TOML_HEADER + config.to_toml())
    write_json_atomic(folder / "config.json", config.to_dict())
