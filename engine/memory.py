"""A byte-level memory plan for one distillation step, so the 12 GiB question has an answer
before a GPU is rented.

The plan counts what the CUDA caching allocator holds at the peak of a micro-step: everything
persistent (student weights, gradients, optimizer moments, the frozen teacher), every
activation autograd saved during the student's forward, and the loss's own buffers at its
worst moment. Activations are counted tensor by tensor for our GPT-NeoX block (see
`_layer_saved_tensors`), which the tests compare with torch's own saved tensors on a small
model. Where the peak is depends on the loss:

  * fused head (loss.fused_head, the default): both LM heads run inside the loss, chunk by
    chunk (engine.kernels.kd_head). The peak is during its forward, at the last chunk: two
    [chunk x vocab] logit blocks, d hidden, the fp32 d weight accumulator and, under
    autocast, the bf16 casts of the hidden states and the head weight. No [tokens x vocab]
    tensor. (With very many tokens per micro-batch the last block's backward can exceed
    that; the plan takes the larger of the two.)
  * full logits: the start of the student's backward, with both models' [tokens x vocab]
    logits alive and the head's backward transients on top.

With on-policy distillation (onpolicy.fraction > 0) the student first samples its
completions (engine/sampling.py), before the step's forward, so the sampler's memory never
meets the step's activations and loss buffers: the plan lists it as its own group
("sampling": the student's KV cache, the larger of the prompt's prefill and a decode step's
working set and, under autocast, the bf16 weight casts the sampler keeps) and its allocated
peak is the larger of the step's peak and the sampling phase's (what persists: weights,
gradients, optimizer moments, the teacher; plus the sampler).

CUDA context and allocator slack are added on top because the user's card has to hold them
too, although `torch.cuda.max_memory_allocated` never sees them.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any

import torch

from engine.kernels.divergences import rows_per_chunk
from engine.kernels.kd_head import head_chunk_tokens
from engine.precision import compute_dtype, precision_dtypes

ATTENTION_IMPLS = ("flash", "math")
RECOMPUTED = "one block recomputed in backward"  # activation checkpointing's extra block

# Device memory a training process holds outside the caching allocator (CUDA context, cuBLAS
# / cuDNN handles, loaded kernels): the GPU suite's reading for one process (total minus free
# minus reserved; torch 2.11 + CUDA 13 on the H200), rounded up (benchmarks/README.md).
CUDA_CONTEXT_BYTES = 800 * 2**20
# The fraction the allocator holds beyond the allocated peak (fragmentation, block rounding).
# The engine turns on expandable segments on CUDA (engine.train.loop.run), which returns most
# of it; the GPU suite measures reserved / allocated for every configuration it runs.
ALLOCATOR_SLACK_FRACTION = 0.10
# Allocated on CUDA beside the tensors the plan itemises: cuBLAS workspaces (32 MiB per handle
# on Hopper) and small buffers: the mean remainder of the H200 seed step (allocated peak minus
# every itemised tensor, micro-batch 2 to 12; benchmarks/README.md).
CUDA_WORKSPACE_BYTES = 40 * 2**20
# The groups alive while the on-policy sampler runs (what persists, and the sampler's own);
# the autocast casts of the step are not (the sampler makes and keeps its own).
SAMPLING = "sampling"
SAMPLING_PHASE_GROUPS = ("student", "teacher", SAMPLING)
STUDENT_CASTS = "student bf16 weight casts (autocast)"
CUDA_WORKSPACE = "cuBLAS workspaces and small buffers"
# fp32 [rows x vocab] temporaries the CPU loss path (engine.kernels.divergences) holds at once for
# one row block, with the forward KL (measured through the allocation tracker of the tests).
TORCH_LOSS_TEMPORARIES = 5

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
    fused_head: bool = False,
) -> dict[str, int]:
    """Bytes autograd holds at the start of backward for the student's forward pass
    (logits excluded: they are counted with the loss buffers). The head's input is saved by
    F.linear (its matmul-dtype cast) or, with the fused head, by the loss (the final
    LayerNorm's output itself)."""
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
    }
    if fused_head:
        head["final ln output (saved by the fused head)"] = r * tokens * h
    else:
        head["final ln output (embed_out input)"] = a * tokens * h
    if activation_checkpointing:
        # Each block keeps only its input; backward re-runs one block at a time, so one
        # block's full set of saved tensors exists on top at the peak.
        blocks = {
            "block inputs (checkpointed)": cfg.num_layers * r * tokens * h,
            RECOMPUTED: layer,
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
    fused_head: bool = True
    components: dict[str, int] = field(default_factory=dict)
    groups: dict[str, str] = field(default_factory=dict)
    flops_per_token: float = 0.0

    @property
    def step_peak(self) -> int:
        """The training micro-step's allocated peak (everything but overhead and sampling)."""
        return sum(b for k, b in self.components.items()
                   if self.groups[k] not in ("overhead", SAMPLING))

    @property
    def sampling_peak(self) -> int:
        """The on-policy sampling phase's allocated peak (0 without on-policy sampling): what
        persists between steps, the sampler's own memory and the cuBLAS workspaces."""
        if SAMPLING not in self.groups.values():
            return 0
        return sum(b for k, b in self.components.items()
                   if (self.groups[k] in SAMPLING_PHASE_GROUPS and k != STUDENT_CASTS)
                   or k == CUDA_WORKSPACE)

    @property
    def allocated_peak(self) -> int:
        """What torch.cuda.max_memory_allocated should report (no context, no slack): the
        larger of the step's peak and the sampling phase's."""
        return max(self.step_peak, self.sampling_peak)

    @property
    def total(self) -> int:
        """What the card must hold: allocated peak + allocator slack + CUDA context."""
        return self.allocated_peak + sum(b for k, b in self.components.items()
                                         if self.groups[k] == "overhead")

    def add(self, name: str, nbytes: int, group: str) -> None:
        self.components[name] = int(nbytes)
        self.groups[name] = group

    def add_card_overhead(self) -> None:
        """The CUDA allocator's slack on the allocated peak so far, and the CUDA context."""
        self.add("allocator slack (fragmentation)",
                 int(ALLOCATOR_SLACK_FRACTION * self.allocated_peak), "overhead")
        self.add("CUDA context + library handles", CUDA_CONTEXT_BYTES, "overhead")

    def fits(self, budget_bytes: int) -> bool:
        return self.total <= budget_bytes

    def to_dict(self) -> dict[str, Any]:
        return {
            "micro_batch": self.micro_batch,
            "seq_len": self.seq_len,
            "precision": self.precision,
            "activation_checkpointing": self.activation_checkpointing,
            "fused_head": self.fused_head,
            "components": dict(self.components),
            "groups": dict(self.groups),
            "allocated_peak_bytes": self.allocated_peak,
            "total_bytes": self.total,
            "flops_per_token": self.flops_per_token,
            **({"step_peak_bytes": self.step_peak, "sampling_peak_bytes": self.sampling_peak}
               if self.sampling_peak else {}),
        }

    def table(self, budget_bytes: int | None = None) -> str:
        width = max(len(k) for k in self.components) + 2
        lines = [
            f"memory plan: micro_batch={self.micro_batch} seq_len={self.seq_len} "
            f"precision={self.precision} activation_checkpointing={self.activation_checkpointing} "
            f"fused_head={self.fused_head}",
            f"{'component':<{width}}{'group':<12}{'bytes':>16}{'':>3}{'size':>12}",
            "-" * (width + 43),
        ]
        for name, nbytes in self.components.items():
            lines.append(
                f"{name:<{width}}{self.groups[name]:<12}{nbytes:>16,}{'':>3}{format_bytes(nbytes):>12}"
            )
        lines.append("-" * (width + 43))
        if self.sampling_peak:
            for label, nbytes in (("training step peak", self.step_peak),
                                  ("on-policy sampling peak (persistent + sampling)",
                                   self.sampling_peak)):
                lines.append(f"{label:<{width + 12}}{nbytes:>16,}{'':>3}"
                             f"{format_bytes(nbytes):>12}")
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


def _student_state(cfg, precision: str, activation_checkpointing: bool,
                   fused_head: bool) -> list[tuple[str, int]]:
    """Weights, gradients and AdamW moments of the trained student, as (name, bytes)."""
    counts = parameter_count(cfg)
    n = counts["total"]
    if precision == "bf16-autocast":
        # Autocast's bf16 copy of each matmul weight is saved for the input gradient, so it
        # lives until backward; the bias copies are dropped when the forward's autocast exits.
        # With checkpointing only the re-run block's copies (and embed_out's) exist at once.
        # The fused head casts embed_out itself, for its forward only (a loss buffer).
        head = 0 if fused_head else cfg.vocab_size * cfg.hidden_size
        blocks = 1 if activation_checkpointing else cfg.num_layers
        cast = head + blocks * _block_weights(cfg)
        return [
            ("student weights (fp32 master)", 4 * n),
            (STUDENT_CASTS, 2 * cast),
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


@dataclass(frozen=True)
class _Widths:
    """Element sizes of one configuration: matmul (a), weight / residual (r), teacher (t)."""

    a: int
    r: int
    t: int
    autocast: bool


def _widths(precision: str, teacher_dtype_bytes: int | None) -> _Widths:
    a, r = _activation_bytes(precision)
    autocast = precision_dtypes(precision)[1] is not None
    return _Widths(a, r, teacher_dtype_bytes or a, autocast)


def _logits_buffers(teacher_cfg, student_cfg, tokens: int, w: _Widths,
                    in_place_loss_gradient: bool) -> list[tuple[str, int]]:
    """Loss buffers at the start of backward with full logits (loss.fused_head = false)."""
    v, h = student_cfg.vocab_size, student_cfg.hidden_size
    out = []
    if teacher_cfg is not None:
        out.append(("teacher logits [B,T,V]", w.t * tokens * teacher_cfg.vocab_size))
    out.append(("student logits [B,T,V]", w.a * tokens * v))
    if not in_place_loss_gradient:
        out.append(("logits gradient buffer [B,T,V]", w.a * tokens * v))
    # embed_out backward: a [V,H] weight gradient in the compute dtype before it is added to
    # the .grad, and the [B,T,H] input gradient; under autocast that weight gradient is also
    # cast to fp32 for the fp32 .grad (the H200-measured offset, benchmarks/README.md).
    out.append(("embed_out backward transients", w.a * v * h + w.a * tokens * h))
    if w.autocast:
        out.append(("embed_out weight gradient cast to fp32 [V,H]", 4 * v * h))
    return out


def _fused_head_buffers(teacher_cfg, student_cfg, tokens: int, w: _Widths,
                        chunk: int) -> list[tuple[str, int]]:
    """The fused head's buffers at its forward's last chunk (engine/kernels/kd_head.py)."""
    v, h = student_cfg.vocab_size, student_cfg.hidden_size
    out = [("fused head: student logit block [chunk,V]", w.a * chunk * v),
           ("fused head: d hidden [B,T,H]", w.r * tokens * h)]
    if _accumulates(tokens, w, chunk):
        # CUDA adds each chunk's bf16 product into it in fp32 (no copy); the CPU's upcast
        # operands are counted with its loss scratch (_cpu_head_scratch).
        out.append(("fused head: d weight accumulator [V,H] fp32", 4 * v * h))
    else:  # one chunk in the weight's dtype: its product is d weight
        out.append(("fused head: d weight [V,H] (the one chunk's product)", w.a * v * h))
    if w.r != w.a:  # autocast: the head runs on bf16 casts, as F.linear would
        out += [("fused head: hidden states cast [B,T,H]", w.a * tokens * h),
                ("fused head: head weight cast [V,H]", w.a * v * h),
                ("fused head: one chunk's d hidden product", w.a * chunk * h)]
    if teacher_cfg is not None:
        t_matmul = w.a if w.autocast else w.t
        out.append(("fused head: teacher logit block [chunk,V]", t_matmul * chunk * v))
        t_hidden = _teacher_hidden_bytes(w)
        if t_hidden != t_matmul:
            ht = teacher_cfg.hidden_size
            out.append(("fused head: teacher casts [B,T,Ht] + [V,Ht]",
                        t_matmul * (tokens + v) * ht))
    return out


def _accumulates(tokens: int, w: _Widths, chunk: int) -> bool:
    """Whether the fused head sums d weight in an fp32 accumulator (not one chunk's product)."""
    return chunk < tokens or w.r != w.a


def _cpu_head_scratch(student_cfg, tokens: int, w: _Widths, chunk: int) -> tuple[str, int]:
    """The larger of two CPU transients that never coexist: the loss path's row-block scratch
    and, with bf16 matmuls and an accumulator, one chunk's d weight operands cast to fp32."""
    name, scratch = _cpu_loss_scratch(student_cfg.vocab_size, chunk)
    upcast = 0
    if w.a != 4 and _accumulates(tokens, w, chunk):
        upcast = 4 * chunk * (student_cfg.vocab_size + student_cfg.hidden_size)
    if upcast > scratch:
        return "fused head: one chunk's d weight operands cast to fp32 (CPU)", upcast
    return name, scratch


def _teacher_hidden_bytes(w: _Widths) -> int:
    """A teacher stored in the autocast dtype runs without autocast (engine.train.step); any
    other teacher under autocast ends in an fp32 LayerNorm output."""
    return 4 if w.autocast and w.t != w.a else w.t


def kv_cache_bytes(cfg, micro_batch: int, positions: int, precision: str) -> int:
    """The sampler's KV cache: keys and values of every layer for micro_batch rows of
    `positions` (prompt + new tokens), in the dtype of the weights the sampler reads
    (GPTNeoX.new_kv_cache: fp32 under bf16-autocast, whose weights are fp32 masters)."""
    weight, _ = precision_dtypes(precision)
    return 2 * cfg.num_layers * micro_batch * positions * cfg.hidden_size * weight.itemsize


def sampler_components(cfg, *, micro_batch: int, prompt_tokens: int, new_tokens: int,
                       precision: str) -> list[tuple[str, int]]:
    """What the on-policy sampler holds on top of what persists, at its peak, as (name,
    bytes): the KV cache; the larger of two working sets that never coexist, one block's
    prefill over the prompt (no autograd: the MLP's [B,P,4H + 2I] or the attention's [B,P,9H]
    transients; under autocast the block's fp32 LayerNorm output too) and a decode step (its
    [B,V] logits with their fp32 scaled copy and softmax, plus under autocast the head
    weight's bf16 cast); under autocast, the bf16 casts of every block's weights and biases,
    which autocast caches for the whole sampling (the prefill's transients peak before the
    last block's are made). Top-k / top-p cuts add [B,V] sorts on top. On the CPU an fp32
    sampler also makes oneDNN-packed copies of the weights (engine.model.network
    .PackedLinears), which this GPU plan leaves out.
    Checked on the CPU against every tensor `sample` allocates (tests/engine/test_memory.py:
    within 3%; up to 9% over where a decode step sets the peak under autocast)."""
    if prompt_tokens < 1 or new_tokens < 1:
        raise ValueError(f"onpolicy: prompt_tokens and new_tokens must be >= 1, got "
                         f"{prompt_tokens}, {new_tokens}")
    a, _ = _activation_bytes(precision)
    autocast = precision_dtypes(precision)[1] is not None
    h, i, v, b = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, micro_batch
    positions = prompt_tokens + new_tokens
    prefill = b * prompt_tokens * (max(4 * h + 2 * i, 9 * h) * a + (4 * h if autocast else 0))
    decode = b * v * (a + 8) + (a * v * h if autocast else 0)
    block_casts = 2 * (_block_weights(cfg) + 5 * h + i) if autocast else 0
    if cfg.num_layers > 1:
        # The last block of the prefill runs its attention and MLP on the last position only,
        # so the whole-prompt transients peak in the block before it, while the last block's
        # casts are not made yet.
        prefill -= block_casts
    out = [(f"sampler: student KV cache [2 x L x B x {positions} x H]",
            kv_cache_bytes(cfg, micro_batch, positions, precision)),
           ("sampler: prefill over the prompt or a decode step's logits (the larger)",
            max(prefill, decode))]
    if autocast:
        out.append(("sampler: bf16 casts of every block (autocast keeps them)",
                    cfg.num_layers * block_casts))
    return out


def _block_backward_bytes(cfg, tokens: int, w: _Widths) -> int:
    """Working set of the last block's backward beyond the saved activations: the residual
    stream's gradient twice and the MLP's two [tokens x intermediate] gradients."""
    return 2 * w.r * tokens * cfg.hidden_size + 2 * w.a * tokens * cfg.intermediate_size


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
    fused_head: bool = True,
    chunk_tokens: int | None = None,
    device_type: str = "cuda",
    teacher_cache_width: int = 0,
    onpolicy: tuple[int, int] | None = None,
) -> MemoryPlan:
    """Predict the peak of one micro-step (see the module docstring for where it is).

    teacher_cfg may be None (plain CE training). The teacher is held in the compute dtype
    unless `teacher_dtype_bytes` says otherwise (teacher.dtype). `in_place_loss_gradient`
    (full logits only) says the kd kernel writes dL/dlogits into the student's logits buffer.
    `chunk_tokens` is the fused head's chunk (default: its rule for `device_type`). On "cuda"
    the cuBLAS workspaces, the CUDA context and the allocator's slack count; on "cpu" the CPU
    loss path's scratch does (the tests check the plan there against every tensor a step
    allocates). `teacher_cache_width` > 0: the teacher signal is a teacher cache of that many
    entries per position (teacher.cache): no teacher forward, no teacher hidden states or
    logits, the batch's cached targets instead; a teacher_cfg beside it (teacher.path, kept
    for the held-out KD) only holds its weights. `onpolicy` = (prompt_tokens, new_tokens):
    the student samples before the step (onpolicy.fraction > 0); its sampler's memory is the
    "sampling" group, and the peak the larger of the two phases (module docstring).
    """
    precision_dtypes(precision)  # an unknown mode raises here, naming the known ones
    if micro_batch < 1 or seq_len < 1:
        raise ValueError(f"micro_batch and seq_len must be >= 1, got {micro_batch}, {seq_len}")
    tokens = micro_batch * seq_len
    plan = MemoryPlan(micro_batch, seq_len, precision, activation_checkpointing, fused_head)
    w = _widths(precision, teacher_dtype_bytes)
    add = plan.add
    for name, nbytes in _student_state(student_cfg, precision, activation_checkpointing,
                                       fused_head):
        add(name, nbytes, "student")
    step_teacher = None if teacher_cache_width else teacher_cfg  # what the step runs
    if teacher_cache_width:
        add(f"teacher cache targets [B,T,{teacher_cache_width}] (ids, masses) + [B,T] x 3",
            tokens * (8 * teacher_cache_width + 12), "loss")
    if teacher_cfg is not None:
        add(f"teacher weights ({'bf16' if w.t == 2 else 'fp32'}, frozen)",
            w.t * parameter_count(teacher_cfg)["total"], "teacher")
    activations = activation_breakdown(
        student_cfg, micro_batch=micro_batch, seq_len=seq_len, precision=precision,
        activation_checkpointing=activation_checkpointing, attention=attention,
        fused_head=fused_head,
    )
    # With the fused head the peak is in the forward, before any block is recomputed: the
    # recomputed block belongs to the backward alternative.
    recomputed = activations.pop(RECOMPUTED, 0) if fused_head else 0
    for name, nbytes in activations.items():
        add(f"activations: {name}", nbytes, "activations")
    if fused_head:
        _add_fused_head(add, step_teacher, student_cfg, tokens, w, chunk_tokens, device_type,
                        recomputed)
    else:
        for name, nbytes in _logits_buffers(step_teacher, student_cfg, tokens, w,
                                            in_place_loss_gradient):
            add(name, nbytes, "loss")
        if device_type != "cuda":
            add(*_cpu_loss_scratch(student_cfg.vocab_size, tokens), "loss")
    if onpolicy is not None:
        for name, nbytes in sampler_components(student_cfg, micro_batch=micro_batch,
                                               prompt_tokens=onpolicy[0],
                                               new_tokens=onpolicy[1], precision=precision):
            add(name, nbytes, SAMPLING)
    if device_type == "cuda":
        add(CUDA_WORKSPACE, CUDA_WORKSPACE_BYTES, "loss")
        plan.add_card_overhead()
    plan.flops_per_token = training_flops_per_token(student_cfg, step_teacher, seq_len)
    return plan


def _cpu_loss_scratch(vocab: int, rows: int) -> tuple[str, int]:
    """The CPU loss path's fp32 temporaries for one row block of at most `rows` rows."""
    rows = min(rows_per_chunk(vocab), rows)
    return "CPU loss path scratch (fp32 row block)", TORCH_LOSS_TEMPORARIES * 4 * rows * vocab


def _add_fused_head(add, teacher_cfg, student_cfg, tokens, w, chunk_tokens, device_type,
                    recomputed: int) -> None:
    """The fused head's buffers, or the last block's backward (with `recomputed` bytes of a
    checkpointed block) where that is larger."""
    if teacher_cfg is not None:
        add("teacher hidden states [B,T,Ht]",
            _teacher_hidden_bytes(w) * tokens * teacher_cfg.hidden_size, "loss")
    chunk = head_chunk_tokens(tokens, student_cfg.vocab_size, teacher_cfg is not None, w.a,
                              torch.device(device_type), chunk_tokens)
    buffers = _fused_head_buffers(teacher_cfg, student_cfg, tokens, w, chunk)
    if device_type != "cuda":
        buffers.append(_cpu_head_scratch(student_cfg, tokens, w, chunk))
    backward = _block_backward_bytes(student_cfg, tokens, w) + recomputed
    if backward > sum(b for _, b in buffers):
        buffers = [("last block's backward (recomputed block + working set; larger than "
                    "the fused head's)", backward)]
    for name, nbytes in buffers:
        add(name, nbytes, "loss")


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
            raise ValueError(f"budget {budget_bytes:.3g} bytes is implausibly large (more "
                             f"than {2**24} sequences per micro-batch fit; give the card's "
                             "memory, e.g. 80GiB)")
    while high - low > 1:
        mid = (low + high) // 2
        if fits(mid):
            low = mid
        else:
            high = mid
    return low
