"""The training loop: a Trainer in torchtitan's shape.

    trainer = Trainer(config, dist_info)   # setup: strategy, models, data, optimizer, resume
    trainer.train_step()                   # one optimizer step (engine/train/step.py)
    trainer.train()                        # the loop and its policy: validate, save, stop

The policy lives in `train()` alone, so what happens at a step boundary reads in one place:
log the step, stop on repeated non-finite steps, validate every run.val_every steps, save
(the checkpointer: every run.save_every steps), and on SIGTERM/SIGINT save and leave. At the
end the student is validated, saved and exported. How the run is spread over its ranks
(one process, DDP, FSDP) is the strategy's (engine/train/strategy.py), built once at setup:
nothing here asks which it is. New work hooks in at those points: a metrics sink in
MetricsWriter, an evaluation in `validate()`, a new artefact in `_finish()`.
"""

from __future__ import annotations

import itertools
import math
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from engine import dist
from engine.data import failpoints
from engine.data.loader import build_dataset
from engine.eval.heldout import heldout_batches, heldout_loader
from engine.eval.scoring import heldout_metrics
from engine.memory import training_flops_per_token
from engine.metrics import MetricsWriter, mfu, peak_flops, peak_memory_bytes, read_records
from engine.token_ids import check_batch, checked_batches
from engine.train import checkpoint as ckpt
from engine.train.checkpointer import Checkpointer, TrainingDiverged
from engine.train.config import Config, ConfigError, validate, write_resolved
from engine.train.lock import hold_run_lock
from engine.train.loggers import TENSORBOARD_DIR, build_sinks
from engine.train.lost_updates import build_meter
from engine.train.model_card import model_card_for, non_finite_metrics
from engine.train.preflight import check_paths, export_dir_of
from engine.train.run_folder import replace_earlier_results
from engine.train.setup import (
    build_loss_spec,
    build_optimizer,
    build_signal,
    build_train_loader,
    check_compatible,
    configure_cuda_allocator,
    describe_runtime,
)
from engine.train.signals import StopRequest
from engine.train.step import StepResult, train_step
from engine.train.strategy import build_strategy, init_distributed
from engine.train.teacher_source import open_teacher_cache
from engine.train.vocab_checks import check_data_fits
from engine.train.watch import TaskRegression, TaskWatch

__all__ = ["Trainer", "TrainingDiverged", "run"]


def run(config: Config) -> dict[str, Any]:
    """Train per `config` (resuming per run.resume); returns out_dir, status and final metrics.

    Every path is checked before anything is loaded, the run folder is locked for the whole
    run, and SIGTERM/SIGINT are handled from the first step until the end (validation and
    export included). Raises ConfigError for unusable settings, RunLocked when another run
    holds out_dir, TrainingDiverged when the state turned non-finite (nothing saved from
    it), dist.DistributedError when a peer dies.
    """
    validate(config)
    check_paths(config)
    configure_cuda_allocator(config)
    info = init_distributed(config)
    try:
        with dist.collective_errors(), hold_run_lock(config.run.out_dir, info) as lock:
            trainer = Trainer(config, info)
            lock.keep()  # past its checks, the run has written into out_dir
            with StopRequest() as stop:
                result = trainer.train(stop)
            # Leave the group together: no rank tears down its connections while a peer is
            # still finishing (its export, its last collective).
            dist.barrier()
            return result
    finally:
        dist.teardown()


def lr_at(config: Config, step: int) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup, then constant/cosine."""
    optim = config.optim
    if optim.warmup_steps and step < optim.warmup_steps:
        return optim.lr * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return optim.lr
    # The last step (index steps - 1) trains at min_lr.
    decay_steps = max(1, config.run.steps - optim.warmup_steps - 1)
    progress = min(1.0, (step - optim.warmup_steps) / decay_steps)
    return optim.min_lr + 0.5 * (optim.lr - optim.min_lr) * (1.0 + math.cos(math.pi * progress))


class Trainer:
    """One distillation run: built in __init__, stepped by train_step(), driven by train()."""

    def __init__(self, config: Config, info: dist.DistInfo):
        self.config, self.info, self.device = config, info, info.device
        self.out_dir = Path(config.run.out_dir)
        self.writer = MetricsWriter(self.out_dir, enabled=info.is_main,
                                    total_steps=config.run.steps,
                                    sinks=build_sinks(config, enabled=info.is_main))
        self.parallel = build_strategy(config, info)  # one process, DDP or FSDP
        self.checkpointer = Checkpointer(config, info, self.parallel, self.writer.log_text)
        self.student, self.teacher = self.parallel.build_models(self.writer.log_text)
        cached, memory_note = self._build_data()
        self.optimizer = build_optimizer(config, self.student, self.device)
        self.spec, self.autocast_dtype = build_loss_spec(config), self.parallel.autocast_dtype
        # What gives the training step its teacher signal: the cache when there is one (a
        # teacher.path beside it only scores the held-out KD), else the (compiled) teacher.
        self.signal = cached or build_signal(self.parallel.wrap_teacher(self.teacher), config,
                                             info, accum_steps=self.accum_steps,
                                             autocast_dtype=self.autocast_dtype,
                                             gathered=self.parallel.head_gathered)
        self.step = self.checkpointer.resume(self.student, self.optimizer, self.train_loader,
                                             self.signal)
        self.last_val: dict[str, Any] | None = None
        self.val_step: int | None = None  # the step last_val belongs to
        resumed = self.checkpointer.resumed_from is not None
        if resumed:
            self._continue_records()
        self.lost_updates = build_meter(self.optimizer, self.student, precision=config.precision,
                                        enabled=config.eval.lost_updates, lr=config.optim.lr,
                                        beta1=config.optim.betas[0], is_main=info.is_main)
        self.watch = TaskWatch(config, self.student, self.writer, info,
                               autocast_dtype=self.autocast_dtype,
                               resumed_at=self.step if resumed else None)
        self.model = self.parallel.wrap_student(self.student)
        self.writer.log_text(describe_runtime(config, self.device, self.optimizer, memory_note))
        self._build_throughput()
        self.batches = iter(self.train_loader)
        self.last_record: dict[str, Any] = {}
        self._session_start, self._session_steps = time.perf_counter(), 0  # for the ETA
        self.writer.log_text(self._describe())
        if info.is_main:  # only now: a failed launch leaves an earlier run's record alone
            self._take_over_run_folder()

    def _build_data(self):
        """Check the models against the settings, plan the micro-batch, open the data (and
        teacher.cache) and this rank's loader; return (the cache's signal or None, the memory
        plan's note)."""
        config = self.config
        check_compatible(config, self.student, self.teacher)
        self.vocab_rows = self.student.config.vocab_size
        teacher_cfg = self.teacher.config if self.teacher is not None else None
        self.micro_batch, self.accum_steps, self.predicted_peak, memory_note = (
            self.parallel.plan_micro_batch(teacher_cfg, self.student.config))
        self.dataset = build_dataset(config.data.path, config.data.mode, config.batch.seq_len,
                                     config.data.pad_id)
        check_data_fits(config, self.dataset.shards, self.vocab_rows)
        cached = None  # teacher.cache: the targets ride in every batch
        if config.teacher.cache:
            cached, self.dataset = open_teacher_cache(
                config, self.dataset, self.teacher,
                config.data.valid_vocab or self.student.config.vocab_size)
        self.train_loader = build_train_loader(config, self.dataset, self.micro_batch, self.info)
        return cached, memory_note

    def _build_throughput(self) -> None:
        """Tokens per optimizer step, FLOPs per token and the ranks' peak FLOP/s (for MFU)."""
        config, world = self.config, self.info.world_size
        self.tokens_per_step = self.micro_batch * self.accum_steps * config.batch.seq_len * world
        # with teacher.cache no teacher forward runs in a training step
        stepped = self.teacher.config if self.teacher is not None and not config.teacher.cache \
            else None
        self.flops_per_token = training_flops_per_token(self.student.config, stepped,
                                                        config.batch.seq_len)
        peak = peak_flops(self.device)
        self.peak_flops_total = peak * world if peak is not None else None

    def _take_over_run_folder(self) -> None:
        """Replace an earlier run's results (run.overwrite=true) and write config.toml."""
        if self.checkpointer.replacing:
            left = replace_earlier_results(self.out_dir)
            if left:
                self.writer.log_text(f"warning: {self.out_dir / TENSORBOARD_DIR} keeps "
                                     f"{', '.join(left)}, not written by this engine")
        write_resolved(self.config, self.out_dir)

    def _continue_records(self) -> None:
        """A resumed run: refuse run.steps below the checkpoint, and take back a validation
        already recorded at its step (none is logged twice). writer.start() later drops the
        records after the step; nothing is changed here, the launch may still fail."""
        resumed_from = self.checkpointer.resumed_from
        if self.step > self.config.run.steps:
            raise ConfigError(
                f"run.steps={self.config.run.steps} is below step {self.step} of the checkpoint "
                f"{resumed_from}; raise run.steps to continue, or resume an earlier "
                "checkpoint with run.resume=<folder>"
            )
        self.writer.log_text(f"resumed from {resumed_from} at step {self.step}")
        recorded, finite = None, set()
        if self.info.is_main and self.writer.path.is_file():
            for record in read_records(self.writer.path):
                if record.get("kind") == "val" and record.get("step") == self.step:
                    recorded = {k: v for k, v in record.items() if k.startswith("val_")}
                if (record.get("kind") == "train" and record.get("skipped") is False
                        and isinstance(record.get("step"), int) and record["step"] <= self.step):
                    finite.add(record["step"])
        # every rank validates, or none; every rank names the same last good checkpoint
        shared = dist.all_gather_object((recorded, finite))[0]
        self.last_val, self.checkpointer.finite_steps = shared
        if self.last_val is not None:
            self.val_step = self.step

    def _describe(self) -> str:
        teacher_params = self.teacher.num_parameters() if self.teacher is not None else 0
        special = self.signal.from_cache or self.config.onpolicy.fraction > 0
        cache = f", {self.signal.describe()}" if special else ""
        return (
            f"student {self.student.num_parameters():,} params ({self.config.student.init}), "
            f"teacher {teacher_params:,} params, device {self.device}, world "
            f"{self.info.world_size} ({self.config.dist.strategy}), {self.micro_batch} x "
            f"{self.config.batch.seq_len} tokens x {self.accum_steps} accum = "
            f"{self.tokens_per_step:,} tokens/step, precision {self.config.precision}{cache}"
        )

    # ----------------------------------------------------------------------------------
    # One step, one validation, the watched tasks
    # ----------------------------------------------------------------------------------

    def train_step(self, stop_requested: bool = False) -> StepResult:
        """One optimizer step over the next accumulation window (train() then logs it)."""
        window = list(itertools.islice(self.batches, self.accum_steps))
        for batch in window:  # the CPU copy: an id past the embedding never reaches the device
            check_batch(batch, self.vocab_rows, f"data.path={self.config.data.path}: a batch "
                        f"of step {self.step + 1}", self.spec.valid_vocab)
        window = self.signal.prepare_window(window, self.student, self.step)
        result = train_step(
            self.model, self.student, self.signal, self.optimizer, window,
            spec=self.spec, autocast_dtype=self.autocast_dtype,
            max_grad_norm=self.config.optim.grad_clip or float("inf"),
            lr=lr_at(self.config, self.step),
            stop_requested=stop_requested,
            hooks=self.parallel.step_hooks,
        )
        self.step += 1
        return result

    def log_step(self, result: StepResult, seconds: float) -> None:
        """The step's health (the checkpointer's ledger of finite steps) and its record."""
        self.checkpointer.record(self.step, result.applied)
        lr = lr_at(self.config, self.step - 1)
        self.last_record = self._step_record(result, lr, seconds)
        every = self.config.run.log_every
        self.writer.log_step(self.last_record, print_line=self.step % every == 0
                             or self.step == self.config.run.steps)

    def _step_record(self, result: StepResult, lr: float, elapsed: float) -> dict[str, Any]:
        self._session_steps += 1
        per_step = (time.perf_counter() - self._session_start) / self._session_steps
        tokens_per_s = self.tokens_per_step / elapsed if elapsed > 0 else 0.0
        valid = max(result.valid_tokens, 1.0)
        return {
            "kind": "train",
            "step": self.step,
            "tokens_seen": self.step * self.tokens_per_step,
            "loss": result.loss,
            "ce": result.ce_sum / valid,
            "kd": result.kd_sum / valid if self.signal.teaches else None,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "valid_tokens": int(result.valid_tokens),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops_total),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "step_time_s": elapsed,
            "eta_s": per_step * (self.config.run.steps - self.step),
            "skipped": not result.applied,
            **self.lost_updates.fields(self.step),
            **self.signal.window_metrics(elapsed),
        }

    def validate(self) -> dict[str, Any] | None:
        """Held-out metrics of the student on this rank's share of the val split (None when
        data.val_fraction is 0); written to metrics.jsonl as a "val" record."""
        config = self.config
        if config.data.val_fraction <= 0:
            return None
        rank, world, reduce = self.parallel.validation_share()
        loader = heldout_loader(self.dataset, self.micro_batch,
                                val_fraction=config.data.val_fraction,
                                rank=rank, world_size=world)
        per_rank = config.run.val_batches
        batches = heldout_batches(loader, max_batches=per_rank * self.info.world_size // world
                                  or None)
        with self.parallel.gathered_root(self.student, self.teacher):
            metrics = heldout_metrics(
                self.student,
                checked_batches(batches, self.vocab_rows, f"data.path={config.data.path}: "
                                "validation", self.spec.valid_vocab),
                teacher=self.teacher,
                spec=self.spec,
                autocast_dtype=self.autocast_dtype,
                reduce_across_ranks=reduce,
                cached_kd=self.signal.from_cache,
            )  # restores the student's train mode
        result = {f"val_{key}": value for key, value in metrics.items()}
        if self.signal.from_cache and "val_kd" in result:
            # against the live teacher when teacher.path is also set, else against the cache
            result["val_kd_source"] = "teacher" if self.teacher is not None else "cache"
        self.writer.write({"kind": "val", "step": self.step, **result})
        self.writer.log_text(
            f"val step {self.step}: ce {result['val_ce']:.4f} ppl {result['val_ppl']:.2f}"
            + (f" kd {result['val_kd']:.4f}" if "val_kd" in result else "")
            + (" (from the teacher cache)" if result.get("val_kd_source") == "cache" else "")
        )
        return result

    def watch_tasks(self) -> None:
        """Score eval.tasks now (engine/train/watch.py); when a task regressed and
        eval.alarm_action is "stop", save a checkpoint and raise TaskRegression."""
        reason = self.watch.score(self.step)
        if reason is not None:
            self.checkpointer.save(self.step, last_step=True)
            saved = self.checkpointer.bad_steps == 0  # none saved in a non-finite streak
            where = (f"checkpoint saved at step {self.step}" if saved else
                     "no checkpoint saved (non-finite steps pending)")
            raise TaskRegression(f"{reason}; stopped by eval.alarm_action=stop, {where}")

    # ----------------------------------------------------------------------------------
    # The loop and its policy
    # ----------------------------------------------------------------------------------

    def train(self, stop: StopRequest | None = None) -> dict[str, Any]:
        """Steps until run.steps or a stop signal, then the end of the run (_finish).

        `stop` is the signal handler run() holds until the process is done; without one
        (a caller driving the Trainer itself) signals keep their default meaning.
        """
        stop = stop or StopRequest()
        run_cfg = self.config.run
        status = "completed"
        self._session_start, self._session_steps = time.perf_counter(), 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.writer.start(self.step)  # drops records after self.step, opens the sinks
            if self.watch.due(self.step):  # step 0: the untouched student
                self.watch_tasks()
            while self.step < run_cfg.steps:
                started = time.perf_counter()
                result = self.train_step(stop.requested)
                self.log_step(result, time.perf_counter() - started)
                if self._session_steps == 1:
                    self._log_peak_memory()
                if not result.applied:
                    self._on_non_finite(result)
                if run_cfg.val_every and self.step % run_cfg.val_every == 0:
                    self.last_val, self.val_step = self.validate(), self.step
                if self.watch.due(self.step):
                    self.watch_tasks()
                self.checkpointer.save(self.step)  # every run.save_every steps
                if result.stop_votes > 0:
                    status = "interrupted"
                    break
            return self._finish(status, stop)
        finally:
            self.writer.close()

    def _log_peak_memory(self) -> None:
        if self.device.type != "cuda":
            return
        plan = self.predicted_peak
        predicted = f"predicted {plan / 2**30:.2f} GiB, " if plan else ""
        measured = self.last_record["peak_memory_bytes"] / 2**30
        self.writer.log_text(f"peak memory: {predicted}measured {measured:.2f} GiB")

    def _on_non_finite(self, result: StepResult) -> None:
        """Warn about a skipped update; stop after run.max_bad_steps of them in a row."""
        limit, bad_steps = self.config.run.max_bad_steps, self.checkpointer.bad_steps
        message = (
            f"step {self.step}: non-finite loss {result.loss} or grad norm {result.grad_norm}; "
            f"update skipped ({bad_steps} in a row, limit {limit})"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        if bad_steps >= limit:
            raise TrainingDiverged(
                f"{bad_steps} non-finite steps in a row (last at step {self.step}); "
                f"stopped. {self.checkpointer.last_good_message(self.step)}"
            )

    def _stop_voted(self, stop: StopRequest) -> bool:
        """Whether any rank has been asked to stop (every rank gets the same answer)."""
        flag = torch.tensor([1.0 if stop.requested else 0.0], device=self.device)
        return dist.all_reduce_sum(flag).item() > 0

    def _check_final_state(self) -> None:
        """A run ends in success only from a finite state: last step, weights, and every
        metric of the final validation the model card would publish (not only val_ce)."""
        bad_metrics, bad_steps = non_finite_metrics(self.last_val), self.checkpointer.bad_steps
        if bad_steps or bad_metrics:
            shown = ", ".join(f"{key} {value}" for key, value in bad_metrics.items())
            what = (f"its last {bad_steps} step(s) were non-finite" if bad_steps
                    else f"the final validation gave {shown}")
            raise TrainingDiverged(
                f"the run ended in a non-finite state ({what}); nothing exported. "
                f"{self.checkpointer.last_good_message(self.step)}"
            )

    def _finish(self, status: str, stop: StopRequest) -> dict[str, Any]:
        """Save first (the weights are durable before anything else can go wrong); then,
        unless a signal came, validate, check the final state, score the watched tasks and
        export the student."""
        self.checkpointer.save(self.step, last_step=True)
        failpoints.pause("train.finish", until=lambda: stop.requested)
        if status == "completed" and not self._stop_voted(stop):
            if self.val_step != self.step:
                self.last_val, self.val_step = self.validate(), self.step
            self._check_final_state()
            if self.watch.due(self.step, final=True):
                self.watch_tasks()
            if not self._stop_voted(stop):
                return self._result(status, self._export(), stop)
        self.writer.log_text(f"stopped by {stop.signal_name or 'a signal'} at step {self.step}; "
                             "resume with run.resume=auto to finish")
        return self._result("interrupted", None, stop)

    def _export(self) -> Path:
        export_dir = export_dir_of(self.config)
        self.parallel.export(  # the writer is rank 0; under FSDP every rank gathers
            self.student, export_dir,
            tokenizer_path=self.config.run.tokenizer or None,
            model_card=model_card_for(self, export_dir) if self.info.is_main else None,
            pad_id=self.config.data.pad_id,
            source={"run_dir": str(self.out_dir), "step": self.step})
        if self.info.is_main:
            self.writer.log_text(f"exported the student to {export_dir}")
        dist.barrier()
        return export_dir

    def _result(self, status: str, export_dir: Path | None,
                stop: StopRequest) -> dict[str, Any]:
        latest = ckpt.latest_checkpoint(self.out_dir)
        return {
            "out_dir": str(self.out_dir),
            "status": status,
            "signal": stop.signal_name or None,
            "step": self.step,
            "steps": self.config.run.steps,
            "micro_batch": self.micro_batch,
            "accum_steps": self.accum_steps,
            "final_metrics": dict(self.last_record),
            "val": self.last_val,
            "checkpoint": str(latest) if latest is not None else None,
            "export_dir": str(export_dir) if export_dir is not None else None,
            "metrics_path": str(self.out_dir / "metrics.jsonl"),
        }
