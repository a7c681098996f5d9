"""A byte-level memory plan for one distillation step, so the 12 GiB question has an answer
before a GPU is rented.

The plan counts what the CUDA caching allocator holds at the peak of a micro-step, which is
the start of the student's backward pass: everything persistent (student weights, gradients,
optimizer moments, the frozen teacher), the teacher's logits, the student's logits, and every
activation autograd saved during the student's forward. Activations are counted tensor by
tensor for our GPT-NeoX block (see `_layer_saved_tensors`), which is what the tests compare
with torch's own saved tensors on a small model. CUDA context and allocator slack are added on
top because the user's card has to hold them too, although `torch.cuda.max_memory_allocated`
never sees them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

from engine.precision import compute_dtype, precision_dtypes

ATTENTION_IMPLS = ("flash", "math")

# What the CUDA driver holds outside the caching allocator (context, cuBLAS/cuDNN handles and
# kernels images) on a recent driver, and the fraction the allocator loses to fragmentation
# and block rounding in a steady training loop. Both are conservative round numbers.
CUDA_CONTEXT_BYTES = 600 * 2**20
ALLOCATOR_SLACK_FRACTION = 0.10

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kb": 1000,
    "kib": 1024,
    "m": 1024**2,
    "mb": 1000**2,
    "mib": 1024**2,
    "g": 1024**3,
    "gb": 1000**3,
    "gib": 1024**3,
    "t": 1024**4,
    "tb": 1000**4,
    "tib": 1024**4,
}


def parse_bytes(text: str | int | float) -> int:
    """Parse "12GiB", "12 GB", "1.5G", "4096" into bytes.

    GiB/MiB/KiB are powers of 1024, GB/MB/KB powers of 1000 (as disk and card vendors use
    them); a bare "G"/"M"/"K" is taken as binary because that is what people mean by "12G".
    """
    if isinstance(text, bool):
        raise ValueError(f"memory size must be a number or a string like '12GiB', got {text!r}")
    if isinstance(text, (int, float)):
        value, unit = float(text), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
        if match is None:
            raise ValueError(f"cannot parse memory size {text!r}: expected e.g. '12GiB' or '500MB'")
        value, unit = float(match.group(1)), match.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(
            f"unknown unit in memory size {text!r}: "
            "use one of B, KB, MB, GB, TB, KiB, MiB, GiB, TiB"
        )
    result = value * _UNITS[unit]
    if not math.isfinite(result) or result <= 0:
        raise ValueError(f"memory size {text!r} must be positive")
    return int(result)


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


# ----------------------------------------------------------------------------- counting


def parameter_count(cfg) -> dict[str, int]:
    """Parameters of a GPT-NeoX model split into what is a matmul weight and what is not.

    The split matters twice: autocast keeps a bf16 copy of every matmul weight (and bias) for
    the backward pass, and the MFU formula counts only parameters that take part in matmuls.
    """
    h, i, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    linear_per_layer = (3 * h * h + 3 * h) + (h * h + h) + (i * h + i) + (h * i + h)
    norms_per_layer = 4 * h
    embed_in = v * h
    embed_out = v * h
    linear = n * linear_per_layer + embed_out
    linear_weights = n * _block_weights(cfg) + embed_out
    other = n * norms_per_layer + 2 * h + embed_in
    return {
        "linear": linear,
        "linear_weights": linear_weights,
        "other": other,
        "embed_in": embed_in,
        "total": linear + other,
    }


def _block_weights(cfg) -> int:
    h, i = cfg.hidden_size, cfg.intermediate_size
    return 4 * h * h + 2 * h * i


def training_flops_per_token(student_cfg, teacher_cfg, seq_len: int) -> float:
    """FLOPs per trained token: 6N + 12LHT for the student (nanoGPT's MFU formula, N = matmul
    parameters) plus 2N + 4LHT for the teacher's forward pass."""
    s = parameter_count(student_cfg)["linear"]
    flops = 6 * s + 12 * student_cfg.num_layers * student_cfg.hidden_size * seq_len
    if teacher_cfg is not None:
        t = parameter_count(teacher_cfg)["linear"]
        flops += 2 * t + 4 * teacher_cfg.num_layers * teacher_cfg.hidden_size * seq_len
    return float(flops)


def _activation_bytes(precision: str) -> tuple[int, int]:
    """(bytes of matmul-side activations, bytes of the residual stream / LayerNorm inputs).

    Matmuls run in the mode's compute dtype; LayerNorm (fp32 under autocast) and the
    embedding lookup return the weights' dtype, so the residual stream is in the latter.
    """
    weight, _ = precision_dtypes(precision)
    return compute_dtype(precision).itemsize, weight.itemsize


def _layer_saved_tensors(cfg, tokens: int, seq_len: int, precision: str, attention: str):
    """Every tensor one GPT-NeoX block leaves for backward, as (name, bytes).

    Block: y = x + dense(attn(rotary(qkv(ln1(x))))) + fc2(gelu(fc1(ln2(x)))).
    """
    a, r = _activation_bytes(precision)
    h, i, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_heads
    batch = tokens // seq_len
    out = [
        # Both LayerNorms read the same residual input x; mean and rstd per row and norm.
        ("ln input x (shared by ln1/ln2)", r * tokens * h),
        ("ln1/ln2 mean+rstd", 2 * 2 * 4 * tokens),
    ]
    if precision == "bf16-autocast":
        # LayerNorm output is fp32; the bf16 cast feeding each matmul is a fresh saved tensor.
        out.append(("ln1 output (bf16 cast, qkv input)", a * tokens * h))
        out.append(("ln2 output (bf16 cast, fc1 input)", a * tokens * h))
    else:
        out.append(("ln1 output (qkv input)", a * tokens * h))
        out.append(("ln2 output (fc1 input)", a * tokens * h))
    out += [
        # v is a view into the qkv output, so saving v keeps the whole fused buffer alive.
        ("qkv output (kept alive by v)", a * tokens * 3 * h),
        # Rotary builds new q and k: the rotated slice concatenated with the pass-through.
        ("q, k after rotary", 2 * a * tokens * h),
    ]
    out.append(("attention output (saved by SDPA)", a * tokens * h))
    out.append(("attention logsumexp", 4 * batch * heads * seq_len))
    if attention == "math":
        out.append(("attention probabilities [B,heads,T,T]", a * batch * heads * seq_len**2))
    out += [
        # Counted apart from the SDPA output: the transpose+reshape copies on CPU and in the
        # math path. CUDA flash/efficient kernels lay their output out [B,T,heads,hd], so the
        # reshape is a view there and this entry overestimates by one [B,T,H] per layer.
        ("dense input (attention output, heads merged)", a * tokens * h),
        ("fc1 output (GELU input)", a * tokens * i),
        ("GELU output (fc2 input)", a * tokens * i),
    ]
    return out


def activation_breakdown(
    cfg,
    *,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16-autocast",
    activation_checkpointing: bool = False,
    attention: str = "flash",
) -> dict[str, int]:
    """Bytes autograd holds at the start of backward for the student's forward pass
    (logits excluded: they are counted with the loss buffers)."""
    precision_dtypes(precision)  # an unknown mode raises here, naming the known ones
    if attention not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention {attention!r}: choose one of {ATTENTION_IMPLS}")
    tokens = micro_batch * seq_len
    a, r = _activation_bytes(precision)
    h = cfg.hidden_size
    layer = sum(b for _, b in _layer_saved_tensors(cfg, tokens, seq_len, precision, attention))
    head = {
        "input ids (embedding backward)": 8 * tokens,
        "final ln input + mean/rstd": r * tokens * h + 2 * 4 * tokens,
        "final ln output (embed_out input)": a * tokens * h,
    }
    if activation_checkpointing:
        # Each block keeps only its input; backward re-runs one block at a time, so one
        # block's full set of saved tensors exists on top at the peak.
        blocks = {
            "block inputs (checkpointed)": cfg.num_layers * r * tokens * h,
            "one block recomputed in backward": layer,
        }
    else:
        blocks = {f"{cfg.num_layers} blocks x {format_bytes(layer)}": cfg.num_layers * layer}
    return {**blocks, **head}


# ----------------------------------------------------------------------------- the plan


@dataclass
class MemoryPlan:
    """Predicted device memory of one distillation micro-step, component by component."""

    micro_batch: int
    seq_len: int
    precision: str
    activation_checkpointing: bool
    components: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    flops_per_token: float = 0.0

    @property
    def allocated_peak(self) -> int:
        """What torch.cuda.max_memory_allocated should report (no context, no slack)."""
        return sum(b for k, b in self.components.items() if self.groups[k] != "overhead")

    @property
    def total(self) -> int:
        """What the card must hold: allocated peak + allocator slack + CUDA context."""
        return sum(self.components.values())

    def fits(self, budget_bytes: int) -> bool:
        return self.total <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "activation_checkpointing": self.activation_checkpointing,
            "components": dict(self.components),
            "groups": dict(self.groups),
            "allocated_peak_bytes": self.allocated_peak,
            "total_bytes": self.total,
            "flops_per_token": self.flops_per_token,
        }

    def table(self, budget_bytes: int | None = None) -> str:
        width = max(len(k) for k in self.components) + 2
        lines = [
            f"memory plan: micro_batch={self.micro_batch} seq_len={self.seq_len} "
            f"precision={self.precision} activation_checkpointing={self.activation_checkpointing}",
            f"{'component':<{width}}{'group':<12}{'bytes':>16}{'':>3}{'size':>12}",
            "-" * (width + 43),
        ]
        for name, nbytes in self.components.items():
            lines.append(
                f"{name:<{width}}{self.groups[name]:<12}{nbytes:>16,}{'':>3}{format_bytes(nbytes):>12}"
            )
        lines.append("-" * (width + 43))
        lines.append(
            f"{'allocated peak (torch max_memory_allocated)':<{width + 12}}"
            f"{self.allocated_peak:>16,}{'':>3}{format_bytes(self.allocated_peak):>12}"
        )
        total = format_bytes(self.total)
        lines.append(f"{'total on the card':<{width + 12}}{self.total:>16,}{'':>3}{total:>12}")
        if budget_bytes is not None:
            verdict = "fits" if self.fits(budget_bytes) else "DOES NOT FIT"
            lines.append(f"budget {format_bytes(budget_bytes)}: {verdict}")
        return "\n".join(lines)


def _student_state(cfg, precision: str, activation_checkpointing: bool) -> list[tuple[str, int]]:
    """Weights, gradients and AdamW moments of the trained student, as (name, bytes)."""
    counts = parameter_count(cfg)
    n = counts["total"]
    if precision == "bf16-autocast":
        # Autocast's bf16 copy of each matmul weight is saved for the input gradient, so it
        # lives until backward; the bias copies are dropped when the forward's autocast exits.
        # With checkpointing only embed_out's copy and the re-run block's copies exist at once.
        cast = counts["linear_weights"]
        if activation_checkpointing:
            cast = cfg.vocab_size * cfg.hidden_size + _block_weights(cfg)
        return [
            ("student weights (fp32 master)", 4 * n),
            ("student bf16 weight casts (autocast)", 2 * cast),
            ("student gradients (fp32)", 4 * n),
            ("AdamW moments m, v (fp32)", 8 * n),
        ]
    if precision == "bf16-pure":
        return [
            ("student weights (bf16, no master)", 2 * n),
            ("student gradients (bf16)", 2 * n),
            ("AdamW moments m, v (bf16)", 4 * n),
        ]
    return [
        ("student weights (fp32)", 4 * n),
        ("student gradients (fp32)", 4 * n),
        ("AdamW moments m, v (fp32)", 8 * n),
    ]


def plan_memory(
    teacher_cfg,
    student_cfg,
    *,
    micro_batch: int,
    seq_len: int,
    precision: str = "bf16-autocast",
    activation_checkpointing: bool = False,
    teacher_dtype_bytes: int | None = None,
    in_place_loss_gradient: bool = True,
    attention: str = "flash",
) -> MemoryPlan:
    """Predict the peak of one micro-step: the start of the student's backward pass.

    teacher_cfg may be None (plain CE training). The teacher is held in bf16 unless
    precision is "fp32". `in_place_loss_gradient` says the kd kernel writes dL/dlogits into
    the student's logits buffer (the Triton path); without it a separate buffer appears.
    """
    precision_dtypes(precision)  # an unknown mode raises here, naming the known ones
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch}, {seq_len}")
    tokens = micro_batch * seq_len
    plan = MemoryPlan(micro_batch, seq_len, precision, activation_checkpointing)

    def add(name: str, nbytes: int, group: str) -> None:
        plan.components[name] = int(nbytes)
        plan.groups[name] = group

    for name, nbytes in _student_state(student_cfg, precision, activation_checkpointing):
        add(name, nbytes, "student")

    logit_bytes = compute_dtype(precision).itemsize
    if teacher_cfg is not None:
        tb = teacher_dtype_bytes or logit_bytes
        add(f"teacher weights ({'bf16' if tb == 2 else 'fp32'}, frozen)",
            tb * parameter_count(teacher_cfg)["total"], "teacher")
        add("teacher logits [B,T,V]", tb * tokens * teacher_cfg.vocab_size, "loss")

    for name, nbytes in activation_breakdown(
        student_cfg,
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=precision,
        activation_checkpointing=activation_checkpointing,
        attention=attention,
    ).items():
        add(f"activations: {name}", nbytes, "activations")

    v = student_cfg.vocab_size
    add("student logits [B,T,V]", logit_bytes * tokens * v, "loss")
    if not in_place_loss_gradient:
        add("logits gradient buffer [B,T,V]", logit_bytes * tokens * v, "loss")
    # embed_out backward: a [V,H] weight gradient in the compute dtype before it is added to
    # the fp32 .grad, and the [B,T,H] input gradient.
    add("embed_out backward transients",
        logit_bytes * v * student_cfg.hidden_size + logit_bytes * tokens * student_cfg.hidden_size,
        "loss")

    allocated = plan.allocated_peak
    add("allocator slack (fragmentation)", int(ALLOCATOR_SLACK_FRACTION * allocated), "overhead")
    add("CUDA context + library handles", CUDA_CONTEXT_BYTES, "overhead")
    plan.flops_per_token = training_flops_per_token(student_cfg, teacher_cfg, seq_len)
    return plan


def largest_micro_batch(
    teacher_cfg,
    student_cfg,
    *,
    seq_len: int,
    budget_bytes: int,
    planner=None,
    **plan_kwargs,
) -> int:
    """The largest micro-batch whose plan fits the budget (0 when not even one sequence does).
    `plan_kwargs` are the planner's (plan_memory, or engine.sharded_memory's per-GPU plan
    under FSDP): precision, activation_checkpointing, ...

    The plan grows strictly with the micro-batch, so a doubling search then bisection finds it.
    """
    planner = planner or plan_memory

    def fits(mb: int) -> bool:
        plan = planner(
            teacher_cfg, student_cfg, micro_batch=mb, seq_len=seq_len, **plan_kwargs
        )
        return plan.fits(budget_bytes)

    if not fits(1):
        return 0
    low, high = 1, 2
    while fits(high):
        low, high = high, high * 2
        if high > 2**24:
            raise ValueError(f"budget {budget_bytes} bytes is implausibly large")
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
