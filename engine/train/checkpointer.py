"""The run's checkpoint manager: where a run starts from, when it saves, what it keeps.

    checkpointer = Checkpointer(config, info, strategy, log)   # checks out_dir, clears debris
    step = checkpointer.resume(student, optimizer, loader)    # the newest intact checkpoint
    checkpointer.record(step, applied)                         # after every optimizer step
    checkpointer.save(step, last_step=...)                     # every run.save_every, and last

record() keeps what saving depends on: the non-finite steps in a row (no save during such a
streak) and the finite ones (the last good checkpoint, kept beside the newest run.keep_last).
The layout on disk and who writes it are the strategy's (engine/train/strategy.py).
"""

from __future__ import annotations

from pathlib import Path

from engine import dist
from engine.data.loader import BatchLoader
from engine.train import checkpoint as ckpt
from engine.train.config import Config, ConfigError


class TrainingDiverged(RuntimeError):
    """Non-finite steps or weights; nothing was saved or exported from the broken state."""


def prepare_run_folder(config: Config, info: dist.DistInfo) -> tuple[list[Path], bool]:
    """Check out_dir against run.resume and run.overwrite, clear debris of killed saves;
    return (the checkpoints to try resuming from, best first (empty: a fresh start), whether
    an earlier run's results are to be replaced).

    Call with the run lock held. A fresh start refuses a folder holding an earlier run's
    results unless run.overwrite is set; the caller replaces them (run_folder
    .replace_earlier_results) only once every other start-up check has passed.
    """
    out_dir = Path(config.run.out_dir)
    candidates = ckpt.resume_candidates(config.run.resume, out_dir)
    if config.run.resume == "none" and ckpt.latest_checkpoint(out_dir) is not None:
        raise ConfigError(
            f"run.resume=none: {ckpt.checkpoint_root(out_dir)} holds checkpoints; "
            "use run.resume=auto to continue, or another run.out_dir"
        )
    earlier = []  # what an earlier run left besides checkpoints: its export, its metrics
    if not candidates and (out_dir / "final").exists():
        earlier.append(str(out_dir / "final"))
    metrics = out_dir / "metrics.jsonl"
    if not candidates and metrics.is_file() and metrics.stat().st_size > 0:
        earlier.append(str(metrics))
    if earlier and not config.run.overwrite:
        raise ConfigError(
            f"run.out_dir: {out_dir} holds an earlier run ({', '.join(earlier)}) and no "
            "checkpoint to resume from; choose another run.out_dir, or set "
            "run.overwrite=true to replace its results"
        )
    if info.is_main:
        ckpt.clean_incomplete(out_dir)  # a killed save's own debris, nothing else
    dist.barrier()
    return candidates, bool(earlier)


def rescaled_loader_state(states: list[dict], loader: BatchLoader, folder: Path) -> dict:
    """This rank's loader state for a checkpoint written by another number of ranks.

    The ranks deal each epoch's permutation out round-robin, micro-batch by micro-batch, so
    after `position` micro-batches each, N ranks have together consumed exactly the first
    position x micro_batch x N items of it, whatever N is. M ranks continue from the same
    item when that count is a whole number of their micro_batch x M items (always so when
    the sequences per optimizer step stay the same); otherwise the resume is refused.
    """
    first = states[0]
    if any((s["epoch"], s["position"]) != (first["epoch"], first["position"]) for s in states):
        raise ckpt.CheckpointLoadError(
            f"{folder}: its ranks' data loaders stopped at different positions; it can only "
            f"continue on {len(states)} ranks")
    consumed = first["position"] * first["micro_batch"] * len(states)
    per_batch = loader.micro_batch * loader.world_size
    if consumed % per_batch:
        raise ckpt.CheckpointLoadError(
            f"{folder}: {len(states)} rank(s) consumed {consumed} sequences of epoch "
            f"{first['epoch']}, not a multiple of this run's {loader.micro_batch} x "
            f"{loader.world_size} per micro-batch; resume on {len(states)} rank(s), or keep "
            "micro_batch x world size a divisor of that count")
    return {**first, "world_size": loader.world_size, "micro_batch": loader.micro_batch,
            "position": consumed // per_batch}


class Checkpointer:
    """Resume, interval, save, prune and the health ledger of one run (module docstring)."""

    def __init__(self, config: Config, info: dist.DistInfo, strategy, log):
        self.config, self.info, self.strategy, self.log = config, info, strategy, log
        self.out_dir = Path(config.run.out_dir)
        self.candidates, self.replacing = prepare_run_folder(config, info)
        self.resumed_from: Path | None = None
        self.last_saved: int | None = None  # the step saved last (or resumed from)
        self.bad_steps = 0  # non-finite steps in a row
        self.finite_steps: set[int] = set()  # steps whose update was applied
        self.student = self.optimizer = self.loader = self.signal = None

    def resume(self, student, optimizer, loader: BatchLoader, signal=None) -> int:
        """Load the first candidate that loads into the live state (kept for saving: the
        student, optimizer, loader and the teacher signal's random state); return
        its step (0 for a fresh start). A damaged one (a sha256 changed, non-finite weights, an
        unreadable state file) is skipped with a warning naming it and why, so resume=auto
        falls back to the newest intact checkpoint; when none is intact the run stops rather
        than start afresh over them. Every load overwrites all of the live state."""
        self.student, self.optimizer, self.loader, self.signal = student, optimizer, loader, signal
        failures = []
        for folder in self.candidates:
            try:
                step = self._load(folder)
            except ckpt.CheckpointLoadError as exc:
                failures.append(str(exc))
                self.log(f"warning: not resuming from {folder}: {exc}")
                continue
            if failures:
                self.log(f"warning: resuming from {folder}, the newest intact checkpoint")
            self.resumed_from, self.last_saved = folder, step
            return step
        if not failures:
            return 0
        if len(self.candidates) == 1:
            raise ckpt.CheckpointLoadError(failures[0])
        raise ckpt.CheckpointLoadError(
            f"no intact checkpoint to resume from ({'; '.join(failures)}); move the damaged "
            "ones away to start afresh, or choose another run.out_dir"
        )

    def _load(self, folder: Path) -> int:
        """Load a checkpoint into the live student, optimizer, loader, RNGs and signal; return
        its step. One of another number of ranks continues on this one (rescaled_loader_state;
        each rank's on-policy sampler then starts from its seed)."""
        info = self.info
        state = self.strategy.load_checkpoint(folder, student=self.student,
                                              optimizer=self.optimizer)
        saved = state["loader_states"]
        if len(saved) == info.world_size:
            self.loader.load_state_dict(saved[info.rank])
            ckpt.restore_rng_state(state["rng_states"][info.rank])
            if self.signal is not None:
                self.signal.load_state_dict(state["rng_states"][info.rank])
        else:
            self.loader.load_state_dict(rescaled_loader_state(saved, self.loader, folder))
            # No rank of the saved run is this one: every rank takes rank 0's RNG streams.
            ckpt.restore_rng_state(state["rng_states"][0])
            self.log(f"{folder}: saved by {len(saved)} rank(s), continuing on "
                     f"{info.world_size}: the data continues where the saved ranks stopped "
                     "(not bit-exact across world sizes)")
        self.bad_steps = int(state.get("bad_steps", 0))
        return int(state["step"])

    def record(self, step: int, applied: bool) -> None:
        """Note whether optimizer step `step` applied its update (finite) or skipped it."""
        self.bad_steps = 0 if applied else self.bad_steps + 1
        if applied:
            self.finite_steps.add(step)

    def last_good_message(self, step: int) -> str:
        """Names the last good checkpoint: the newest whose next step was finite (so its
        weights gave a finite loss), or says that none is. Checkpoints at the failing step
        or later hold the weights that failed and are never named."""
        good = ckpt.last_good_checkpoint(self.out_dir, self.finite_steps, below=step)
        if good is None:
            return ("No checkpoint is known good (good: the step after it was finite); "
                    "start again with a lower optim.lr")
        return (f"Last good checkpoint (the step after it was finite): {good}; "
                f"resume from it with run.resume={good} and a lower optim.lr")

    def save(self, step: int, *, last_step: bool = False) -> Path | None:
        """Save checkpoint `step` when run.save_every says so, or when it is the last step of
        this session (`last_step`) and not saved yet; returns the path on the writing rank."""
        every = self.config.run.save_every
        due = bool(every) and step % every == 0
        if step == self.last_saved or not (due or last_step):
            return None
        self.last_saved = step
        return self._save(step)

    def _save(self, step: int) -> Path | None:
        """A checkpoint of this step (every rank's loader and RNG in it), written per the
        strategy. Never from non-finite weights (TrainingDiverged instead), and none during a
        streak of skipped steps: it would hold the suspect weights again (logged, None).
        Pruning keeps the last good checkpoint beside the newest run.keep_last: the newest
        are not known good until the step after them is finite."""
        if self.bad_steps:
            self.log(f"step {step}: no checkpoint saved: the last {self.bad_steps} step(s) "
                     "were non-finite")
            return None
        bad = self.strategy.first_non_finite(self.student)  # the same verdict on every rank
        if bad is not None:
            raise TrainingDiverged(
                f"step {step}: the student's weight {bad} is not finite; nothing saved. "
                f"{self.last_good_message(step)}"
            )
        loader_states = dist.all_gather_object(self.loader.state_dict())
        signal_state = self.signal.state_dict() if self.signal is not None else {}
        rng_states = dist.all_gather_object({**ckpt.capture_rng_state(), **signal_state})
        path = self.strategy.save_checkpoint(
            self.out_dir,
            step,
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
            keep=ckpt.last_good_checkpoint(self.out_dir, self.finite_steps),
        )
        if self.info.is_main:
            self.log(f"saved checkpoint {path}")
        dist.barrier()
        return path
