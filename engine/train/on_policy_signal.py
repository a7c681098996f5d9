"""The on-policy teacher signal: a share of the micro-batches is written by the student.

GKD's mixture (Agarwal et al., 2024): with onpolicy.fraction = lambda, micro-batch k of the
run (counted over every rank's windows alike) is on-policy when floor((k + 1) lambda) >
floor(k lambda), so exactly that share is, spread evenly, and a resumed run picks the same
ones. `prepare_window` runs before the window's normaliser is counted: it replaces each chosen
micro-batch by the student's continuation of its prompt (engine/on_policy.py), labelled on the
completion only, so the window's valid tokens, and the gradient-accumulation normaliser, count
what the loss really sees. The live teacher then scores prompt + completion in one prefill;
on-policy micro-batches take the divergence alone (the spec with alpha = 0: there is no
reference token to apply cross-entropy to), the others the spec as configured.

The sampler draws from its own torch.Generator, seeded from run.seed and the rank (each rank
samples its own); its state goes into every checkpoint (engine/train/checkpoint.py), so a
resumed run samples the tokens the uninterrupted one would have.
"""

from __future__ import annotations

import math
import time
from dataclasses import replace

import torch

from engine import dist
from engine.kernels.constants import IGNORE_INDEX
from engine.model.network import unwrap_model
from engine.on_policy import SamplingSettings, student_batch, teacher_nll_sum
from engine.sampling import new_generator, restore_generator_state
from engine.train.teacher_signal import LiveTeacher


def is_on_policy(k: int, fraction: float) -> bool:
    """Whether micro-batch k (0-based, of the run) is on-policy at share `fraction`."""
    return math.floor((k + 1) * fraction) > math.floor(k * fraction)


class OnPolicyTeacher:
    """A LiveTeacher whose chosen micro-batches hold the student's own samples."""

    teaches = True
    from_cache = False

    def __init__(self, live: LiveTeacher, settings: SamplingSettings, *, fraction: float,
                 accum_steps: int, seed: int, rank: int, device: torch.device,
                 autocast_dtype: torch.dtype | None = None):
        self.live, self.settings, self.fraction = live, settings, fraction
        self.accum_steps, self.autocast_dtype = accum_steps, autocast_dtype
        self.generator = new_generator(seed * 1_000_003 + rank, device)
        # this step's sums: on-policy tokens, all tokens, written tokens, rows, teacher NLL, s
        self._sums = torch.zeros(6, dtype=torch.float64)
        self._nll = torch.zeros((), dtype=torch.float32, device=device)

    def describe(self) -> str:
        s = self.settings
        return (f"on-policy share {self.fraction} (prompt {s.prompt_tokens} + {s.new_tokens} "
                f"sampled tokens, T {s.temperature}) graded by a live teacher")

    def prepare_window(self, window: list[dict], student: torch.nn.Module,
                       step: int) -> list[dict]:
        """The window with its on-policy micro-batches written by `student` (the bare model,
        not a DDP / compiled wrapper); `step` is the number of steps done before this one."""
        started = time.perf_counter()
        self._sums.zero_()
        self._nll.zero_()
        out = []
        for i, batch in enumerate(window):
            if is_on_policy(step * self.accum_steps + i, self.fraction):
                device = self.generator.device
                batch = student_batch(student, batch["input_ids"].to(device), self.settings,
                                      generator=self.generator, labels=batch["labels"],
                                      autocast_dtype=self.autocast_dtype,
                                      gathered=self.live.gathered)
                batch["onpolicy"] = True
            tokens = float((batch["labels"] != IGNORE_INDEX).sum())
            if batch.get("onpolicy"):
                self._sums[0] += tokens
                self._sums[2] += float(batch["generated"].sum())
                self._sums[3] += batch["input_ids"].shape[0]
            self._sums[1] += tokens
            out.append(batch)
        self._sums[5] = time.perf_counter() - started
        return out

    def teacher_side(self, batch, input_ids, spec, autocast_dtype):
        side = self.live.teacher_side(batch, input_ids, spec, autocast_dtype)
        on = bool(batch.get("onpolicy", False))
        if on:
            labels = batch["labels"].to(input_ids.device)
            teacher = unwrap_model(self.live.model)
            columns = spec.valid_vocab or teacher.config.vocab_size
            with self.live.gathered(self.live.model), torch.no_grad():
                if spec.fused_head:  # side: hidden states; only labelled rows meet the head
                    self._nll += teacher_nll_sum(side, labels, teacher.embed_out.weight[:columns])
                else:
                    self._nll += teacher_nll_sum(side[..., :columns], labels)
        return side, on

    def head_loss(self, side, hidden, head, labels, spec, *, normalizer, chunk_tokens):
        side, on = side
        return self.live.head_loss(side, hidden, head, labels, replace(spec, alpha=0.0)
                                   if on else spec, normalizer=normalizer,
                                   chunk_tokens=chunk_tokens)

    def logits_loss(self, side, logits, labels, spec, *, normalizer, inplace_grad):
        side, on = side
        return self.live.logits_loss(side, logits, labels, replace(spec, alpha=0.0)
                                     if on else spec, normalizer=normalizer,
                                     inplace_grad=inplace_grad)

    def window_metrics(self, step_seconds: float) -> dict:
        """The step's onpolicy_* record fields, summed over ranks (every rank calls it)."""
        sums = self._sums.to(self._nll.device, torch.float32)
        sums[4] = self._nll  # stays on the device: the one host sync is the reduced total
        total = dist.all_reduce_sum(sums).tolist()
        on_tokens, all_tokens, written, rows, nll, seconds = total
        world = dist.get_world_size()
        return {
            "onpolicy_token_share": on_tokens / all_tokens if all_tokens else 0.0,
            "onpolicy_mean_new_tokens": written / rows if rows else None,
            "onpolicy_generation_share": (seconds / world) / step_seconds
            if step_seconds > 0 else None,
            "onpolicy_teacher_nll": nll / on_tokens if on_tokens else None,
        }

    def state_dict(self) -> dict:
        """The sampler's state, saved beside each rank's RNG states."""
        return {"sampler": self.generator.get_state().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a saved sampler; a checkpoint of an off-policy run holds none (the
        sampler then starts from its seed)."""
        if "sampler" in state:
            restore_generator_state(self.generator, state["sampler"])

