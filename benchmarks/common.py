"""What several benchmark scripts share: baselines, model builders, batches, measurements.

No benchmark script imports another one; whatever two of them need lives here, once:
  - the naive KD + CE composite (the baseline every loss comparison is made against);
  - model shapes and builders for our GPTNeoX and transformers' GPTNeoXForCausalLM;
  - token batches, the distillation micro-step of each engine;
  - the kernel's correctness and speed measurements (benchmarks.kd_loss and the GPU suite),
    per divergence too; the fused head + loss, its unfused form, its four matmuls alone and
    Liger-Kernel's LigerFusedLinearJSDLoss as timed callables;
  - devices, timing, process memory, JSON results.
Benchmarks run from the checkout (`python -m benchmarks.x` in the repository root).
"""

from __future__ import annotations

import dataclasses
import gc
import itertools
import json
import os
import platform
import statistics
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch

from engine.data.atomic import write_json_atomic
from engine.data.loader import build_dataset
from engine.data.shards import ShardWriter
from engine.data.teacher_cache import TARGET_KEYS, TeacherCache
from engine.data.teacher_cache_encode import (
    record_dtype,
    sampled_entries,
    sampled_targets,
    targets_from_records,
    teacher_log_probs,
    top_k_entries,
    top_k_targets,
)
from engine.eval.heldout import heldout_batches, heldout_loader
from engine.eval.scoring import heldout_metrics
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.divergences import DIVERGENCES
from engine.kernels.kd_head import kd_head_loss
from engine.kernels.kd_loss import kd_loss, kd_loss_reference
from engine.kernels.loss_spec import LossSpec
from engine.kernels.sparse_kd import sparse_kd_loss, sparse_kd_reference
from engine.kernels.sparse_kd_head import sparse_kd_head_loss
from engine.kernels.sparse_targets import SparseTargets
from engine.metrics import read_records
from engine.model.config import PYTHIA_COMMON, PYTHIA_SHAPES, GPTNeoXConfig
from engine.model.hf_io import load_pretrained, save_pretrained
from engine.model.network import GPTNeoX
from engine.precision import DTYPES, dtype_of
from engine.quickstart import pipeline as quickstart
from engine.teacher_cache import build_teacher_cache
from engine.train.step import distill_micro_step
from engine.train.teacher_signal import LiveTeacher

REPO_ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
ALPHA, TEMPERATURE = 0.5, 2.0
VALID_VOCAB_PAD = 27  # Pythia: 50304 logit columns, 50277 real token ids
KERNEL_DTYPES = {name: DTYPES[name] for name in ("fp32", "bf16")}  # what the kernel is timed in

# Small but structurally complete shapes for smoke runs (partial rotary, several heads).
TINY_SHAPES = {
    "tiny-teacher": dict(hidden_size=128, num_layers=2, num_heads=4, intermediate_size=512),
    "tiny-student": dict(hidden_size=64, num_layers=2, num_heads=4, intermediate_size=256),
}

# The GPU suite's sizes (also the step profiler's): (teacher, student) shapes, vocab, seq_len,
# micro-batch, warm-up and timed micro-steps, micro-steps per optimizer step, kernel-speed
# token counts, repeats of the per-divergence and fused-head timings, the fused head's chunk
# sweep, micro-batch search limit and time bound, the capped worker's time limit.
FULL = dict(teacher="pythia-160m", student="pythia-70m", vocab=50304, valid_vocab=50277,
            seq_len=2048, micro_batch=2, warmup=4, steps=20, accum=4, speed_tokens=(4096, 16384),
            div_repeats=20, head_repeats=20, head_chunks=(1024, 2048, 4096),
            search_max_mb=64, search_seconds=90, worker_timeout=170)
SMOKE = dict(teacher="tiny-teacher", student="tiny-student", vocab=1000, valid_vocab=987,
             seq_len=64, micro_batch=2, warmup=2, steps=4, accum=2, speed_tokens=(4096,),
             div_repeats=1, head_repeats=1, head_chunks=(16, 32),
             search_max_mb=4, search_seconds=20, worker_timeout=120)


# ----------------------------------------------------------------------------- the baseline


def naive_kd_loss(student, teacher, labels, *, alpha=ALPHA, temperature=TEMPERATURE,
                  valid_vocab=None, ignore_index=IGNORE_INDEX):
    """The composite most code writes: fp32 log-softmaxes, kl_div, cross_entropy, autograd.

    student/teacher [N, V] logits, labels [N]; mean over the valid tokens."""
    vv = valid_vocab or student.shape[-1]
    s = student[:, :vv].float()
    t = teacher[:, :vv].float()
    valid = labels != ignore_index
    log_ps = torch.log_softmax(s / temperature, dim=-1)
    log_pt = torch.log_softmax(t / temperature, dim=-1)
    kd = torch.nn.functional.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    ce = torch.nn.functional.cross_entropy(s, labels, reduction="none",
                                           ignore_index=ignore_index)
    token = (1 - alpha) * temperature**2 * kd * valid + alpha * ce
    return token.sum() / valid.sum().clamp_min(1)


# ----------------------------------------------------------------------------- models


def model_config(name: str, *, vocab: int = 50304, max_positions: int = 2048) -> GPTNeoXConfig:
    """A Pythia size ("pythia-70m", ...) or a tiny smoke shape, with this vocab and context."""
    shape = PYTHIA_SHAPES.get(name) or TINY_SHAPES[name]
    return GPTNeoXConfig(**{**PYTHIA_COMMON, **shape, "vocab_size": vocab,
                            "max_positions": max_positions})


def build_ours(name: str, vocab: int, max_positions: int, device, seed: int) -> GPTNeoX:
    """Our GPTNeoX of a named shape with random weights (fp32, on `device`)."""
    torch.manual_seed(seed)
    return GPTNeoX(model_config(name, vocab=vocab, max_positions=max_positions)).to(device)


def build_transformers(name: str, vocab: int, max_positions: int, device, seed: int):
    """transformers' GPTNeoXForCausalLM of the same shape, configured from our config.json."""
    from transformers import GPTNeoXConfig as HFConfig
    from transformers import GPTNeoXForCausalLM

    config = model_config(name, vocab=vocab, max_positions=max_positions)
    torch.manual_seed(seed)
    return GPTNeoXForCausalLM(HFConfig.from_dict(config.to_hf_dict())).to(device)


def build_pair(builder, sizes: dict, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(frozen bf16 teacher in eval mode, fp32 student in train mode) of the sizes' shapes."""
    max_positions = max(sizes["seq_len"], 2048 if sizes["student"] in PYTHIA_SHAPES else 0)
    teacher = builder(sizes["teacher"], sizes["vocab"], max_positions, device, seed=1)
    teacher = teacher.to(dtype=torch.bfloat16).eval()
    teacher.requires_grad_(False)
    student = builder(sizes["student"], sizes["vocab"], max_positions, device, seed=0)
    return teacher, student.to(dtype=torch.float32).train()


# ----------------------------------------------------------------------------- batches, steps


def make_batch(micro_batch: int, seq_len: int, valid_vocab: int, device="cpu", seed: int = 0,
               *, ignored_prefix: int = 0) -> dict[str, torch.Tensor]:
    """Random tokens, packed-style (labels = inputs shifted by one), on the device; the first
    `ignored_prefix` targets of row 0 are ignored, as padding would make them."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, valid_vocab, (micro_batch, seq_len + 1), generator=gen)
    labels = tokens[:, 1:].clone()
    labels[0, :ignored_prefix] = IGNORE_INDEX
    return {"input_ids": tokens[:, :-1].to(device), "labels": labels.to(device)}


def ours_micro_step(student, teacher, batch, valid_vocab, normalizer, *,
                    autocast_dtype=torch.bfloat16, fused_head=True):
    """Our micro-step (engine.train.step.distill_micro_step), under bf16 autocast by default;
    fused_head=False is the full-logits path (loss.fused_head = false)."""
    signal = LiveTeacher(teacher) if isinstance(teacher, torch.nn.Module) else teacher
    spec = LossSpec(alpha=ALPHA, temperature=TEMPERATURE, valid_vocab=valid_vocab,
                    fused_head=fused_head)
    return distill_micro_step(student, signal, batch, spec, normalizer=normalizer,
                              autocast_dtype=autocast_dtype)


def logits_micro_step(student, teacher, batch, valid_vocab, normalizer, **kwargs):
    """Our micro-step with full logits and kd_loss (loss.fused_head = false)."""
    return ours_micro_step(student, teacher, batch, valid_vocab, normalizer, fused_head=False,
                           **kwargs)


def transformers_micro_step(student, teacher, batch, valid_vocab, normalizer,
                            autocast_dtype=torch.bfloat16):
    """The step as one writes it with stock parts: HF models, full-vocab fp32 softmaxes.

    `normalizer` is unused: the naive loss is a mean over each micro-batch's valid tokens."""
    device_type = batch["input_ids"].device.type
    with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype,
                                         enabled=autocast_dtype is not None):
        t_logits = teacher(input_ids=batch["input_ids"]).logits
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        s_logits = student(input_ids=batch["input_ids"]).logits
    vocab = s_logits.shape[-1]
    loss = naive_kd_loss(s_logits.reshape(-1, vocab), t_logits.reshape(-1, vocab),
                         batch["labels"].reshape(-1), valid_vocab=valid_vocab)
    loss.backward()
    return {"loss": loss.detach()}


def random_top_k_batch(batch: dict, width: int, valid_vocab: int, seed: int = 0) -> dict:
    """`batch` plus top-k targets of a random teacher, as a teacher cache hands them to the
    loader (engine.data.teacher_cache.CachedTargets), on the batch's device."""
    gen = torch.Generator().manual_seed(seed)
    shape, n = batch["labels"].shape, batch["labels"].numel()
    records = np.zeros(n, dtype=record_dtype(width, "uint16", "float16"))
    ids = torch.rand(n, valid_vocab, generator=gen).topk(width, dim=-1).indices.sort(-1).values
    log_p = torch.log_softmax(torch.randn(n, width + 1, generator=gen) * 2, dim=-1)
    records["ids"], records["values"] = ids.numpy(), log_p[:, :width].numpy()
    records["aux"], records["count"] = log_p[:, width].numpy(), width
    targets = targets_from_records(records.reshape(tuple(shape)), "top_k")
    device = batch["labels"].device
    return {**batch, **{key: getattr(targets, field).to(device) for key, field in
                        zip(TARGET_KEYS, ("ids", "log_mass", "count", "log_tail", "entropy"),
                            strict=True)}}


def sparse_correctness(smoke: bool = False) -> list[dict]:
    """The teacher cache's loss (engine.kernels.sparse_kd) on this device against its float64
    reference: top-64 and sampled-32 targets of random teachers, ignored tokens, padded vocab.
    One dict per case: case, backend, loss_rel_err, grad_rel_err, passed (fp32 1e-5 / 1e-4,
    bf16 1e-2)."""
    dev = current_device()
    backend = kernel_backend(dev)
    shapes = [(5, 257, 250)] if smoke else [(7, 50304, 50277), (300, 50304, 50277)]
    rows = []
    for (n, vocab, valid_vocab), dtype_name, kind in itertools.product(
            shapes, KERNEL_DTYPES, ("top_k", "sampled")):
        student, teacher, labels = make_inputs(n, vocab, KERNEL_DTYPES[dtype_name], dev, seed=n)
        labels[0] = IGNORE_INDEX
        log_p = teacher_log_probs(teacher.double().cpu(), 2.0, valid_vocab)
        if kind == "top_k":
            ids, values, tail = top_k_entries(log_p, 64)
            targets = top_k_targets(ids.int(), values, torch.full((n,), 64), tail)
        else:
            ids, counts, count, entropy = sampled_entries(log_p, 32, torch.Generator())
            targets = sampled_targets(ids.int(), counts.double(), count.int(), entropy)
        targets = targets.to(dev)
        kwargs = dict(alpha=0.5, temperature=2.0, valid_vocab=valid_vocab)
        s64 = student.detach().double().requires_grad_(True)
        ref, _ = sparse_kd_reference(s64, targets, labels, **kwargs)
        ref.backward()
        s = student.detach().clone().requires_grad_(True)
        loss, _ = sparse_kd_loss(s, targets, labels, backend=backend, **kwargs)
        loss.backward()
        loss_err = abs(loss.double().item() - ref.item()) / max(abs(ref.item()), 1e-30)
        grad_err = (s.grad.double() - s64.grad).norm().item() / s64.grad.norm().item()
        tol = (1e-5, 1e-4) if dtype_name == "fp32" else (1e-2, 1e-2)
        rows.append({"case": f"N={n} V={vocab} vv={valid_vocab} {dtype_name} {kind}",
                     "backend": backend, "loss_rel_err": loss_err, "grad_rel_err": grad_err,
                     "passed": bool(loss_err <= tol[0] and grad_err <= tol[1])})
    return rows


# ----------------------------------------------------------------------------- fused heads

HEAD_TEMPERATURES = (0.5, 1.0, 2.0, 4.0)
HEAD_DIVERGENCE_ARGS = {"jsd": {"beta": 0.5}, "skew_forward_kl": {"skew": 0.1},
                        "skew_reverse_kl": {"skew": 0.1}}
REFERENCE_ROWS = 2048  # float64 reference rows at a time (5 x 0.8 GB at V = 50304)


def _reference_head(inputs, loss_of_rows, n_valid: int):
    """(loss, d hidden, d weight) of the student head in float64, REFERENCE_ROWS rows at a
    time (the largest micro-batch's float64 logits would not fit at once): loss_of_rows(
    logits64, start, stop) is the reference loss of those rows, normalised by n_valid."""
    h_s, w_s = inputs[0], inputs[1]
    w64 = w_s.detach().double().requires_grad_(True)
    grad_h = torch.empty(h_s.shape, dtype=torch.float64, device=h_s.device)
    total = torch.zeros((), dtype=torch.float64, device=h_s.device)
    for start in range(0, h_s.shape[0], REFERENCE_ROWS):
        stop = min(start + REFERENCE_ROWS, h_s.shape[0])
        h64 = h_s[start:stop].detach().double().requires_grad_(True)
        loss = loss_of_rows(h64 @ w64.t(), start, stop)
        loss.backward()
        grad_h[start:stop] = h64.grad
        total += loss.detach()
    return total, grad_h, w64.grad


def _head_errors(ours, reference) -> dict:
    """Relative errors of (loss, d hidden, d weight) against the float64 reference."""
    def rel(a, b):
        norm = b.norm().item()
        diff = (a.double() - b).norm().item()
        return diff / norm if norm > 0 else diff
    return {"loss_rel_err": rel(ours[0], reference[0]), "dh_rel_err": rel(ours[1], reference[1]),
            "dw_rel_err": rel(ours[2], reference[2])}


def _dense_head_case(inputs, divergence, temperature, backend) -> dict:
    h_s, w_s, h_t, w_t, labels = inputs
    valid_vocab = w_s.shape[0] - VALID_VOCAB_PAD
    options = dict(alpha=ALPHA, temperature=temperature, valid_vocab=valid_vocab,
                   divergence=divergence, **HEAD_DIVERGENCE_ARGS.get(divergence, {}))
    n_valid = int((labels != IGNORE_INDEX).sum())
    hs, ws = h_s.detach().clone().requires_grad_(True), w_s.detach().clone().requires_grad_(True)
    loss, _ = kd_head_loss(hs, ws, h_t, w_t, labels, backend=backend, **options)
    loss.backward()
    t64 = w_t.double()

    def rows(logits, start, stop):
        teacher = h_t[start:stop].double() @ t64.t()
        return kd_loss_reference(logits, teacher, labels[start:stop], normalizer=n_valid,
                                 **options)[0]
    return _head_errors((loss, hs.grad, ws.grad), _reference_head(inputs, rows, n_valid))


def _cache_targets(h_t, w_t, kind, temperature, valid_vocab):
    """Top-64 or sampled-32 targets of the teacher head, built REFERENCE_ROWS at a time in
    float64 as a cache build would (engine.data.teacher_cache_encode)."""
    parts, gen = [], torch.Generator(device=h_t.device).manual_seed(0)
    for start in range(0, h_t.shape[0], REFERENCE_ROWS):
        logits = h_t[start:start + REFERENCE_ROWS].double() @ w_t.double().t()
        log_p = teacher_log_probs(logits, temperature, valid_vocab)
        if kind == "top_k":
            ids, values, tail = top_k_entries(log_p, 64)
            parts.append(top_k_targets(ids.int(), values,
                                       torch.full((ids.shape[0],), 64, device=ids.device), tail))
        else:
            ids, counts, count, entropy = sampled_entries(log_p, 32, gen)
            parts.append(sampled_targets(ids.int(), counts.double(), count.int(), entropy))
    return SparseTargets(*(torch.cat([getattr(p, f.name) for p in parts])
                           for f in dataclasses.fields(SparseTargets)))


def _sparse_head_case(inputs, kind, temperature, backend) -> dict:
    h_s, w_s, h_t, w_t, labels = inputs
    valid_vocab = w_s.shape[0] - VALID_VOCAB_PAD
    targets = _cache_targets(h_t, w_t, kind, temperature, valid_vocab)
    options = dict(alpha=ALPHA, temperature=temperature, valid_vocab=valid_vocab)
    n_valid = int((labels != IGNORE_INDEX).sum())
    hs, ws = h_s.detach().clone().requires_grad_(True), w_s.detach().clone().requires_grad_(True)
    loss, _ = sparse_kd_head_loss(hs, ws, targets, labels, backend=backend, **options)
    loss.backward()

    def rows(logits, start, stop):
        return sparse_kd_reference(logits, targets.rows(start, stop), labels[start:stop],
                                   normalizer=n_valid, **options)[0]
    return _head_errors((loss, hs.grad, ws.grad), _reference_head(inputs, rows, n_valid))


def head_correctness_cases(smoke: bool, largest_tokens: int) -> list[tuple]:
    """(what, variant, temperature, n_tokens): every divergence and both cache kinds at each
    temperature with an odd token count (smoke: each divergence at one temperature, the four
    covered), and forward_kl / top-64 at `largest_tokens`."""
    odd, temps = (7, HEAD_TEMPERATURES[::-1]) if smoke else (1027, HEAD_TEMPERATURES)
    if smoke:  # the interpreter is slow: each divergence at one temperature, all four covered
        cases = [("dense", name, HEAD_TEMPERATURES[i % 4], odd)
                 for i, name in enumerate(DIVERGENCES)]
        cases += [("sparse", "top_k", t, odd) for t in temps[:2]]
    else:
        cases = [("dense", name, t, odd) for name in DIVERGENCES for t in temps]
        cases += [("sparse", "top_k", t, odd) for t in temps]
    cases += [("sparse", "sampled", 2.0, odd)]
    cases += [("dense", "forward_kl", 2.0, largest_tokens), ("sparse", "top_k", 2.0,
                                                               largest_tokens)]
    return cases


def head_correctness(smoke: bool, largest_tokens: int, tolerance: float = 2e-2) -> list[dict]:
    """The fused heads (kd_head_loss for every divergence, sparse_kd_head_loss for both cache
    kinds) in bf16 on this device against float64 references: loss, d hidden and d weight,
    T = 0.5 / 1 / 2 / 4, an odd token count, valid_vocab < V (Pythia's 27 padding columns),
    10% ignored labels, and at `largest_tokens` (the plan's largest micro-batch, minus one:
    odd too). One dict per case with its errors and `passed` (every error <= tolerance: the
    bf16 rounding of the logits themselves is ~4e-3 relative, T = 0.5 doubles it)."""
    dev = current_device()
    backend = kernel_backend(dev)
    shape = dict(student_hidden=32, teacher_hidden=48, vocab=257) if smoke else dict(
        student_hidden=SEED_HEAD["student_hidden"], teacher_hidden=SEED_HEAD["teacher_hidden"],
        vocab=SEED_HEAD["vocab"])
    rows = []
    for what, variant, temperature, n in head_correctness_cases(smoke, largest_tokens):
        inputs = head_inputs(n, **shape, dtype=torch.bfloat16, dev=dev, seed=n)
        case = _dense_head_case if what == "dense" else _sparse_head_case
        errors = case(inputs, variant, temperature, backend)
        rows.append({"case": f"{what} {variant} T={temperature} N={n} V={shape['vocab']} "
                             f"vv={shape['vocab'] - VALID_VOCAB_PAD} bf16", "backend": backend,
                     **errors, "passed": all(v <= tolerance for v in errors.values())})
        del inputs
        free_memory(dev)
    return rows


# ----------------------------------------------------------------------------- devices, timing


def current_device() -> torch.device:
    """This process's GPU (with its index: memory caps refuse a bare "cuda"), else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return f"cpu ({platform.machine()})"


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def cap_memory_to(dev: torch.device, card_bytes: int, context_bytes: int) -> int | None:
    """Cap this process's CUDA allocator to what a card of `card_bytes` leaves beside the
    driver's context (which lives outside the allocator); the cap, or None off CUDA."""
    if dev.type != "cuda":
        return None
    cap = card_bytes - context_bytes
    total = torch.cuda.get_device_properties(dev).total_memory
    torch.cuda.set_per_process_memory_fraction(cap / total, dev)
    return cap


def free_memory(dev: torch.device) -> None:
    gc.collect()
    if dev.type == "cuda":
        torch.cuda.empty_cache()


def timed(fn, repeats: int, dev: torch.device, warmup: int = 2) -> float:
    """Median seconds of fn() over `repeats`: CUDA events on a GPU, perf_counter elsewhere."""
    for _ in range(warmup):
        fn()
    return statistics.median(time_once(fn, dev) for _ in range(repeats))


def time_once(fn, dev, clock=time.perf_counter) -> float:
    """Seconds of one fn(): CUDA events on a GPU, else `clock` (wall, or process CPU time)."""
    if dev.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    t0 = clock()
    fn()
    return clock() - t0


def proc_status_mib(field: str) -> float | None:
    """A /proc/self/status size field (VmRSS, VmHWM) in MiB; None where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        return None
    return None


def reset_peak_rss() -> bool:
    """Start the high-water mark (VmHWM) afresh at the current RSS (Linux >= 4.0); False where
    that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


def error_record(exc: BaseException) -> dict:
    """What a guarded section records when it raised (call inside the except)."""
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}


def write_json(path: Path, payload: dict) -> None:
    """A benchmark's report as JSON, atomically (non-JSON values written as text)."""
    write_json_atomic(path, payload, default=str, trailing_newline=False)


# ----------------------------------------------------------------------------- the kernel


def make_inputs(n, vocab, dtype, dev, seed=0):
    """Student and teacher logits [n, vocab] and labels (10% ignored) for the loss alone."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    student = (torch.randn(n, vocab, generator=gen) * 2).to(device=dev, dtype=dtype)
    teacher = (torch.randn(n, vocab, generator=gen) * 2).to(device=dev, dtype=dtype)
    labels = torch.randint(0, vocab - VALID_VOCAB_PAD, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.1] = IGNORE_INDEX
    return student, teacher, labels.to(dev)


def kernel_backend(dev: torch.device) -> str:
    """Triton on CUDA or under the interpreter; otherwise the torch path (smoke on plain CPU)."""
    if dev.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return "triton"
    return "torch"


def loss_step_fn(variant, backend="auto", compiled=None):
    """A callable (student, teacher, labels, valid_vocab) -> None: forward + backward of one
    loss variant ("naive", "compiled", "ours", "ours_inplace")."""
    def run(student, teacher, labels, valid_vocab):
        if variant == "naive":
            loss = naive_kd_loss(student, teacher, labels, valid_vocab=valid_vocab)
        elif variant == "compiled":
            loss = compiled(student, teacher, labels, valid_vocab=valid_vocab)
        else:
            loss, _ = kd_loss(student, teacher, labels, alpha=ALPHA, temperature=TEMPERATURE,
                              valid_vocab=valid_vocab, backend=backend,
                              inplace_grad=variant == "ours_inplace")
        loss.backward()
        student.grad = None
    return run


def kernel_step_fn():
    """A callable like loss_step_fn's: the dense Triton kernel alone, its gradient written over
    the student logits (no autograd, no backward scaling pass): the 10 bytes per bf16 element
    that the >= 80%-of-copy target (issue 24) is about."""
    from engine.kernels.kd_loss_triton import kd_loss_forward_triton
    from engine.kernels.loss_spec import LossOptions

    def run(student, teacher, labels, valid_vocab):
        logits = student.detach()
        kd_loss_forward_triton(logits, teacher, labels, logits,
                               LossOptions(alpha=ALPHA, temperature=TEMPERATURE,
                                           ignore_index=IGNORE_INDEX, valid_vocab=valid_vocab),
                               inv_norm=torch.ones((), device=logits.device))
    return run


def copy_bandwidth(dev, n_bytes, repeats):
    """Device memory bandwidth of a plain copy (read + write), bytes / second."""
    src = torch.empty(n_bytes // 4, dtype=torch.float32, device=dev).uniform_()
    dst = torch.empty_like(src)
    seconds = timed(lambda: dst.copy_(src), repeats, dev)
    return 2 * src.numel() * 4 / seconds


def gpu_correctness(smoke=False):
    """Our kernel against the float64 reference on the device (odd shapes, padding, ignored
    tokens). One dict per case: case, backend, loss_rel_err, grad_rel_err, passed (fp32:
    1e-5 / 1e-4, bf16: 1e-2)."""
    dev = current_device()
    backend = kernel_backend(dev)
    if smoke:
        shapes = [(5, 257, 250), (3, 1000, None)]
    else:
        shapes = [(1, 50304, 50277), (7, 50277, None), (300, 50304, 50277), (1027, 32003, 32000)]
    return [
        _correctness_case(n, vocab, valid_vocab, dtype_name, temperature, dev, backend)
        for n, vocab, valid_vocab in shapes
        for dtype_name in KERNEL_DTYPES
        for temperature in (1.0, 2.0, 4.0)
    ]


def _correctness_case(n, vocab, valid_vocab, dtype_name, temperature, dev, backend) -> dict:
    dtype = KERNEL_DTYPES[dtype_name]
    student, teacher, labels = make_inputs(n, vocab, dtype, dev, seed=n + vocab + int(temperature))
    labels[0] = IGNORE_INDEX  # at least one ignored token in every case
    kwargs = dict(alpha=0.5, temperature=temperature, valid_vocab=valid_vocab)
    s64 = student.detach().double().requires_grad_(True)
    ref, _ = kd_loss_reference(s64, teacher.double(), labels, **kwargs)
    ref.backward()
    s = student.detach().clone().requires_grad_(True)
    loss, _ = kd_loss(s, teacher, labels, backend=backend, **kwargs)
    loss.backward()
    loss_err = abs(loss.double().item() - ref.item()) / max(abs(ref.item()), 1e-30)
    ref_norm = s64.grad.norm().item()
    diff = (s.grad.double() - s64.grad).norm().item()
    # All-ignored rows (N=1 with its only label ignored) have a zero reference gradient:
    # ours must then be exactly zero too.
    grad_err = diff / ref_norm if ref_norm > 0 else diff
    loss_tol, grad_tol = (1e-5, 1e-4) if dtype == torch.float32 else (1e-2, 1e-2)
    return {
        "case": f"N={n} V={vocab} vv={valid_vocab} {dtype_name} T={temperature}",
        "backend": backend,
        "loss_rel_err": loss_err,
        "grad_rel_err": grad_err,
        "passed": bool(loss_err <= loss_tol and grad_err <= grad_tol),
    }


def gpu_speed(n_tokens=4096, vocab=50304, dtype=torch.bfloat16, repeats=50, smoke=False):
    """Forward + backward of ours / eager naive / torch.compile naive on the current device.

    Returns {"device", "n_tokens", "vocab", "dtype", "copy_gbps", "variants": {name: {median_ms,
    gbps, fraction_of_copy, peak_mib, speedup_vs_eager}}}; with the Triton backend also the
    variant "kernel" (kernel_step_fn: the kernel alone, in place). Bandwidth counts 5 x element
    size bytes per logit (10 for bf16). On CPU (smoke) peak memory is not measured (None).
    """
    dev = current_device()
    warmup = 2
    if smoke:  # tiny: under TRITON_INTERPRET=1 every kernel row costs milliseconds
        n_tokens, vocab, repeats, warmup = 16, 1000, 1, 1
    backend = kernel_backend(dev)
    valid_vocab = vocab - VALID_VOCAB_PAD
    bytes_moved = n_tokens * vocab * 5 * torch.empty((), dtype=dtype).element_size()
    copy_bps = copy_bandwidth(dev, 1 << (20 if smoke else 30), max(repeats, 5))
    # Inductor on a GPU; on CPU (smoke) dynamo with the eager backend exercises the same path
    # without needing a C++ toolchain.
    compiled = torch.compile(naive_kd_loss, backend="inductor" if dev.type == "cuda" else "eager")
    variants = {
        "ours_inplace": loss_step_fn("ours_inplace", backend),
        "ours": loss_step_fn("ours", backend),
        "naive_eager": loss_step_fn("naive"),
        "naive_compiled": loss_step_fn("compiled", compiled=compiled),
    }
    if backend == "triton":
        variants["kernel"] = kernel_step_fn()
    student, teacher, labels = make_inputs(n_tokens, vocab, dtype, dev)
    out = {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu",
           "backend": backend, "n_tokens": n_tokens, "vocab": vocab,
           "dtype": str(dtype).replace("torch.", ""), "copy_gbps": copy_bps / 1e9,
           "variants": {}}
    for name, run in variants.items():
        # ours_inplace and kernel overwrite their logits with the gradient on every call, so
        # they get a copy of their own; the values stay finite and small, which is all the
        # timing needs.
        x = student.detach().clone() if name in ("ours_inplace", "kernel") else student.detach()
        x.requires_grad_(True)
        fn = lambda run=run, x=x: run(x, teacher, labels, valid_vocab)
        peak_mib = _cuda_peak_mib(fn) if dev.type == "cuda" else None
        seconds = timed(fn, repeats, dev, warmup=warmup)
        out["variants"][name] = {
            "median_ms": seconds * 1e3,
            "gbps": bytes_moved / seconds / 1e9,
            "fraction_of_copy": bytes_moved / seconds / copy_bps,
            "peak_mib": peak_mib,
        }
    eager = out["variants"]["naive_eager"]["median_ms"]
    for row in out["variants"].values():
        row["speedup_vs_eager"] = eager / row["median_ms"]
    return out


def _cuda_peak_mib(fn) -> float:
    """Peak CUDA memory one call of fn allocates beyond what was allocated before it."""
    fn()  # compile / warm up before measuring memory
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ----------------------------------------------------------------------------- per divergence


def divergence_times(n_tokens, vocab, dtype, dev, repeats, backend) -> dict[str, float]:
    """Seconds per kd_loss forward + backward for every divergence on the same logits, the
    divergences interleaved repeat by repeat (so a slow minute of a shared machine hits them
    all alike): CUDA events on a GPU, process CPU time elsewhere. Median of `repeats`."""
    student, teacher, labels = make_inputs(n_tokens, vocab, dtype, dev)
    extra = {"jsd": {"beta": 0.5}, "skew_forward_kl": {"skew": 0.1},
             "skew_reverse_kl": {"skew": 0.1}}
    times: dict[str, list[float]] = {name: [] for name in DIVERGENCES}
    for repeat in range(repeats + 1):  # the first round warms up (and compiles on a GPU)
        for name in DIVERGENCES:
            x = student.detach().clone().requires_grad_(True)

            def run(x=x, name=name):
                loss, _ = kd_loss(x, teacher, labels, alpha=ALPHA, temperature=TEMPERATURE,
                                  valid_vocab=vocab - VALID_VOCAB_PAD, backend=backend,
                                  inplace_grad=True, divergence=name, **extra.get(name, {}))
                loss.backward()

            seconds = time_once(run, dev, clock=time.process_time)
            if repeat:
                times[name].append(seconds)
    return {name: statistics.median(values) for name, values in times.items()}


# ----------------------------------------------------------------------------- the fused head

SEED_HEAD = dict(n_tokens=4096, student_hidden=512, teacher_hidden=768, vocab=50304)


def head_inputs(n_tokens, student_hidden, teacher_hidden, vocab, dtype, dev, seed=0):
    """Hidden states, head weights (scaled so the logits are a few units, as a trained head's)
    and labels (10% ignored) for the head + loss alone."""
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n_tokens, student_hidden, generator=gen)
    w_s = torch.randn(vocab, student_hidden, generator=gen) * (2.0 / student_hidden**0.5)
    h_t = torch.randn(n_tokens, teacher_hidden, generator=gen)
    w_t = torch.randn(vocab, teacher_hidden, generator=gen) * (2.0 / teacher_hidden**0.5)
    labels = torch.randint(0, vocab - VALID_VOCAB_PAD, (n_tokens,), generator=gen)
    labels[torch.rand(n_tokens, generator=gen) < 0.1] = IGNORE_INDEX
    tensors = [t.to(device=dev, dtype=dtype) for t in (h_s, w_s, h_t, w_t)]
    return (*tensors, labels.to(dev))


def head_step(variant: str, inputs, *, backend="auto", chunk_tokens=None, liger=None,
              full_vocab=False, inplace_grad=True):
    """A callable running one forward + backward of the LM heads + loss (student gradients
    into .grad of the returned leaves). Variants:
      fused     kd_head_loss (never forms the logits)
      unfused   the head matmuls under autograd, then kd_loss, with the in-place gradient
                as loss.fused_head = false trains (inplace_grad=False: its default mode)
      matmuls   the four matmuls alone: both heads forward, d hidden and d weight (the floor)
      liger     Liger-Kernel's LigerFusedLinearJSDLoss (pass the module as `liger`)
    Every column takes part with full_vocab (Liger has no valid_vocab), else the padded rows
    do not. Returns (run, leaves): call run(); the leaves are the student hidden states and
    weight."""
    h_s, w_s, h_t, w_t, labels = inputs
    hs = h_s.detach().clone().requires_grad_(True)
    ws = w_s.detach().clone().requires_grad_(True)
    valid_vocab = None if full_vocab else w_s.shape[0] - VALID_VOCAB_PAD

    def run():
        hs.grad = ws.grad = None
        if variant == "matmuls":
            logits = hs.detach() @ ws.detach().t()
            _ = h_t @ w_t.t()
            hs.grad, ws.grad = logits @ ws.detach(), logits.t() @ hs.detach()
            return
        if variant == "fused":
            loss, _ = kd_head_loss(hs, ws, h_t, w_t, labels, alpha=ALPHA,
                                   temperature=TEMPERATURE, valid_vocab=valid_vocab,
                                   backend=backend, chunk_tokens=chunk_tokens)
        elif variant == "unfused":
            with torch.no_grad():
                teacher = h_t @ w_t.t()
            loss, _ = kd_loss(hs @ ws.t(), teacher, labels, alpha=ALPHA, temperature=TEMPERATURE,
                              valid_vocab=valid_vocab, backend=backend, inplace_grad=inplace_grad)
        else:
            loss = liger(hs, ws, h_t, w_t, labels)
        loss.backward()

    return run, (hs, ws)


def liger_jsd_loss(chunk_size=1024, compiled=True):
    """Liger-Kernel's LigerFusedLinearJSDLoss set to our objective, or None without the
    package: beta 0 is its forward KL(teacher || student) at temperature 2 without T^2, so
    weight_soft_loss = (1 - alpha) T^2 = 2 and weight_hard_loss = alpha = 0.5 give
    (1 - alpha) T^2 KL + alpha CE, both means over the valid tokens, over the full vocabulary
    (Liger has no valid_vocab)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError:
        return None
    return LigerFusedLinearJSDLoss(
        weight_hard_loss=ALPHA, weight_soft_loss=(1 - ALPHA) * TEMPERATURE**2, beta=0.0,
        ignore_index=IGNORE_INDEX, temperature=TEMPERATURE, compiled=compiled,
        chunk_size=chunk_size)


# ----------------------------------------------------------------------------- teacher cache builds


def teacher_forward_rate(teacher_dir, data, seq_len: int, dtype: str, batch: int,
                         device: str = "cpu") -> float:
    """Tokens/s of the teacher's own forward (full logits) over every packed window, after one
    untimed batch (kernels chosen, allocator warm)."""
    dev = torch.device(device)
    teacher = load_pretrained(teacher_dir, dtype=dtype_of(dtype), device=dev).eval()
    dataset = build_dataset(data, "packed", seq_len)
    starts = range(0, len(dataset), batch)
    with torch.no_grad():
        teacher(dataset.get_batch(np.arange(min(batch, len(dataset))))["input_ids"].to(dev))
        sync(dev)
        start = time.perf_counter()
        for first in starts:
            ids = dataset.get_batch(np.arange(first, min(first + batch, len(dataset))))
            teacher(ids["input_ids"].to(dev))
        sync(dev)
    return len(dataset) * seq_len / (time.perf_counter() - start)


def cache_build_rates(teacher_dir, data, out: Path, kinds: dict, *, seq_len, dtype,
                      temperature, valid_vocab=None, batch: int = 8, device: str = "cpu",
                      warm_data=None) -> dict:
    """Each cache's build tokens/s (neox-distill cache-teacher's whole job) beside the
    teacher's forward tokens/s on the same windows, the forward timed before and after the
    builds (their mean is the yardstick).

    `warm_data` (a few windows of the same kind): each cache is first built over them too and
    that build's tokens and seconds are subtracted, so the rate is the build's steady state
    (what a long cache build sees) without the teacher's load and the first batch's warm-up,
    which the forward's rate leaves out too."""
    def build(folder, source, kind) -> tuple[float, dict]:
        start = time.perf_counter()
        manifest = build_teacher_cache(
            str(teacher_dir), str(source), str(folder), **kind, temperature=temperature,
            seq_len=seq_len, batch=batch, dtype=dtype, device=device, valid_vocab=valid_vocab,
            show_progress=False)
        return time.perf_counter() - start, manifest

    trained = len(build_dataset(data, "packed", seq_len)) * seq_len
    warm_tokens = len(build_dataset(warm_data, "packed", seq_len)) * seq_len if warm_data else 0
    before = teacher_forward_rate(teacher_dir, data, seq_len, dtype, batch, device)
    builds = {}
    for name, kind in kinds.items():
        warm_seconds = build(out / f"{name}-warm", warm_data, kind)[0] if warm_data else 0.0
        seconds, manifest = build(out / name, data, kind)
        builds[name] = {"seconds": seconds, "warm_seconds": warm_seconds,
                        "tokens_per_s": (trained - warm_tokens) / (seconds - warm_seconds),
                        "bytes_per_token": manifest["record"]["bytes"],
                        "target_bytes_per_token": 4 * manifest["width"] + 8,
                        "cache_bytes": manifest["totals"]["bytes"],
                        "mean_tail_mass": mean_tail_mass(out / name)}
    after = teacher_forward_rate(teacher_dir, data, seq_len, dtype, batch, device)
    for row in builds.values():
        row["vs_teacher_forward"] = row["tokens_per_s"] / ((before + after) / 2)
    return {"teacher_forward_tokens_per_s": [before, after], "device": str(device),
            "builds": builds}


def mean_tail_mass(folder: Path, rows: int = 100_000) -> float | None:
    """The teacher's mean probability outside the listed columns (top-k caches; None for
    sampled ones), over the first trained rows."""
    cache = TeacherCache(folder)
    if cache.kind != "top_k":
        return None
    records = cache.rows(0, min(rows, cache.total_rows))
    used = records[records["count"] > 0]
    return float(np.exp(used["aux"].astype(np.float64)).mean())


def random_token_shards(folder: Path, windows: int, seq_len: int, valid_vocab: int,
                        seed: int = 0) -> Path:
    """A shard folder of `windows` packed windows of random token ids (one document)."""
    folder.mkdir(parents=True)
    tokens = np.random.default_rng(seed).integers(2, valid_vocab, windows * seq_len + 1)
    writer = ShardWriter(folder / "shard_00000", np.uint16)
    writer.add_documents(tokens, np.array([tokens.size]))
    writer.finish()
    return folder


def seed_cache_build_rates(root: Path, smoke: bool, device: str = "cpu") -> dict:
    """Cache build vs teacher forward at the seed shapes: a random pythia-160m teacher (bf16),
    V = 50304, top-64 and sampled-32, over random tokens (CPU: 32 windows of 512 after 8 warm
    ones; GPU: 256 windows of 2048 after 32)."""
    sizes = SMOKE if smoke else FULL
    name, vocab, valid_vocab = sizes["teacher"], sizes["vocab"], sizes["valid_vocab"]
    windows, warm, seq_len = ((4, 2, 32) if smoke else (256, 32, 2048) if device != "cpu"
                              else (32, 8, 512))
    # The shard folders first: their exclusive mkdir refuses a used `root` before any write.
    data = random_token_shards(root / "data", windows, seq_len, valid_vocab)
    warm_data = random_token_shards(root / "warm", warm, seq_len, valid_vocab, seed=1)
    teacher = build_ours(name, vocab, 2048, "cpu", seed=1)
    save_pretrained(teacher, root / "teacher", dtype=torch.bfloat16)
    kinds = {"top-64": dict(top_k=64), "sampled-32": dict(samples=32)}
    out = cache_build_rates(root / "teacher", data, root / "caches", kinds, seq_len=seq_len,
                            dtype="bf16", temperature=2.0, valid_vocab=valid_vocab,
                            device=device, warm_data=warm_data)
    out["shapes"] = {"teacher": name, "vocab": vocab, "seq_len": seq_len, "windows": windows,
                     "warm_windows": warm}
    return out


# ----------------------------------------------------------------------------- study runs


def median_step_seconds(out_dir: Path) -> float:
    """The median wall-clock step of a run folder's train records (the first step, which
    warms up, left out when there are others)."""
    times = [r["step_time_s"] for r in read_records(Path(out_dir) / "metrics.jsonl")
             if r.get("kind") == "train"]
    return statistics.median(times[1:] or times)


def heldout_vs_teacher(model_dir, teacher_dir, data_dir, config, batches: int) -> dict:
    """Held-out CE / ppl of a model and its forward-KL KD to the real teacher (fp32 both) on
    the quickstart's validation split, with the run's T and valid vocabulary."""
    split = heldout_loader(build_dataset(data_dir, "packed", config.batch.seq_len),
                           config.batch.micro_batch, val_fraction=config.data.val_fraction)
    return heldout_metrics(load_pretrained(model_dir, dtype=torch.float32),
                           heldout_batches(split, max_batches=batches or None),
                           teacher=load_pretrained(teacher_dir, dtype=torch.float32),
                           temperature=config.loss.temperature,
                           valid_vocab=config.data.valid_vocab or None)


# ----------------------------------------------------------------------------- quickstart


def _rebased(path: str, old_root: Path, folder: Path) -> str:
    """`path` as recorded by the quickstart (relative to where it ran), found under `folder`."""
    p = Path(path)
    if p.is_absolute():
        return str(p)
    try:
        return str(folder / p.relative_to(old_root))
    except ValueError:
        return str(p)


def finished_quickstart(args) -> dict[str, Any]:
    """The finished quickstart's summary (quickstart.json) for a study: the one at
    args.quickstart, or one made under args.out (args.tiny: the tiny one); its paths point into
    the folder it was read from."""
    folder = Path(args.quickstart) if args.quickstart else Path(args.out) / "quickstart"
    if not args.quickstart:
        code = quickstart.main(["--out-dir", str(folder)] + (["--tiny"] if args.tiny else []))
        if code not in (0, 1):  # 1: ran, but the distilled student is not ahead (said above)
            raise SystemExit(f"the quickstart under {folder} failed (exit {code})")
    try:
        summary = json.loads((folder / quickstart.MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SystemExit(f"{folder / quickstart.MARKER}: not a finished quickstart "
                         f"({exc})") from None
    if "last_word_task" not in summary:
        raise SystemExit(f"{folder}: made by an older quickstart (no last-word task); "
                         "rerun it or omit --quickstart")
    old_root = Path(summary["data_dir"]).parent
    summary["data_dir"] = _rebased(summary["data_dir"], old_root, folder)
    summary["last_word_task"] = _rebased(summary["last_word_task"], old_root, folder)
    summary["tokenizer"]["path"] = _rebased(summary["tokenizer"]["path"], old_root, folder)
    for run in summary["runs"].values():
        run["export_dir"] = _rebased(run["export_dir"], old_root, folder)
    return summary


def quickstart_study(args) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the quickstart's settings, shrunk under args.tiny; its finished summary) for a study
    at quickstart scale, with the quickstart's thread count set."""
    settings = quickstart.load_settings(quickstart.DEFAULT_CONFIG)
    if args.tiny:
        settings = quickstart.shrink(settings)
    torch.set_num_threads(settings["quickstart"]["torch_threads"] or torch.get_num_threads())
    return settings, finished_quickstart(args)
