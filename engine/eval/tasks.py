"""The evaluation tasks behind `python -m engine.eval`: ppl, lambada, mc (and --heldout).

Requests and windows come from engine/eval/requests.py (the harness's tokenisation and
truncation); here they are scored and turned into each task's metrics:

- lambada: ppl = exp(-mean over documents of ll), acc = all continuation tokens greedy;
- mc: acc = argmax ll, acc_norm = argmax ll / len(choice in characters);
- ppl: every token of every document given the document's own preceding tokens (an EOS
  stands before the first), in windows of at most max_length inputs; with a stride
  S < max_length each later window re-reads max_length - S tokens of context and scores only
  its new tokens, like the harness's rolling log-likelihood (S = max_length) and the Hugging
  Face stride recipe; the same text gives the same number from a jsonl file and its shards;
- heldout: the training run's validation split of a shard folder (engine/eval/heldout.py).

Requests are sorted by length (longest first, so an out-of-memory shows up in the first
batch), right-padded into batches and scored with engine.eval.scoring.score_batch; the
results are put back in input order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.data.loader import build_dataset
from engine.data.progress import Progress
from engine.eval.heldout import heldout_batches, heldout_loader
from engine.eval.requests import (
    EvalInputError,
    Request,
    TextEncoder,
    corpus_documents,
    encode_requests,
    field_of,
    read_documents,
    request_items,
    rolling_windows,
)
from engine.eval.scoring import eval_mode, heldout_metrics, perplexity, score_batch
from engine.kernels.constants import IGNORE_INDEX
from engine.kernels.loss_spec import LossSpec
from engine.model.network import model_device
from engine.token_ids import checked_batches

TASKS = ("ppl", "lambada", "mc")
# Documents buffered by the ppl task before sorting their windows by length and scoring them.
PPL_BUFFER_WINDOWS = 512


# --------------------------------------------------------------------------------------
# Scoring requests
# --------------------------------------------------------------------------------------


@dataclass
class ScoringSetup:
    """How to run the model: shared by every task."""

    model: torch.nn.Module
    max_length: int
    batch_size: int = 8
    valid_vocab: int | None = None
    autocast_dtype: torch.dtype | None = None
    progress: bool | None = None


def _pack(
    items: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (inputs, targets) pairs into [B, T] input_ids and labels.

    `targets` are the tokens the last len(targets) inputs must predict; every other label
    (context and padding) is IGNORE_INDEX.
    """
    length = max(len(inputs) for inputs, _ in items)
    input_ids = torch.full((len(items), length), pad_id, dtype=torch.int64)
    labels = torch.full((len(items), length), IGNORE_INDEX, dtype=torch.int64)
    for row, (inputs, targets) in enumerate(items):
        n = len(inputs)
        input_ids[row, :n] = torch.as_tensor(np.asarray(inputs, dtype=np.int64))
        labels[row, n - len(targets) : n] = torch.as_tensor(np.asarray(targets, dtype=np.int64))
    return input_ids, labels


def _sorted_batches(
    items: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int
) -> Iterator[tuple[list[int], torch.Tensor, torch.Tensor]]:
    """(item indices, input_ids, labels) per batch: longest items first, right-padded."""
    order = sorted(range(len(items)), key=lambda i: -len(items[i][0]))
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        yield chosen, *_pack([items[i] for i in chosen], pad_id=0)


def score_items(
    setup: ScoringSetup,
    items: Sequence[tuple[Sequence[int], Sequence[int]]],
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(loglik float64 [N], all-greedy bool [N]) for (inputs, targets) items, in input order.

    Items are scored longest first in batches of setup.batch_size, right-padded, with the
    model in eval mode (its previous mode restored afterwards) and no autograd graph.
    """
    loglik = np.zeros(len(items), dtype=np.float64)
    greedy = np.zeros(len(items), dtype=bool)
    device = model_device(setup.model)
    with eval_mode(setup.model), torch.no_grad():
        for chosen, input_ids, labels in _sorted_batches(items, setup.batch_size):
            row_ll, row_greedy, _ = score_batch(
                setup.model,
                input_ids.to(device),
                labels.to(device),
                valid_vocab=setup.valid_vocab,
                autocast_dtype=setup.autocast_dtype,
            )
            loglik[chosen] = row_ll.numpy()
            greedy[chosen] = row_greedy.numpy()
            if progress is not None:
                progress.update(len(chosen), tokens=int(input_ids.numel()))
    return loglik, greedy


def score_requests(
    setup: ScoringSetup, requests: Sequence[Request], where: Callable[[int], str], label: str
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood and greedy match of each request (the harness's loglikelihood)."""
    items = request_items(requests, setup.max_length, where)
    progress = Progress(label, len(items), "requests", enabled=setup.progress)
    try:
        return score_items(setup, items, progress)
    finally:
        progress.close()


def _mean_stderr(values: np.ndarray) -> float:
    """Standard error of a mean as the harness reports it (sample std / sqrt(n))."""
    n = len(values)
    return float(np.std(values, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")


# --------------------------------------------------------------------------------------
# lambada
# --------------------------------------------------------------------------------------


def lambada_pair(text: str) -> tuple[str, str]:
    """lambada_openai's split: context = all but the last space-separated word."""
    words = text.split(" ")
    return " ".join(words[:-1]), " " + words[-1]


def evaluate_lambada(setup: ScoringSetup, encoder: TextEncoder, path: str | Path,
                     limit: int | None = None, samples: bool = False) -> dict:
    """lambada_openai: ppl and acc; with `samples`, each document's line, ll and greedy."""

    def parse(obj: dict, line_no: int) -> tuple[int, tuple[str, str]]:
        text = field_of(obj, "text", str, path, line_no)
        if not text.strip():
            raise EvalInputError(f"{path}:{line_no}: field 'text' is empty")
        return line_no, lambada_pair(text)

    lines, pairs = zip(*read_documents(path, limit, parse), strict=True)
    requests = encode_requests(encoder, pairs)
    loglik, greedy = score_requests(
        setup, requests, lambda i: f"{path}:{lines[i]}", label="lambada"
    )
    result = {
        "task": "lambada",
        "documents": len(pairs),
        "ppl": perplexity(-float(loglik.mean())),
        "acc": float(greedy.mean()),
        "acc_stderr": _mean_stderr(greedy.astype(np.float64)),
        "target_tokens": int(sum(len(r.continuation) for r in requests)),
    }
    if samples:
        result["samples"] = [
            {"line": line, "ll": float(ll), "greedy": bool(g)}
            for line, ll, g in zip(lines, loglik, greedy, strict=True)
        ]
    return result


# --------------------------------------------------------------------------------------
# multiple choice
# --------------------------------------------------------------------------------------


@dataclass
class ChoiceDoc:
    line: int
    gold: int
    pairs: list[tuple[str, str]]
    # Characters each choice's log-likelihood is divided by for acc_norm.
    lengths: list[int]


def mc_doc(obj: dict, path, line_no: int) -> ChoiceDoc:
    """One mc line -> its requests.

    Plain form {"context", "choices", "gold"}: one request (context, " " + choice) per choice,
    acc_norm divides by len(choice). Partial form (Winogrande, "partial": true): the context
    holds a "_"; each choice fills it, and the shared remainder " " + rest.strip() is the
    continuation scored. Its length is the same for every choice, so acc_norm equals acc
    there (the harness reports only acc for Winogrande).
    """
    context = field_of(obj, "context", str, path, line_no)
    choices = field_of(obj, "choices", list, path, line_no)
    gold = field_of(obj, "gold", int, path, line_no)
    partial = obj.get("partial", False)
    if not isinstance(partial, bool):
        raise EvalInputError(f"{path}:{line_no}: field 'partial' must be true or false")
    if not choices or not all(isinstance(c, str) for c in choices):
        raise EvalInputError(f"{path}:{line_no}: 'choices' must be a non-empty list of strings")
    if not 0 <= gold < len(choices):
        raise EvalInputError(
            f"{path}:{line_no}: 'gold' {gold} is not an index into {len(choices)} choices"
        )
    if partial:
        blank = context.find("_")
        if blank < 0:
            raise EvalInputError(f"{path}:{line_no}: a partial item needs a '_' in its context")
        continuation = " " + context[blank + 1 :].strip()
        pairs = [(context[:blank] + choice, continuation) for choice in choices]
        lengths = [len(continuation)] * len(choices)
    else:
        pairs = [(context, " " + choice) for choice in choices]
        lengths = [len(choice) for choice in choices]
    if min(lengths) == 0:
        raise EvalInputError(f"{path}:{line_no}: an empty choice cannot be length-normalised")
    return ChoiceDoc(line_no, gold, pairs, lengths)


def evaluate_mc(setup: ScoringSetup, encoder: TextEncoder, path: str | Path,
                limit: int | None = None, samples: bool = False) -> dict:
    """acc and acc_norm; with `samples`, each document's line, gold and per-choice ll."""
    docs = read_documents(path, limit, lambda obj, line_no: mc_doc(obj, path, line_no))
    owners = [d for d in docs for _ in d.pairs]
    requests = encode_requests(encoder, [pair for d in docs for pair in d.pairs])
    loglik, _ = score_requests(setup, requests, lambda i: f"{path}:{owners[i].line}", "mc")
    correct, correct_norm, per_doc = [], [], []
    offset = 0
    for doc in docs:
        scores = loglik[offset : offset + len(doc.pairs)]
        offset += len(doc.pairs)
        correct.append(float(int(np.argmax(scores)) == doc.gold))
        normed = scores / np.asarray(doc.lengths, dtype=np.float64)
        correct_norm.append(float(int(np.argmax(normed)) == doc.gold))
        per_doc.append({"line": doc.line, "gold": doc.gold, "ll": [float(x) for x in scores]})
    correct, correct_norm = np.asarray(correct), np.asarray(correct_norm)
    result = {
        "task": "mc",
        "documents": len(docs),
        "acc": float(correct.mean()),
        "acc_stderr": _mean_stderr(correct),
        "acc_norm": float(correct_norm.mean()),
        "acc_norm_stderr": _mean_stderr(correct_norm),
        "requests": len(requests),
    }
    if samples:
        result["samples"] = per_doc
    return result


# --------------------------------------------------------------------------------------
# perplexity
# --------------------------------------------------------------------------------------


@dataclass
class _Totals:
    """Summed negative log-likelihoods (and KD terms) of one group of documents."""

    documents: int = 0
    tokens: int = 0
    nll: float = 0.0
    kd: float = 0.0
    teacher_nll: float = 0.0

    def add(self, metrics: dict) -> None:
        """Fold in a heldout_metrics result (means over its tokens) as sums."""
        count = metrics["tokens"]
        self.nll += metrics["ce"] * count
        if "kd" in metrics:
            self.kd += metrics["kd"] * count
            self.teacher_nll += metrics["teacher_ce"] * count

    def as_dict(self, with_teacher: bool) -> dict:
        ce = self.nll / self.tokens if self.tokens else float("nan")
        result = {
            "documents": self.documents,
            "tokens": self.tokens,
            "ce": ce,
            "ppl": perplexity(ce) if self.tokens else float("nan"),
        }
        if with_teacher and self.tokens:
            result["kd"] = self.kd / self.tokens
            result["teacher_ce"] = self.teacher_nll / self.tokens
        return result


def _window_batches(
    windows: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    device: torch.device,
    progress: Progress,
) -> Iterator[dict[str, torch.Tensor]]:
    """Windows as heldout_metrics batches: longest first, right-padded, IGNORE_INDEX labels
    elsewhere."""
    for chosen, input_ids, labels in _sorted_batches(windows, batch_size):
        yield {"input_ids": input_ids.to(device), "labels": labels.to(device)}
        progress.update(len(chosen), tokens=int(input_ids.numel()))


def _scoring_spec(spec: LossSpec | None, setup: ScoringSetup) -> LossSpec:
    """`spec` (default LossSpec()) over the setup's scored columns (setup.valid_vocab)."""
    return (spec or LossSpec()).replace(valid_vocab=setup.valid_vocab)


def evaluate_ppl(
    setup: ScoringSetup,
    encoder: TextEncoder | None,
    path: str | Path,
    *,
    model_vocab: int,
    eos_id: int = 0,
    stride: int | None = None,
    limit: int | None = None,
    teacher: torch.nn.Module | None = None,
    spec: LossSpec | None = None,
) -> dict:
    """Token perplexity of a corpus, overall and per meta.pile_set_name when present.

    Scored through heldout_metrics (`spec`: the KD term's LossSpec, default LossSpec()), one
    call per pile_set_name group and buffer of windows, so the KD comes out per group too.
    """
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: data not found")
    stride = stride or setup.max_length
    if not 0 < stride <= setup.max_length:
        raise EvalInputError(
            f"--stride must be in [1, max_length={setup.max_length}], got {stride}"
        )
    overall = _Totals()
    by_set: dict[str, _Totals] = {}
    pending: dict[str | None, list[tuple[Sequence[int], Sequence[int]]]] = {}
    progress = Progress("ppl", None, "windows", enabled=setup.progress)
    device = model_device(setup.model)

    def score_pending():
        for name, windows in pending.items():
            metrics = heldout_metrics(
                setup.model,
                _window_batches(windows, setup.batch_size, device, progress),
                teacher=teacher,
                spec=_scoring_spec(spec, setup),
                autocast_dtype=setup.autocast_dtype,
            )
            overall.add(metrics)
            if name is not None:
                by_set[name].add(metrics)
        pending.clear()

    try:
        buffered = 0
        for name, tokens in corpus_documents(path, encoder, model_vocab, eos_id):
            if tokens.size == 0:
                continue
            windows = rolling_windows(tokens, eos_id, setup.max_length, stride)
            overall.documents += 1
            overall.tokens += len(tokens)
            if name is not None:
                totals = by_set.setdefault(name, _Totals())
                totals.documents += 1
                totals.tokens += len(tokens)
            pending.setdefault(name, []).extend(windows)
            buffered += len(windows)
            if buffered >= PPL_BUFFER_WINDOWS:
                score_pending()
                buffered = 0
            if limit is not None and overall.documents >= limit:
                break
        score_pending()
    finally:
        progress.close()
    if overall.tokens == 0:
        raise EvalInputError(f"{path}: no tokens to score")
    with_teacher = teacher is not None
    result = {
        "task": "ppl",
        **overall.as_dict(with_teacher),
        "max_length": setup.max_length,
        "stride": stride,
    }
    if by_set:
        result["by_set"] = {name: by_set[name].as_dict(with_teacher) for name in sorted(by_set)}
    return result


def evaluate_heldout(
    setup: ScoringSetup,
    path: str | Path,
    *,
    packed: bool = True,
    val_fraction: float = 0.01,
    pad_id: int = 1,
    limit: int | None = None,
    teacher: torch.nn.Module | None = None,
    spec: LossSpec | None = None,
) -> dict:
    """The training run's validation, reproduced: the loader's val split of a shard folder.

    Same dataset (packed windows or padded documents of max_length tokens), same held-out
    items (engine.data.loader.validation_indices), same heldout_metrics: with the run's seq_len,
    val_fraction, valid_vocab and loss settings (`spec`: temperature, divergence, beta, skew,
    t2_scale) this gives the numbers of its metrics.jsonl (val_*). `limit` counts
    sequences.
    """
    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: data not found")
    dataset = build_dataset(path, "packed" if packed else "padded", setup.max_length, pad_id)
    loader = heldout_loader(
        dataset, setup.batch_size, val_fraction=val_fraction, device=model_device(setup.model)
    )
    if len(loader.items) == 0:
        raise EvalInputError(
            f"{path}: val_fraction {val_fraction} of {len(dataset)} sequences holds out none"
        )
    progress = Progress("heldout", len(loader.items), "sequences", enabled=setup.progress)

    rows = min(m.config.vocab_size for m in (setup.model, teacher) if m is not None)

    def batches():
        checked = checked_batches(heldout_batches(loader, max_sequences=limit), rows,
                                  f"{path}: held-out", setup.valid_vocab)
        for batch in checked:
            yield batch
            progress.update(batch["input_ids"].shape[0], tokens=int(batch["input_ids"].numel()))

    try:
        metrics = heldout_metrics(
            setup.model,
            batches(),
            teacher=teacher,
            spec=_scoring_spec(spec, setup),
            autocast_dtype=setup.autocast_dtype,
        )
    finally:
        progress.close()
    return {
        "task": "ppl",
        "split": "val",
        "packed": packed,
        "val_fraction": val_fraction,
        "sequences": min(len(loader.items), limit or len(loader.items)),
        **metrics,
        "max_length": setup.max_length,
    }
