"""Watch the student while it trains: task scores (eval.tasks) and the regression alarm.

Warm-started distillation can make a student worse at what it already knew while the
held-out loss barely moves, and nobody sees it until after the run (it happened to the
seed run: README.md). So the run scores the tasks named in eval.tasks at step 0,
before any update, every eval.every steps and at the end, with engine.eval's own task code
(engine/eval/tasks.py, the lm-evaluation-harness definitions: a record equals
`python -m engine.eval` on the same weights), and compares each perplexity with its step-0
value: more than eval.alarm worse is a warning naming the task, both values and the step,
and with eval.alarm_action = "stop" the run saves a checkpoint and stops (exit status 1).
A task that cannot be scored mid-run (its file gone or unreadable) is the same kind of event:
a warning, or with "stop" a checkpoint and a stop; never a run lost without a save.

Rank 0 scores (the student is the same on every rank) while the others wait; under FSDP,
whose forward is collective, every rank scores the same documents and rank 0 records. The
stop decision is shared with every rank. The step-0 values are read back from metrics.jsonl on
resume, so a resumed run keeps comparing against the untouched student. Records:
docs/formats.md, "metrics.jsonl records".
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch

from engine import dist
from engine.eval.requests import EvalInputError, TextEncoder
from engine.eval.tasks import ScoringSetup, evaluate_lambada, evaluate_mc, evaluate_ppl
from engine.metrics import MetricsWriter, read_records
from engine.train import fsdp
from engine.train.config import Config, ConfigError, parse_task_spec

# What a task record scored: two records compare only when these agree.
SCOPE_KEYS = ("limit", "documents", "max_length", "stride")


class TaskRegression(RuntimeError):
    """A watched task's perplexity passed eval.alarm with eval.alarm_action = "stop"."""


def _label(record: dict[str, Any]) -> str:
    """"lambada" for lambada=lambada.jsonl, "mc piqa" for mc=piqa.jsonl."""
    kind, name = record["task"], record["name"]
    return kind if kind == name else f"{kind} {name}"


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    """The numbers of a task result (no per-set tables); NaN / inf as null (strict JSON)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        out[key] = value if math.isfinite(value) else None
    return out


def read_task_history(path: Path, up_to: int) -> tuple[dict[str, dict], int | None]:
    """({task name: its earliest record}, the last step with a task record) among the task
    records of a metrics.jsonl up to step `up_to` (later ones belong to work a resumed run
    redoes; a torn last line from a killed process is skipped)."""
    first: dict[str, dict] = {}
    last_step = None
    if not path.is_file():
        return first, last_step
    for record in read_records(path):
        if record.get("kind") != "task":
            continue
        step = int(record.get("step", 0))
        if step > up_to:
            continue
        name = record.get("name")
        if name not in first or step < int(first[name]["step"]):
            first[name] = record
        last_step = step if last_step is None else max(last_step, step)
    return first, last_step


class TaskWatch:
    """Scores eval.tasks on the student and raises the alarm; one per Trainer."""

    def __init__(self, config: Config, student: torch.nn.Module, writer: MetricsWriter,
                 info: dist.DistInfo, *, autocast_dtype: torch.dtype | None,
                 resumed_at: int | None):
        self.settings = config.eval
        self.tasks = [parse_task_spec(spec) for spec in config.eval.tasks]
        self.writer, self.is_main = writer, info.is_main
        self.student = student
        # An FSDP student's forward is collective: every rank scores, rank 0 records.
        self.scores_here = info.is_main or fsdp.is_sharded(student)
        self.baselines: dict[str, dict] = {}
        self.last_step: int | None = None
        self.encoder = None
        if resumed_at is not None and self.tasks:  # every rank: the refusal is agreed
            self._read_baselines(writer.path, resumed_at)
        if not self.tasks or not self.scores_here:
            return
        self.encoder = TextEncoder(config.run.tokenizer, eos_id=student.config.eos_token_id)
        self.encoder.check_fits(student.config.vocab_size, "the student")
        for _, _, path in self.tasks:
            if not Path(path).exists():
                raise EvalInputError(f"eval.tasks: {path}: data file not found")
        self.setup = ScoringSetup(
            model=student,
            max_length=student.config.max_positions,
            batch_size=config.eval.batch_size,
            valid_vocab=None,  # the harness's definition, as python -m engine.eval
            autocast_dtype=autocast_dtype,
            progress=False,  # the step bar owns the terminal
        )

    def _read_baselines(self, path: Path, resumed_at: int) -> None:
        """A resumed run's step-0 baselines (rank 0 reads metrics.jsonl); refused
        (ConfigError, on every rank) when one was scored with another eval.limit: the alarm
        would compare different documents, and the step-0 student is gone to re-score."""
        error = None
        if self.is_main:
            self.baselines, self.last_step = read_task_history(path, resumed_at)
            error = self._limit_mismatch(path)
        error = dist.agree(error)
        if error is not None:
            raise ConfigError(error)

    def _limit_mismatch(self, path: Path) -> str | None:
        limit = self.settings.limit or None
        for name, base in self.baselines.items():
            if "limit" in base:
                same = base["limit"] == limit
            else:  # a record from before "limit" was recorded: its document count
                documents = base.get("documents")
                same = not (limit and isinstance(documents, int) and limit < documents)
            if not same:
                old = base.get("limit", f"0 ({base.get('documents')} documents)") or 0
                return (f"eval.limit={limit or 0}: the watched task {name}'s step-"
                        f"{base['step']} baseline in {path} was scored with eval.limit={old}; "
                        "the alarm would compare other documents against it. Resume with "
                        f"eval.limit={old}, or change it in a new run (another run.out_dir)")
        return None

    def due(self, step: int, *, final: bool = False) -> bool:
        """Score now? At step 0, every eval.every steps, at the end; never twice a step."""
        if not self.tasks or step == self.last_step:
            return False
        every = self.settings.every
        return final or step == 0 or bool(every and step % every == 0)

    def score(self, step: int) -> str | None:
        """Score every task (rank 0; every rank under FSDP), log and check each (rank 0);
        returns the reason to stop (on every rank) when a task regressed and
        eval.alarm_action is "stop", else None."""
        self.last_step = step
        alarms = []
        if self.scores_here:
            for kind, name, path in self.tasks:
                try:
                    with fsdp.gathered_root(self.student):
                        scores = self._evaluate(kind, path)
                except (OSError, EvalInputError) as exc:  # e.g. the file went away mid-run
                    alarms.append(self._failed(kind, name, path, step, exc))
                    continue
                if not self.is_main:
                    continue
                record = {"kind": "task", "step": step, "task": kind, "name": name,
                          "limit": self.settings.limit or None, **_scalars(scores)}
                self.writer.write(record)
                alarms.extend(self._check(record))
        reason = "; ".join(alarms) if alarms and self.settings.alarm_action == "stop" else None
        return dist.all_gather_object(reason)[0]

    def _failed(self, kind: str, name: str, path: str, step: int, exc: Exception) -> str:
        """A task that cannot be scored (its file unreadable, changed, gone): a warning naming
        it, never the end of the run; eval.alarm_action = "stop" stops as for a regression
        (checkpoint first). The run goes on scoring it at the next step it is due."""
        reason = getattr(exc, "strerror", None) or str(exc)
        where = f"{path}: " if str(path) not in reason else ""
        message = (f"task {_label({'task': kind, 'name': name})} at step {step}: cannot be "
                   f"scored ({where}{reason}); no record written")
        if self.is_main:
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return message

    def _evaluate(self, kind: str, path: str) -> dict[str, Any]:
        limit = self.settings.limit or None
        if kind == "lambada":
            return evaluate_lambada(self.setup, self.encoder, path, limit)
        if kind == "mc":
            return evaluate_mc(self.setup, self.encoder, path, limit)
        return evaluate_ppl(self.setup, self.encoder, path,
                            model_vocab=self.setup.model.config.vocab_size,
                            eos_id=self.encoder.eos_id, limit=limit)

    def _check(self, record: dict[str, Any]) -> list[str]:
        """Log the record; compare its ppl with the baseline; return the alarm, if any."""
        name = record["name"]
        base = self.baselines.setdefault(name, record)
        scope = [key for key in SCOPE_KEYS if key in base and key in record
                 and base[key] != record[key]]
        if scope:  # other documents than the baseline's (a task file changed on resume)
            what = ", ".join(f"{key} {record[key]} against {base[key]}" for key in scope)
            warnings.warn(f"task {_label(record)} at step {record['step']} scored other "
                          f"documents than its step-{base['step']} baseline ({what}): not "
                          "compared, no alarm for it", RuntimeWarning, stacklevel=3)
            base = record
        scores = " ".join(f"{key} {record[key]:.4g}" for key in ("ppl", "acc", "acc_norm")
                          if record.get(key) is not None)
        ppl, base_ppl = record.get("ppl", math.nan), base.get("ppl")
        against = ""
        if base is not record and base_ppl is not None and "ppl" in record:
            change = (ppl / base_ppl - 1) if ppl is not None else math.inf
            against = f" ({change:+.1%} against step {base['step']})"
        self.writer.log_text(f"task {_label(record)} step {record['step']}: "
                             f"{scores or 'no finite score'}{against}")
        alarm = self.settings.alarm
        if not alarm or base is record or base_ppl is None or "ppl" not in record:
            return []
        limit = base_ppl * (1 + alarm)
        if ppl is not None and ppl <= limit:
            return []
        shown = f"{ppl:.2f}" if ppl is not None else "not finite"
        message = (f"regression alarm: task {_label(record)} at step {record['step']}: "
                   f"ppl {shown}, step {base['step']}: ppl {base_ppl:.2f}; worse by more than "
                   f"eval.alarm={alarm:g} (limit {limit:.2f})")
        self.writer.write({"kind": "alarm", "step": record["step"], "task": record["task"],
                           "name": name, "ppl": ppl, "baseline_ppl": base_ppl,
                           "baseline_step": base["step"], "alarm": alarm})
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        return [message]
