"""Updates lost to rounding: how much of AdamW's step a low-precision weight did not take.

With precision "bf16-pure" the weights are stored in bf16, whose 8 significant bits cannot
represent a change smaller than about |w| / 256: AdamW computes an update, adds it to the
weight, and the sum rounds back to the old weight. Nothing fails and nothing is logged; the
run just learns less (the seed recipe, lr 1e-4 on pythia-70m, is such a run). This module
makes that visible.

Definition, per optimizer step, over every parameter element AdamW is about to update:

    u     = the update AdamW computes in fp32 from this step's (clipped) gradient, its state
            and its hyper-parameters: -lr * m_hat / (sqrt(v_hat) + eps) - lr * wd * w
    moved = u != 0
    lost  = moved and round_to_weight_dtype(w + u) == w

    update_lost_frac     = count(lost) / count(moved)
    update_lost_weighted = sum(|u| over lost) / sum(|u| over moved)

u is derived from AdamW's own state in an optimizer step pre-hook, chunk by chunk (a few
temporaries of at most CHUNK_ELEMENTS each, never a second copy of the model). It is the
update the fused AdamW kernel applies with one rounding (it computes in fp32); the unfused
implementation rounds its bf16 intermediates too, so there the measured loss is a close
estimate. In fp32 and bf16-autocast the weights are fp32 master copies: 0 by definition,
not computed.
"""

from __future__ import annotations

import warnings

import torch

from engine.dist import all_reduce_sum

# Elements per chunk: bounds the metric's temporaries to a few x 16 MiB of fp32.
CHUNK_ELEMENTS = 1 << 22
# More than this fraction of updates lost is "most": warn once, say what to change.
MOST = 0.5
ADVICE = ("use precision=bf16-autocast (fp32 master weights and AdamW state, the same bf16 "
          "matmuls), precision=fp32, or a larger optim.lr")


def _adamw_hyper(group: dict, state: dict):
    """(step size lr / bias_correction1, sqrt(bias_correction2), beta1, beta2, eps, lr * wd)
    of the step AdamW is about to take (state["step"] counts the steps already taken)."""
    beta1, beta2 = group["betas"]
    taken = state.get("step")
    step = 1 if taken is None else taken + 1  # a tensor (maybe on the device) or an int
    lr = group["lr"]
    return (lr / (1 - beta1**step), (1 - beta2**step) ** 0.5, beta1, beta2, group["eps"],
            lr * group["weight_decay"])


def _local(tensor):
    """An FSDP shard's own elements (DTensor.to_local), or the tensor itself: every sum here
    is over this rank's elements, and LostUpdateMeter adds the ranks' sums."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def adamw_update(param: torch.Tensor, state: dict, group: dict,
                 start: int = 0, stop: int | None = None, *,
                 weight: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 update AdamW is about to apply to param.view(-1)[start:stop] (before rounding).

    Mirrors torch.optim.AdamW (not amsgrad, not maximize): m = beta1 m + (1 - beta1) g,
    v = beta2 v + (1 - beta2) g^2, u = -lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps) - lr wd w.
    `weight`: that slice of the parameter in fp32 when the caller has it already.
    """
    step_size, bc2_sqrt, beta1, beta2, eps, decay = _adamw_hyper(group, state)
    grad = _local(param.grad).reshape(-1)[start:stop].float()
    exp_avg, exp_avg_sq = state.get("exp_avg"), state.get("exp_avg_sq")
    m = (1 - beta1) * grad
    v = (1 - beta2) * grad * grad
    if exp_avg is not None:
        m = m.add_(_local(exp_avg).reshape(-1)[start:stop].float(), alpha=beta1)
        v = v.add_(_local(exp_avg_sq).reshape(-1)[start:stop].float(), alpha=beta2)
    update = -step_size * m / (v.sqrt_() / bc2_sqrt + eps)
    if decay:
        if weight is None:
            weight = _local(param.detach()).reshape(-1)[start:stop].float()
        update -= decay * weight
    return update


def lost_update_sums(optimizer: torch.optim.Optimizer) -> torch.Tensor | None:
    """float64 [lost, moved, |u| lost, |u| moved] over every parameter with a gradient, on
    the parameters' device (no host sync); None when no parameter has a gradient."""
    sums = None
    for group in optimizer.param_groups:
        for param in group["params"]:
            if param.grad is None:
                continue
            if sums is None:
                sums = torch.zeros(4, dtype=torch.float64, device=param.device)
            state = optimizer.state.get(param, {})
            flat = _local(param.detach()).reshape(-1)
            for start in range(0, flat.numel(), CHUNK_ELEMENTS):
                stop = start + CHUNK_ELEMENTS
                weight = flat[start:stop]
                weight32 = weight.float()
                update = adamw_update(param, state, group, start, stop, weight=weight32)
                moved = update != 0
                lost = moved & ((weight32 + update).to(weight.dtype) == weight)
                size = update.abs_()
                sums += torch.stack([lost.sum(), moved.sum(), (size * lost).sum(),
                                     size.sum()]).double()
    return sums


def full_step_loss(model: torch.nn.Module, lr: float) -> tuple[float, float]:
    """(fraction of trainable weights that a change of exactly lr would not move, median
    |w|): AdamW's first step moves every weight by about lr, later steps by less, so this is
    a lower bound on what the run will lose."""
    lost, total, samples = 0, 0, []
    with torch.no_grad():
        for param in model.parameters():
            if not param.requires_grad:
                continue
            flat = _local(param.detach()).reshape(-1)  # FSDP: this rank's shard, a sample
            for start in range(0, flat.numel(), CHUNK_ELEMENTS):
                size = flat[start : start + CHUNK_ELEMENTS].abs()
                lost += int(((size.float() + lr).to(size.dtype) == size).sum())
                total += size.numel()
                samples.append(size[:: max(1, size.numel() // 4096)].float().cpu())
    median = float(torch.cat(samples).median()) if samples else 0.0
    return (lost / total if total else 0.0), median


def typical_step(lr: float, beta1: float) -> float:
    """AdamW's typical step once gradients are mostly noise: m is then an average of
    uncorrelated gradients, with RMS sqrt((1 - beta1) / (1 + beta1)) of sqrt(v), so the step
    is that times lr (0.23 lr for beta1 = 0.9) rather than the full lr of the first step."""
    return lr * ((1 - beta1) / (1 + beta1)) ** 0.5


def startup_warning(model: torch.nn.Module, lr: float, beta1: float) -> str | None:
    """The warning for a low-precision model that would lose most of AdamW's typical steps
    at `lr` (see typical_step), or None."""
    dtype = next(model.parameters()).dtype
    if dtype == torch.float32:
        return None
    step = typical_step(lr, beta1)
    lost, median = full_step_loss(model, step)
    if lost <= MOST:
        return None
    full, _ = full_step_loss(model, lr)
    return (
        f"precision bf16-pure with optim.lr={lr:g}: a typical AdamW step (~{step:.1e} per "
        f"weight once gradients are noisy) would be rounded away on {lost:.0%} of the "
        f"student's weights, a full-size step of lr on {full:.0%} (median |w| {median:.3g}; "
        f"{dtype} keeps a change only above about |w|/256 = {median / 256:.1e}). Most updates "
        f"will be lost: {ADVICE}"
    )


class LostUpdateMeter:
    """update_lost_frac / update_lost_weighted for each step's record.

    mode "measure": an optimizer step pre-hook takes the sums before each applied step;
    "zero": fp32 master weights, 0 by definition; "off": not measured (None).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, mode: str, *, warn: bool = True):
        if mode not in ("measure", "zero", "off"):
            raise ValueError(f"LostUpdateMeter mode must be measure, zero or off, got {mode!r}")
        self.mode, self.warn = mode, warn
        self._pending: torch.Tensor | None = None
        params = [p for g in optimizer.param_groups for p in g["params"]]
        self.sharded = any(hasattr(p, "to_local") for p in params)
        if mode == "measure":
            if not isinstance(optimizer, torch.optim.AdamW) or any(
                g.get("amsgrad") or g.get("maximize") for g in optimizer.param_groups
            ):
                raise ValueError("the lost-update metric knows torch.optim.AdamW without "
                                 "amsgrad or maximize only")
            optimizer.register_step_pre_hook(self._before_step)

    def _before_step(self, optimizer, args, kwargs) -> None:
        sums = lost_update_sums(optimizer)
        if sums is not None and self.sharded:
            sums = all_reduce_sum(sums)  # every rank measured its own shards
        self._pending = sums

    def fields(self, step: int) -> dict[str, float | None]:
        """This step's two numbers (None when measured but the update was skipped)."""
        if self.mode != "measure":
            value = 0.0 if self.mode == "zero" else None
            return {"update_lost_frac": value, "update_lost_weighted": value}
        sums, self._pending = self._pending, None
        if sums is None:
            return {"update_lost_frac": None, "update_lost_weighted": None}
        lost, moved, lost_size, moved_size = sums.tolist()
        frac = lost / moved if moved else 0.0
        if self.warn and frac > MOST:
            self.warn = False  # once per run
            warnings.warn(
                f"step {step}: {frac:.0%} of AdamW's updates were rounded away in the bf16 "
                f"weights (update_lost_frac in metrics.jsonl); {ADVICE}",
                RuntimeWarning, stacklevel=2,
            )
        return {"update_lost_frac": frac,
                "update_lost_weighted": lost_size / moved_size if moved_size else 0.0}


def build_meter(optimizer: torch.optim.Optimizer, model: torch.nn.Module, *, precision: str,
                enabled: bool, lr: float, beta1: float, is_main: bool) -> LostUpdateMeter:
    """The run's meter (measuring in bf16-pure unless eval.lost_updates is false), after the
    start-up warning when the configuration is known to lose most updates."""
    if precision != "bf16-pure":
        return LostUpdateMeter(optimizer, "zero")
    message = startup_warning(model, lr, beta1) if is_main else None
    if message:
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return LostUpdateMeter(optimizer, "measure" if enabled else "off", warn=is_main)
