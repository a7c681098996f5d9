"""The training loop: a Trainer in torchtitan's shape.

    trainer = Trainer(config, dist_info)   # setup: models, loader, optimizer, resume, DDP
    trainer.train_step()                   # one optimizer step (engine/train/step.py)
    trainer.train()                        # the loop and its policy: validate, save, stop

The policy lives in `train()` alone, so what happens at a step boundary reads in one place:
log the step, stop on repeated non-finite steps, validate every run.val_every steps, save
every run.save_every steps, and on SIGTERM/SIGINT save and leave. At the end the student is
validated, saved and exported. New work hooks in at those points: a metrics sink in
MetricsWriter, an evaluation in `validate()`, a new artefact in `_finish()`.
"""

from __future__ import annotations

import itertools
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from data.loader import build_dataset
from engine import dist
from engine.eval.heldout import heldout_batches, heldout_loader
from engine.eval.scoring import heldout_metrics
from engine.memory import training_flops_per_token
from engine.metrics import MetricsWriter, mfu, peak_flops, peak_memory_bytes
from engine.precision import precision_dtypes
from engine.train import checkpoint as ckpt
from engine.train.config import Config, kd_settings, validate
from engine.train.export import export_student
from engine.train.loggers import build_sinks
from engine.train.model_card import model_card_for
from engine.train.setup import (
    build_optimizer,
    build_student,
    build_teacher,
    build_train_loader,
    check_compatible,
    configure_cuda_allocator,
    describe_runtime,
    lr_at,
    plan_micro_batch,
    prepare_run_folder,
    resume,
    wrap_model,
    wrap_teacher,
)
from engine.train.signals import StopRequest
from engine.train.step import StepResult, train_step


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint was left untouched."""


def run(config: Config) -> dict[str, Any]:
    """Train per `config` (resuming per run.resume); returns out_dir, status and final metrics.

    Raises ConfigError for unusable settings, TrainingDiverged after run.max_bad_steps
    non-finite steps in a row (checkpoints untouched), dist.DistributedError when a peer dies.
    """
    validate(config)
    configure_cuda_allocator(config)
    info = dist.init_distributed(config.device)
    try:
        return Trainer(config, info).train()
    finally:
        dist.teardown()


class Trainer:
    """One distillation run: built in __init__, stepped by train_step(), driven by train()."""

    def __init__(self, config: Config, info: dist.DistInfo):
        self.config, self.info, self.device = config, info, info.device
        self.out_dir = Path(config.run.out_dir)
        self.writer = MetricsWriter(self.out_dir, enabled=info.is_main,
                                    total_steps=config.run.steps,
                                    sinks=build_sinks(config, enabled=info.is_main))
        self.resume_from = prepare_run_folder(config, info)
        weight_dtype, autocast_dtype = precision_dtypes(config.precision)
        self.student = build_student(config, self.device, weight_dtype)
        self.teacher = build_teacher(config, self.device)
        check_compatible(config, self.student, self.teacher)
        teacher_cfg = self.teacher.config if self.teacher is not None else None
        self.micro_batch, self.accum_steps, self.predicted_peak, memory_note = plan_micro_batch(
            config, teacher_cfg, self.student.config, self.device
        )
        self.dataset = build_dataset(config.data.path, config.data.mode, config.batch.seq_len,
                                     config.data.pad_id)
        self.train_loader = build_train_loader(config, self.dataset, self.micro_batch, info)
        self.optimizer = build_optimizer(config, self.student, self.device)
        self.step, self.bad_steps = 0, 0
        if self.resume_from is not None:
            self.step, self.bad_steps = resume(self.resume_from, student=self.student,
                                               optimizer=self.optimizer,
                                               loader=self.train_loader, info=info)
            self.writer.log_text(f"resumed from {self.resume_from} at step {self.step}")
        self.model = wrap_model(self.student, config, info)
        self.teacher_model = wrap_teacher(self.teacher, config, self.device)
        self.writer.log_text(describe_runtime(config, self.device, self.optimizer, memory_note))
        self.loss_settings = dict(
            alpha=config.loss.alpha,
            valid_vocab=config.data.valid_vocab or None,
            autocast_dtype=autocast_dtype,
            backend=config.loss.backend,
            fused_head=config.loss.fused_head,
            **kd_settings(config),
        )
        self.tokens_per_step = (self.micro_batch * self.accum_steps * config.batch.seq_len
                                * info.world_size)
        self.flops_per_token = training_flops_per_token(self.student.config, teacher_cfg,
                                                        config.batch.seq_len)
        peak = peak_flops(self.device)
        self.peak_flops_total = peak * info.world_size if peak is not None else None
        self.batches = iter(self.train_loader)
        self.last_record: dict[str, Any] = {}
        self.last_val: dict[str, Any] | None = None
        self._session_start, self._session_steps = time.perf_counter(), 0  # for the ETA
        self.writer.log_text(self._describe())

    def _describe(self) -> str:
        teacher_params = self.teacher.num_parameters() if self.teacher is not None else 0
        return (
            f"student {self.student.num_parameters():,} params ({self.config.student.init}), "
            f"teacher {teacher_params:,} params, device {self.device}, world "
            f"{self.info.world_size}, {self.micro_batch} x {self.config.batch.seq_len} tokens x "
            f"{self.accum_steps} accum = {self.tokens_per_step:,} tokens/step, precision "
            f"{self.config.precision}"
        )

    # ----------------------------------------------------------------------------------
    # One step, one validation, one checkpoint
    # ----------------------------------------------------------------------------------

    def train_step(self, stop_requested: bool = False) -> StepResult:
        """One optimizer step over the next accumulation window; logs its record."""
        started = time.perf_counter()
        window = list(itertools.islice(self.batches, self.accum_steps))
        lr = lr_at(self.config, self.step)
        result = train_step(
            self.model, self.student, self.teacher_model, self.optimizer, window,
            loss_settings=self.loss_settings,
            max_grad_norm=self.config.optim.grad_clip or float("inf"),
            lr=lr,
            stop_requested=stop_requested,
        )
        self.step += 1
        self.bad_steps = 0 if result.applied else self.bad_steps + 1
        self.last_record = self._step_record(result, lr, time.perf_counter() - started)
        every = self.config.run.log_every
        self.writer.log_step(self.last_record, print_line=self.step % every == 0
                             or self.step == self.config.run.steps)
        return result

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
            "kd": result.kd_sum / valid if self.teacher is not None else None,
            "lr": lr,
            "grad_norm": result.grad_norm,
            "valid_tokens": int(result.valid_tokens),
            "tokens_per_s": tokens_per_s,
            "mfu": mfu(tokens_per_s, self.flops_per_token, self.peak_flops_total),
            "peak_memory_bytes": peak_memory_bytes(self.device),
            "step_time_s": elapsed,
            "eta_s": per_step * (self.config.run.steps - self.step),
            "skipped": not result.applied,
        }

    def validate(self) -> dict[str, Any] | None:
        """Held-out metrics of the student on this rank's share of the val split (None when
        data.val_fraction is 0); written to metrics.jsonl as a "val" record."""
        config = self.config
        if config.data.val_fraction <= 0:
            return None
        loader = heldout_loader(self.dataset, self.micro_batch,
                                val_fraction=config.data.val_fraction,
                                rank=self.info.rank, world_size=self.info.world_size)
        metrics = heldout_metrics(
            self.student,
            heldout_batches(loader, max_batches=config.run.val_batches or None),
            teacher=self.teacher,
            valid_vocab=self.loss_settings["valid_vocab"],
            autocast_dtype=self.loss_settings["autocast_dtype"],
            reduce_across_ranks=self.info.distributed,
            **kd_settings(config),
        )  # restores the student's train mode
        result = {f"val_{key}": value for key, value in metrics.items()}
        self.writer.write({"kind": "val", "step": self.step, **result})
        self.writer.log_text(
            f"val step {self.step}: ce {result['val_ce']:.4f} ppl {result['val_ppl']:.2f}"
            + (f" kd {result['val_kd']:.4f}" if "val_kd" in result else "")
        )
        return result

    def save(self) -> Path | None:
        """A checkpoint of this step (rank 0 writes; every rank's loader and RNG go in it)."""
        loader_states = dist.all_gather_object(self.train_loader.state_dict())
        rng_states = dist.all_gather_object(ckpt.capture_rng_state())
        path = None
        if self.info.is_main:
            path = ckpt.save_checkpoint(
                self.out_dir,
                self.step,
                student=self.student,
                optimizer=self.optimizer,
                trainer_state={
                    "loader_states": loader_states,
                    "rng_states": rng_states,
                    "bad_steps": self.bad_steps,
                    "world_size": self.info.world_size,
                },
                config=self.config.to_dict(),
                keep_last=self.config.run.keep_last,
            )
            self.writer.log_text(f"saved checkpoint {path}")
        dist.barrier()
        return path

    # ----------------------------------------------------------------------------------
    # The loop and its policy
    # ----------------------------------------------------------------------------------

    def train(self) -> dict[str, Any]:
        """Steps until run.steps or a stop signal, then the end of the run (_finish)."""
        run_cfg = self.config.run
        last_saved = self.step if self.resume_from is not None else None
        status = "completed"
        self._session_start, self._session_steps = time.perf_counter(), 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.writer.start(self.step)  # drops records after self.step, opens the sinks
            with StopRequest() as stop:
                while self.step < run_cfg.steps:
                    result = self.train_step(stop.requested)
                    if self._session_steps == 1:
                        self._log_peak_memory()
                    if not result.applied:
                        self._on_non_finite(result)
                    if run_cfg.val_every and self.step % run_cfg.val_every == 0:
                        self.last_val = self.validate()
                    if run_cfg.save_every and self.step % run_cfg.save_every == 0:
                        self.save()
                        last_saved = self.step
                    if result.stop_votes > 0:
                        status = "interrupted"
                        break
            return self._finish(status, last_saved)
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
        limit = self.config.run.max_bad_steps
        message = (
            f"step {self.step}: non-finite loss {result.loss} or grad norm {result.grad_norm}; "
            f"update skipped ({self.bad_steps} in a row, limit {limit})"
        )
        warnings.warn(message, RuntimeWarning, stacklevel=3)
        if self.bad_steps >= limit:
            good = ckpt.latest_checkpoint(self.out_dir)
            raise TrainingDiverged(
                f"{self.bad_steps} non-finite steps in a row (last at step {self.step}); "
                f"stopped. Last good checkpoint: {good if good else 'none saved yet'}"
            )

    def _finish(self, status: str, last_saved: int | None) -> dict[str, Any]:
        """Interrupted: save and leave. Completed: validate, save, export the student."""
        run_cfg = self.config.run
        export_dir = None
        if status == "interrupted":
            if last_saved != self.step:
                self.save()
            self.writer.log_text(f"stopped by signal at step {self.step}; "
                                 "resume with run.resume=auto")
            return self._result(status, export_dir)
        if self.last_val is None or not run_cfg.val_every or self.step % run_cfg.val_every:
            self.last_val = self.validate()
        if last_saved != self.step:
            self.save()
        export_dir = Path(run_cfg.export_dir) if run_cfg.export_dir else self.out_dir / "final"
        if self.info.is_main:
            export_student(self.student, export_dir, tokenizer_path=run_cfg.tokenizer or None,
                           model_card=model_card_for(self, export_dir),
                           pad_id=self.config.data.pad_id)
            self.writer.log_text(f"exported the student to {export_dir}")
        dist.barrier()
        return self._result(status, export_dir)

    def _result(self, status: str, export_dir: Path | None) -> dict[str, Any]:
        latest = ckpt.latest_checkpoint(self.out_dir)
        return {
            "out_dir": str(self.out_dir),
            "status": status,
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
