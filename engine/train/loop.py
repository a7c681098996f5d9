"""`python -m engine.train`: the distillation loop (and, with no arguments, the quickstart).

    python -m engine.train                                   # offline CPU quickstart
    python -m engine.train --config configs/distilpythia.toml --data.path=DIR ...
    torchrun --nproc_per_node=N -m engine.train --config ...  # DDP (NCCL on GPU, gloo on CPU)

One optimizer step = one accumulation window of `batch.accum_steps` micro-batches per rank.
The window's micro-batches are taken from the loader *before* any forward pass, so the
loss normaliser (valid label tokens of the whole window, summed over ranks) is known up
front: every micro-batch divides its summed token loss by the same number, and the
accumulated gradient equals that of one big batch. Holding a window of token ids on the
host costs 16 bytes per token (2 x int64), ~134 MB for the seed recipe's 4096 x 2048
window: the simplest correct choice.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from engine import checkpoint as ckpt
from engine import dist
from engine.config import Config, ConfigError, load_config, valid_keys, validate, write_resolved
from engine.metrics import MetricsWriter, flops_per_token, mfu, peak_flops, peak_memory_bytes
from engine.step import distill_micro_step

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row; the last good checkpoint was left untouched."""


# --------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------


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


def precision_dtypes(precision: str) -> tuple[torch.dtype, torch.dtype | None]:
    """(student weight dtype, autocast dtype) for a precision mode."""
    if precision == "bf16-autocast":
        return torch.float32, torch.bfloat16
    if precision == "bf16-pure":
        return torch.bfloat16, None
    if precision == "fp32":
        return torch.float32, None
    raise ConfigError(f"precision: unknown mode {precision!r}")


def build_student(config: Config, device: torch.device, dtype: torch.dtype):
    from engine.model import GPTNeoX

    s = config.student
    if s.init == "pretrained":
        return GPTNeoX.from_pretrained(s.path, dtype=dtype, device=device)
    torch.manual_seed(config.run.seed)  # same fresh weights for a seed, on every rank
    return GPTNeoX(s.scratch_model_config()).to(device=device, dtype=dtype)


def build_teacher(config: Config, device: torch.device):
    """The frozen teacher: eval mode, no parameter requires grad (None without teacher.path)."""
    if not config.teacher.path:
        return None
    from engine.model import GPTNeoX

    teacher = GPTNeoX.from_pretrained(
        config.teacher.path, dtype=DTYPES[config.teacher.dtype], device=device
    )
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def build_dataset(config: Config):
    from data.loader import PackedDataset, PaddedDataset

    if config.data.mode == "packed":
        return PackedDataset(config.data.path, config.batch.seq_len)
    return PaddedDataset(config.data.path, config.batch.seq_len, pad_id=config.data.pad_id)


def build_optimizer(config: Config, model: torch.nn.Module, device: torch.device):
    """AdamW; weight decay only on matrices (not biases, LayerNorms); fused when allowed.

    The fused implementation exists for CUDA and (torch >= 2.4) the CPU, where it is ~6x
    faster than the default foreach one for a 70M model; older builds fall back to foreach.
    """
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": config.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    kwargs: dict[str, Any] = dict(
        lr=config.optim.lr, betas=config.optim.betas, eps=config.optim.eps
    )
    if config.optim.fused and device.type in ("cuda", "cpu"):
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError, TypeError):
            pass  # no fused kernel for this device/dtype in this torch build
    return torch.optim.AdamW(groups, **kwargs)


def plan_micro_batch(config: Config, teacher_cfg, student_cfg, log) -> tuple[int, int, int | None]:
    """(micro_batch, accum_steps, predicted peak bytes) honouring batch.memory_budget.

    The budget picks the largest micro-batch the memory plan fits, among the divisors of the
    sequences per step, so the accumulation steps change but the tokens per step do not.
    """
    mb, accum = config.batch.micro_batch, config.batch.accum_steps
    if not config.batch.memory_budget:
        return mb, accum, None
    from engine.memory import largest_micro_batch, parse_bytes, plan_memory

    budget = parse_bytes(config.batch.memory_budget)
    largest = largest_micro_batch(
        teacher_cfg,
        student_cfg,
        seq_len=config.batch.seq_len,
        budget_bytes=budget,
        precision=config.precision,
        activation_checkpointing=config.runtime.activation_checkpointing,
    )
    if largest < 1:
        raise ConfigError(
            f"batch.memory_budget={config.batch.memory_budget}: not even one sequence of "
            f"{config.batch.seq_len} tokens fits (try runtime.activation_checkpointing=true)"
        )
    sequences = mb * accum
    new_mb = max(d for d in range(1, min(largest, sequences) + 1) if sequences % d == 0)
    new_accum = sequences // new_mb
    predicted = plan_memory(
        teacher_cfg,
        student_cfg,
        micro_batch=new_mb,
        seq_len=config.batch.seq_len,
        precision=config.precision,
        activation_checkpointing=config.runtime.activation_checkpointing,
    ).allocated_peak
    log(
        f"memory budget {config.batch.memory_budget}: largest micro-batch {largest}; using "
        f"micro_batch={new_mb} x accum_steps={new_accum} (was {mb} x {accum}), "
        f"predicted peak {predicted / 2**30:.2f} GiB"
    )
    return new_mb, new_accum, predicted


class StopRequest:
    """SIGTERM/SIGINT set a flag; the loop finishes its step, saves and exits cleanly."""

    def __init__(self):
        self.requested = False
        self.signal_name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C means now
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        print(
            f"{self.signal_name}: finishing the current step, then saving a checkpoint",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self):
        if _in_main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# --------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------


def run(config: Config) -> dict[str, Any]:
    """Train per `config` (resuming per run.resume); returns out_dir, status and final metrics.

    Raises ConfigError for unusable settings, TrainingDiverged after run.max_bad_steps
    non-finite steps in a row (checkpoints untouched), dist.DistributedError when a peer dies.
    """
    validate(config)
    info = dist.init_distributed(config.device)
    try:
        return _run(config, info)
    finally:
        dist.teardown()


def _run(config: Config, info: dist.DistInfo) -> dict[str, Any]:
    device = info.device
    out_dir = Path(config.run.out_dir)
    writer = MetricsWriter(out_dir, enabled=info.is_main, total_steps=config.run.steps)
    log = writer.log_text

    resume_from = ckpt.resolve_resume(config.run.resume, out_dir)
    if config.run.resume == "none" and ckpt.latest_checkpoint(out_dir) is not None:
        raise ConfigError(
            f"run.resume=none but {ckpt.checkpoint_root(out_dir)} holds checkpoints; "
            "use run.resume=auto to continue, or another run.out_dir"
        )
    if info.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        ckpt.clean_incomplete(out_dir)
        write_resolved(config, out_dir)
    dist.barrier()

    weight_dtype, autocast_dtype = precision_dtypes(config.precision)
    student = build_student(config, device, weight_dtype)
    teacher = build_teacher(config, device)
    _check_compatible(config, student, teacher)
    valid_vocab = config.data.valid_vocab or None
    if config.runtime.activation_checkpointing:
        student.set_activation_checkpointing(True)
    student.train()

    micro_batch, accum_steps, predicted_peak = plan_micro_batch(
        config, teacher.config if teacher is not None else None, student.config, log
    )

    from data.loader import BatchLoader

    dataset = build_dataset(config)
    loader_kwargs = dict(
        seed=config.run.seed,
        rank=info.rank,
        world_size=info.world_size,
        val_fraction=config.data.val_fraction,
    )
    train_loader = BatchLoader(dataset, micro_batch, split="train", **loader_kwargs)
    if len(train_loader) == 0:
        raise ConfigError(
            f"data.path={config.data.path}: no full training micro-batch of {micro_batch} x "
            f"{config.batch.seq_len} tokens for rank {info.rank} of {info.world_size}"
        )

    optimizer = build_optimizer(config, student, device)
    start_step, bad_steps = 0, 0
    if resume_from is not None:
        state = ckpt.load_checkpoint(resume_from, student=student, optimizer=optimizer)
        if len(state["loader_states"]) != info.world_size:
            raise ckpt.CheckpointLoadError(
                f"{resume_from}: saved by {len(state['loader_states'])} rank(s), "
                f"this run has {info.world_size}"
            )
        train_loader.load_state_dict(state["loader_states"][info.rank])
        ckpt.restore_rng_state(state["rng_states"][info.rank])
        start_step, bad_steps = int(state["step"]), int(state.get("bad_steps", 0))
        writer.truncate_after(start_step)
        log(f"resumed from {resume_from} at step {start_step}")

    model = student
    if info.distributed:
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(
            student,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            gradient_as_bucket_view=True,
        )
        # Each rank's loss is already divided by the global token count, so gradients must
        # be summed over ranks, not averaged (DDP's default divides by the world size).
        model.register_comm_hook(state=None, hook=dist.allreduce_sum_hook)
    if config.runtime.compile:
        model = torch.compile(model)

    seq_len = config.batch.seq_len
    tokens_per_step = micro_batch * accum_steps * seq_len * info.world_size
    flops_token = flops_per_token(
        student.config, teacher.config if teacher is not None else None, seq_len
    )
    peak = peak_flops(device)
    peak_total = peak * info.world_size if peak is not None else None
    log(
        f"student {student.num_parameters():,} params ({config.student.init}), teacher "
        f"{teacher.num_parameters() if teacher is not None else 0:,} params, device {device}, "
        f"world {info.world_size}, {micro_batch} x {seq_len} tokens x {accum_steps} accum "
        f"= {tokens_per_step:,} tokens/step, precision {config.precision}"
    )

    def save(step: int) -> Path | None:
        loader_states = dist.all_gather_object(train_loader.state_dict())
        rng_states = dist.all_gather_object(ckpt.capture_rng_state())
        path = None
        if info.is_main:
            path = ckpt.save_checkpoint(
                out_dir,
                step,
                student=student,
                optimizer=optimizer,
                trainer_state={
                    "loader_states": loader_states,
                    "rng_states": rng_states,
                    "bad_steps": bad_steps,
                    "world_size": info.world_size,
                },
                config=config.to_dict(),
                keep_last=config.run.keep_last,
            )
            log(f"saved checkpoint {path}")
        dist.barrier()
        return path

    def validate_now(step: int) -> dict[str, Any] | None:
        result = _validation(config, student, teacher, dataset, micro_batch, info,
                             valid_vocab, autocast_dtype)
        if result is not None:
            writer.write({"kind": "val", "step": step, **result})
            log(
                f"val step {step}: ce {result['val_ce']:.4f} ppl {result['val_ppl']:.2f}"
                + (f" kd {result['val_kd']:.4f}" if "val_kd" in result else "")
            )
        return result  # heldout_metrics put the student back in train mode

    max_norm = config.optim.grad_clip if config.optim.grad_clip > 0 else float("inf")
    step = start_step
    last_saved = start_step if resume_from is not None else None
    last_record: dict[str, Any] = {}
    last_val: dict[str, Any] | None = None
    status = "completed"
    batches = iter(train_loader)
    session_start, session_steps = time.perf_counter(), 0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    with StopRequest() as stop:
        while step < config.run.steps:
            t0 = time.perf_counter()
            window = list(itertools.islice(batches, accum_steps))
            local_valid = sum(int((b["labels"] != -100).sum()) for b in window)
            normalizer = dist.all_reduce_sum(
                torch.tensor(float(local_valid), dtype=torch.float32, device=device)
            ).clamp(min=1.0)
            sums = torch.zeros(4, dtype=torch.float32, device=device)  # loss, ce, kd, valid
            for i, batch in enumerate(window):
                # DDP all-reduces gradients only on the window's last micro-batch.
                skip_sync = info.distributed and i < len(window) - 1
                context = model.no_sync() if skip_sync else contextlib.nullcontext()
                with context:
                    stats = distill_micro_step(
                        model,
                        teacher,
                        batch,
                        alpha=config.loss.alpha,
                        temperature=config.loss.temperature,
                        valid_vocab=valid_vocab,
                        normalizer=normalizer,
                        autocast_dtype=autocast_dtype,
                        backend=config.loss.backend,
                    )
                sums += torch.stack(
                    [stats["loss"], stats["ce_sum"], stats["kd_sum"], stats["valid_tokens"]]
                )
            grad_norm = torch.nn.utils.clip_grad_norm_(student.parameters(), max_norm)
            flag = torch.tensor([1.0 if stop.requested else 0.0], device=device)
            totals = dist.all_reduce_sum(torch.cat([sums, flag]))
            # One host sync per step: the grad norm (already global after DDP's all-reduce)
            # rides along with the summed stats instead of taking a sync of its own.
            loss, ce_sum, kd_sum, valid, stop_votes, grad_norm_value = torch.cat(
                [totals, grad_norm.reshape(1).to(totals)]
            ).tolist()
            finite = math.isfinite(loss) and math.isfinite(grad_norm_value)
            lr = lr_at(config, step)
            if finite:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                optimizer.step()
                bad_steps = 0
            else:
                bad_steps += 1
            optimizer.zero_grad(set_to_none=True)
            step += 1

            elapsed = time.perf_counter() - t0
            session_steps += 1
            per_step = (time.perf_counter() - session_start) / session_steps
            tokens_per_s = tokens_per_step / elapsed if elapsed > 0 else 0.0
            last_record = {
                "kind": "train",
                "step": step,
                "loss": loss,
                "ce": ce_sum / max(valid, 1.0),
                "kd": kd_sum / max(valid, 1.0) if teacher is not None else None,
                "lr": lr,
                "grad_norm": grad_norm_value,
                "valid_tokens": int(valid),
                "tokens_per_s": tokens_per_s,
                "mfu": mfu(tokens_per_s, flops_token, peak_total),
                "peak_memory_bytes": peak_memory_bytes(device),
                "step_time_s": elapsed,
                "eta_s": per_step * (config.run.steps - step),
                "skipped": not finite,
            }
            writer.log_step(
                last_record,
                print_line=step % config.run.log_every == 0 or step == config.run.steps,
            )
            if device.type == "cuda" and session_steps == 1:
                plan = f"predicted {predicted_peak / 2**30:.2f} GiB, " if predicted_peak else ""
                measured = last_record["peak_memory_bytes"] / 2**30
                log(f"peak memory: {plan}measured {measured:.2f} GiB")

            if not finite:
                message = (
                    f"step {step}: non-finite loss {loss} or grad norm {grad_norm_value}; "
                    f"update skipped ({bad_steps} in a row, limit {config.run.max_bad_steps})"
                )
                warnings.warn(message, RuntimeWarning, stacklevel=2)
                if bad_steps >= config.run.max_bad_steps:
                    good = ckpt.latest_checkpoint(out_dir)
                    raise TrainingDiverged(
                        f"{bad_steps} non-finite steps in a row (last at step {step}); stopped. "
                        f"Last good checkpoint: {good if good else 'none saved yet'}"
                    )

            if config.run.val_every and step % config.run.val_every == 0:
                last_val = validate_now(step)
            if config.run.save_every and step % config.run.save_every == 0:
                save(step)
                last_saved = step
            if stop_votes > 0:
                status = "interrupted"
                break

    if status == "interrupted":
        if last_saved != step:
            save(step)
        log(f"stopped by signal at step {step}; resume with run.resume=auto")
        return _result(config, out_dir, step, status, last_record, last_val, None,
                       micro_batch, accum_steps)

    if last_val is None or not config.run.val_every or step % config.run.val_every:
        last_val = validate_now(step)
    if last_saved != step:
        save(step)
    export_dir = Path(config.run.export_dir) if config.run.export_dir else out_dir / "final"
    if info.is_main:
        ckpt.export_student(student, export_dir, tokenizer_path=config.run.tokenizer or None)
        log(f"exported the student to {export_dir}")
    dist.barrier()
    return _result(config, out_dir, step, status, last_record, last_val, export_dir,
                   micro_batch, accum_steps)


def _result(config, out_dir, step, status, record, val, export_dir, micro_batch, accum_steps):
    latest = ckpt.latest_checkpoint(out_dir)
    return {
        "out_dir": str(out_dir),
        "status": status,
        "step": step,
        "steps": config.run.steps,
        "micro_batch": micro_batch,
        "accum_steps": accum_steps,
        "final_metrics": dict(record),
        "val": val,
        "checkpoint": str(latest) if latest is not None else None,
        "export_dir": str(export_dir) if export_dir is not None else None,
        "metrics_path": str(out_dir / "metrics.jsonl"),
    }


def _check_compatible(config: Config, student, teacher) -> None:
    vocab = student.config.vocab_size
    if teacher is not None and teacher.config.vocab_size != vocab:
        raise ConfigError(
            f"teacher.path={config.teacher.path} has vocab_size {teacher.config.vocab_size}, "
            f"the student has {vocab}: the logits must share a vocabulary"
        )
    if config.data.valid_vocab > vocab:
        raise ConfigError(f"data.valid_vocab={config.data.valid_vocab} exceeds vocab_size {vocab}")
    for name, model in (("student", student), ("teacher", teacher)):
        if model is not None and config.batch.seq_len > model.config.max_positions:
            raise ConfigError(
                f"batch.seq_len={config.batch.seq_len} exceeds the {name}'s max_positions "
                f"{model.config.max_positions}"
            )


def _validation(config, student, teacher, dataset, micro_batch, info, valid_vocab, autocast):
    """Held-out metrics on the loader's val split through engine.eval.heldout_metrics."""
    from data.loader import BatchLoader
    from engine.eval import heldout_metrics

    if config.data.val_fraction <= 0:
        return None
    val_loader = BatchLoader(
        dataset,
        micro_batch,
        seed=config.run.seed,
        rank=info.rank,
        world_size=info.world_size,
        split="val",
        val_fraction=config.data.val_fraction,
        drop_last=False,
    )
    batches = iter(val_loader)
    if config.run.val_batches:
        batches = itertools.islice(batches, config.run.val_batches)
    metrics = heldout_metrics(
        student,
        batches,
        teacher=teacher,
        temperature=config.loss.temperature,
        valid_vocab=valid_vocab,
        autocast_dtype=autocast,
        reduce_across_ranks=info.distributed,
    )
    if not metrics.get("tokens"):
        return None
    return {f"val_{key}": value for key, value in metrics.items()}


# --------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------

USAGE = """usage: python -m engine.train [--config FILE.toml] [--section.key=value ...]
       python -m engine.train            (no arguments: the offline quickstart)
"""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        from engine.quickstart import main as quickstart_main

        return quickstart_main() or 0
    if argv[0] in ("-h", "--help"):
        print(USAGE + "keys: " + ", ".join(valid_keys()))
        return 0
    path = None
    overrides = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg == "--config":
            if i + 1 >= len(argv):
                print("error: --config needs a file", file=sys.stderr)
                return 2
            path, i = argv[i + 1], i + 2
        elif arg.startswith("--config="):
            path, i = arg.split("=", 1)[1], i + 1
        else:
            overrides.append(arg)
            i += 1
    try:
        config = load_config(path, overrides)
        result = run(config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (TrainingDiverged, ckpt.CheckpointLoadError, dist.DistributedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if os.environ.get("RANK", "0") == "0":
        print(f"{result['status']} at step {result['step']}; run folder {result['out_dir']}, "
              f"metrics {result['metrics_path']}, export {result['export_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
