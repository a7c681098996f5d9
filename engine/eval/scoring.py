"""The scoring core: log-likelihoods, greedy matches, held-out CE / perplexity / KD.

Shared by `python -m engine.eval` (engine/eval/tasks.py) and the training loop's validation,
so a number printed by either comes from the same arithmetic:

- `score_batch`: per-row log-likelihood and greedy match of labelled positions (harness tasks);
- `heldout_metrics`: token CE / ppl over labelled batches and, with a teacher, the KD term of
  the training loss with the run's divergence (the training loss's own fused heads,
  engine.kernels.kd_head_loss / ce_head_loss, forward only; or its reference for other models).

All probability math is fp32 on chunks of rows, whatever the model's dtype: bf16 logits give
visibly wrong log-probabilities, and a [tokens, 50304] fp32 matrix for a whole batch would not
fit beside a training run. When the model exposes `hidden_states` and `embed_out` (our GPTNeoX),
the vocabulary projection runs only on the positions that are scored (see benchmarks/README.md),
and for heldout_metrics inside the fused head + loss, which never forms the logits at all.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from engine.data.teacher_cache import targets_of_batch
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.kd_head import ce_head_loss, kd_head_loss
from engine.kernels.kd_loss import kd_loss_reference
from engine.kernels.loss_spec import LossSpec
from engine.kernels.sparse_kd import sparse_kd_reference
from engine.kernels.sparse_kd_head import sparse_kd_head_loss
from engine.model.network import autocast_context, model_device, unwrap_model

# Rows of logits turned into log-probabilities at once: 1024 x 50304 x 4 B = 206 MB per tensor.
DEFAULT_CHUNK_ROWS = 1024


@contextlib.contextmanager
def eval_mode(*models: torch.nn.Module | None):
    """Switch models to eval mode and restore each one's previous mode afterwards.

    The training loop calls heldout_metrics in the middle of training: leaving the student in
    eval mode (or a frozen teacher in train mode) would silently change what follows.
    """
    present = [m for m in models if m is not None]
    previous = [m.training for m in present]
    try:
        for m in present:
            m.eval()
        yield
    finally:
        for m, was_training in zip(present, previous, strict=True):
            m.train(was_training)


def _as_logits(output) -> torch.Tensor:
    """Our GPTNeoX returns a tensor; transformers models return an output with `.logits`."""
    return output.logits if hasattr(output, "logits") else output


def _head_split(model: torch.nn.Module):
    """(hidden_states function, head module) when the model exposes both, else None."""
    hidden = getattr(model, "hidden_states", None)
    head = getattr(model, "embed_out", None)
    if callable(hidden) and isinstance(head, torch.nn.Module):
        return hidden, head
    return None


def selected_logits(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    *,
    autocast_dtype: torch.dtype | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Iterator[torch.Tensor]:
    """Yield fp32 logits [rows, V] for `positions` (flat indices into B*T), chunk by chunk.

    Must run under torch.no_grad(). The forward runs once; only the chosen rows are projected
    (or, for a model without `hidden_states`/`embed_out`, sliced out of the full logits).
    Autocast is entered per chunk, never across a `yield`, so the caller's math stays fp32.
    """
    device = input_ids.device
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module  # evaluation needs no gradient hooks, and the wrapper hides the head
    split = _head_split(model)
    with autocast_context(device.type, autocast_dtype):
        if split is not None:
            hidden_fn, head = split
            hidden = hidden_fn(input_ids)
            rows = hidden.reshape(-1, hidden.shape[-1])
        else:
            head = None
            logits = _as_logits(model(input_ids))
            rows = logits.reshape(-1, logits.shape[-1])
    for start in range(0, positions.numel(), chunk_rows):
        index = positions[start : start + chunk_rows]
        with autocast_context(device.type, autocast_dtype):
            chunk = rows.index_select(0, index)
            if head is not None:
                chunk = head(chunk)
        yield chunk.float()


def perplexity(mean_nll: float) -> float:
    """exp(mean negative log-likelihood), inf rather than OverflowError for a hopeless model."""
    return math.exp(mean_nll) if mean_nll < 709.0 else math.inf


def _no_grad_iter(iterator: Iterator[torch.Tensor]) -> Iterator[torch.Tensor]:
    """Advance a generator under no_grad (its forward runs lazily, at the first next())."""
    while True:
        with torch.no_grad():
            item = next(iterator, None)
        if item is None:
            return
        yield item


def _restrict_vocab(logits: torch.Tensor, valid_vocab: int | None) -> torch.Tensor:
    if valid_vocab is not None and valid_vocab < logits.shape[-1]:
        return logits[:, :valid_vocab]
    return logits


def _check_targets(targets: torch.Tensor, columns: int, what: str) -> None:
    """Every label id indexes a scored column; one host sync for the whole batch."""
    if targets.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(targets)).tolist()
    if high >= columns or low < 0:
        raise ValueError(
            f"{what}: label ids must lie in [0, {columns}) (the scored vocabulary), "
            f"found min {low} max {high}"
        )


def score_batch(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    *,
    valid_vocab: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-row sums for harness-style scoring of one padded batch (labels already shifted).

    Returns (loglik [B] float64, all_greedy [B] bool, scored_tokens [B] int64) on the CPU:
    the summed log p(label) over labelled positions, whether the argmax equals the label at
    every labelled position, and how many positions were labelled. The model should be in
    eval mode (engine.eval.tasks.score_items sees to it once per call).
    """
    batch, length = labels.shape
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    targets = flat_labels.index_select(0, positions)
    row_of = torch.div(positions, length, rounding_mode="floor")
    loglik = torch.zeros(batch, dtype=torch.float64, device=labels.device)
    mismatches = torch.zeros(batch, dtype=torch.int64, device=labels.device)
    counts = torch.bincount(row_of, minlength=batch)
    offset = 0
    chunks = selected_logits(
        model, input_ids, positions, autocast_dtype=autocast_dtype, chunk_rows=chunk_rows
    )
    for logits in _no_grad_iter(chunks):
        logits = _restrict_vocab(logits, valid_vocab)
        rows = logits.shape[0]
        chunk_targets = targets[offset : offset + rows]
        chunk_rows_of = row_of[offset : offset + rows]
        if offset == 0:  # every chunk has the same columns: check all targets once
            _check_targets(targets, logits.shape[-1], "score_batch")
        target_logp = F.log_softmax(logits, dim=-1).gather(1, chunk_targets[:, None]).squeeze(1)
        loglik.index_add_(0, chunk_rows_of, target_logp.double())
        wrong = (logits.argmax(dim=-1) != chunk_targets).long()
        mismatches.index_add_(0, chunk_rows_of, wrong)
        offset += rows
    return loglik.cpu(), (mismatches == 0).cpu(), counts.cpu()


def heldout_metrics(
    student: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    teacher: torch.nn.Module | None = None,
    spec: LossSpec | None = None,
    autocast_dtype: torch.dtype | None = None,
    reduce_across_ranks: bool = False,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
    cached_kd: bool = False,
    **spec_fields,
) -> dict[str, float | str]:
    """Token-level held-out metrics of `student` (and its distance to `teacher`) over `batches`.

    `batches` yields dicts with "input_ids" and "labels" ([B, T] int64; labels already shifted,
    IGNORE_INDEX = not scored), e.g. engine.eval.heldout.heldout_batches. `spec` (a LossSpec;
    or its fields as keywords: temperature, divergence, beta, skew, t2_scale, valid_vocab)
    defines the KD term as training does; logit columns >= its `valid_vocab` (the padded rows
    of Pythia's 50304-row head) are excluded from every softmax and argmax, exactly as the
    training loss does.

    Returns python numbers:
      "ce"          mean token cross-entropy (nats) of the student,
      "ppl"         exp(ce),
      "tokens"      number of scored tokens,
    and with a teacher also
      "kd"          mean per token of the training loss's KD term with these settings:
                    (T^2 unless spec.t2_scale is off) * D(softmax(t/T), softmax(s/T)), D
                    its divergence (default forward KL, i.e. T^2 KL(teacher || student));
                    docs/loss.md,
      "divergence"  which D that was (LossSpec.divergence_label: e.g. "jsd(beta=0.5)"), a string,
      "teacher_ce"  the teacher's mean token cross-entropy on the same tokens.
    With `cached_kd` and no teacher, the batches carry teacher-cache targets
    (engine.data.teacher_cache.CachedTargets) and "kd" is the training loss's KD term against them
    (engine.kernels.sparse_kd; for a sampled cache an unbiased estimate); no "teacher_ce".
    Our GPTNeoX (hidden_states + embed_out) is scored through the fused heads of the training
    loss, forward only (no gradient formed, no [tokens x vocab] logits); any other model
    through chunks of its logits and the loss's float64-capable reference, in fp32.

    Runs under torch.no_grad() (not inference_mode: a module that caches a tensor during this
    call, such as a rotary table, must still be usable by the next training step), puts the
    models in eval mode and restores their previous modes. With `reduce_across_ranks` the sums
    are all-reduced over the default torch.distributed group before the means, so ranks that
    each evaluate their share of a split validation set report the same global numbers.
    """
    spec = spec if spec is not None else LossSpec(**spec_fields)
    valid_vocab = spec.valid_vocab
    label = spec.divergence_label()
    device = model_device(student)
    # ce, kd, teacher_ce, tokens
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with eval_mode(student, teacher), torch.no_grad():
        for number, batch in enumerate(batches):
            input_ids, labels = _checked_batch(batch, number, device)
            cache = targets_of_batch(batch).to(device).flat() \
                if cached_kd and teacher is None else None
            sums += _batch_sums(
                student, teacher, input_ids, labels, number, spec=spec,
                valid_vocab=valid_vocab, autocast_dtype=autocast_dtype, chunk_rows=chunk_rows,
                cache=cache,
            )
    if reduce_across_ranks and dist.is_available() and dist.is_initialized():
        dist.all_reduce(sums)
    ce_sum, kd_sum, teacher_ce_sum, tokens = sums.tolist()
    count = int(tokens)
    if count == 0:
        raise ValueError(
            "heldout_metrics: the batches hold no labelled token (all are IGNORE_INDEX)"
        )
    metrics = {"ce": ce_sum / count, "ppl": perplexity(ce_sum / count), "tokens": count}
    if teacher is not None or cached_kd:
        metrics["kd"] = kd_sum / count
        metrics["divergence"] = label
    if teacher is not None:
        metrics["teacher_ce"] = teacher_ce_sum / count
    return metrics


def _checked_batch(batch, number: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
    except (KeyError, TypeError) as error:
        raise ValueError(
            f"heldout_metrics: batch {number} must be a dict with tensors 'input_ids' "
            f"and 'labels' ({error!r})"
        ) from None
    if input_ids.shape != labels.shape or input_ids.dim() != 2:
        raise ValueError(
            f"heldout_metrics: batch {number} input_ids {tuple(input_ids.shape)} and "
            f"labels {tuple(labels.shape)} must both be [B, T]"
        )
    return input_ids, labels


def _batch_sums(
    student, teacher, input_ids, labels, number: int, *, spec, valid_vocab,
    autocast_dtype, chunk_rows, cache=None,
) -> torch.Tensor:
    """float64 [ce_sum, kd_sum, teacher_ce_sum, tokens] of one batch (`cache`: the batch's
    flat teacher-cache targets, for the KD when there is no teacher)."""
    sums = torch.zeros(4, dtype=torch.float64, device=input_ids.device)
    flat_labels = labels.reshape(-1)
    positions = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    if positions.numel() == 0:
        return sums
    targets = flat_labels.index_select(0, positions)
    student = unwrap_model(student)
    teacher = unwrap_model(teacher) if teacher is not None else None
    if all(_head_split(m) is not None for m in (student, teacher) if m is not None):
        columns = valid_vocab or student.embed_out.weight.shape[0]
        _check_targets(targets, columns, f"heldout_metrics batch {number}")
        scored = cache.select(positions) if cache is not None else None
        sums[:3] = _fused_sums(student, teacher, input_ids, positions, targets, spec=spec,
                               valid_vocab=valid_vocab, autocast_dtype=autocast_dtype,
                               cache=scored)
        sums[3] = positions.numel()
        return sums
    chunk_args = dict(autocast_dtype=autocast_dtype, chunk_rows=chunk_rows)
    student_chunks = selected_logits(student, input_ids, positions, **chunk_args)
    teacher_chunks = None
    if teacher is not None:
        teacher_chunks = selected_logits(teacher, input_ids, positions, **chunk_args)
    offset = 0
    for s_logits in student_chunks:
        s_logits = _restrict_vocab(s_logits, valid_vocab)
        chunk_targets = targets[offset : offset + s_logits.shape[0]]
        if offset == 0:  # every chunk has the same columns: check all targets once
            _check_targets(targets, s_logits.shape[-1], f"heldout_metrics batch {number}")
        if cache is not None:  # the KD against the batch's teacher-cache targets
            rows = cache.select(positions[offset : offset + s_logits.shape[0]])
            _, stats = sparse_kd_reference(s_logits, rows, chunk_targets,
                                           temperature=spec.temperature,
                                           t2_scale=spec.t2_scale)
            sums[:2] += torch.stack([stats["ce_sum"], stats["kd_sum"]]).double()
        elif teacher_chunks is None:
            ce = F.cross_entropy(s_logits, chunk_targets, reduction="sum")
            sums[0] += ce.double()
        else:
            t_logits = _restrict_vocab(next(teacher_chunks), valid_vocab)
            sums[:3] += _distill_sums(s_logits, t_logits, chunk_targets, spec)
        offset += s_logits.shape[0]
    sums[3] += positions.numel()
    return sums


def _check_shared_vocab(teacher_columns: int, student_columns: int) -> None:
    if teacher_columns != student_columns:
        raise ValueError(
            f"heldout_metrics: teacher scores {teacher_columns} vocabulary columns but the "
            f"student {student_columns}; pass valid_vocab to compare the shared tokenizer rows"
        )


def _distill_sums(s_logits, t_logits, targets, spec: LossSpec) -> torch.Tensor:
    """float64 [student ce_sum, kd_sum, teacher ce_sum] of one chunk of scored rows."""
    _check_shared_vocab(t_logits.shape[-1], s_logits.shape[-1])
    # The loss's own reference computes the training loss's KD (and CE) terms: one definition.
    _, stats = kd_loss_reference(s_logits, t_logits, targets, **spec.kd_keywords())
    teacher_ce = F.cross_entropy(t_logits, targets, reduction="sum")
    return torch.stack([stats["ce_sum"], stats["kd_sum"], teacher_ce]).double()


def _scored_hidden(model, input_ids, positions, autocast_dtype) -> torch.Tensor:
    """The final hidden states of the scored positions only, [rows, H]."""
    with autocast_context(input_ids.device.type, autocast_dtype):
        hidden = model.hidden_states(input_ids)
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions)


def _fused_sums(student, teacher, input_ids, positions, targets, *, spec, valid_vocab,
                autocast_dtype, cache=None) -> torch.Tensor:
    """float64 [ce_sum, kd_sum, teacher_ce_sum] through the training loss's fused heads,
    forward only (the caller holds no_grad). Rows >= valid_vocab of the heads take part in no
    softmax, so they are left out of the matmuls altogether."""
    weights = [m.embed_out.weight for m in (student, teacher) if m is not None]
    columns = valid_vocab or weights[0].shape[0]
    if teacher is not None and valid_vocab is None:  # else both are cut to valid_vocab rows
        _check_shared_vocab(weights[1].shape[0], columns)
    weights = [w[:columns] for w in weights]
    s_hidden = _scored_hidden(student, input_ids, positions, autocast_dtype)
    with autocast_context(input_ids.device.type, autocast_dtype):
        if teacher is None and cache is not None:
            _, stats = sparse_kd_head_loss(s_hidden, weights[0], cache, targets, normalizer=1.0,
                                           **spec.kd_keywords())
            return torch.stack([stats["ce_sum"], stats["kd_sum"], stats["kd_sum"] * 0]).double()
        if teacher is None:
            _, stats = ce_head_loss(s_hidden, weights[0], targets, normalizer=1.0)
            return torch.stack([stats["ce_sum"], stats["kd_sum"], stats["kd_sum"]]).double()
        t_hidden = _scored_hidden(teacher, input_ids, positions, autocast_dtype)
        _, stats = kd_head_loss(s_hidden, weights[0], t_hidden, weights[1], targets,
                                normalizer=1.0, **spec.kd_keywords())
        _, teacher_stats = ce_head_loss(t_hidden, weights[1], targets, normalizer=1.0)
    return torch.stack([stats["ce_sum"], stats["kd_sum"], teacher_stats["ce_sum"]]).double()
