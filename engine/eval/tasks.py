"""The evaluation tasks behind `python -m engine.eval`: ppl, lambada, mc.

lambada and mc follow lm-evaluation-harness exactly (REFERENCE.md), because the point is to
compare our students with published Pythia numbers:

- a request is (context, continuation); trailing whitespace of the context moves to the
  front of the continuation; context+continuation are encoded together and split at
  len(encode(context)), so the continuation's first token is the one the tokenizer really
  produces at that boundary; an empty context is replaced by the EOS token;
- the model sees (context+continuation)[-(max_length+1):][:-1], i.e. truncation from the
  left, and the last len(continuation) positions are scored;
- lambada: ppl = exp(-mean over documents of ll), acc = all continuation tokens greedy;
  mc: acc = argmax ll, acc_norm = argmax ll / len(choice in characters).

Requests are sorted by length (longest first, so an out-of-memory shows up in the first
batch), right-padded into batches and scored with `engine.eval.score_batch`; the results are
put back in input order.

ppl scores every token of every document given the document's own preceding tokens (an EOS
stands before the first), in windows of at most max_length inputs; with a stride S < max_length
each later window re-reads max_length - S tokens of context and scores only its new tokens,
like the harness's rolling log-likelihood (S = max_length) and the Hugging Face stride recipe.
A jsonl document is tokenised as data.preprocess stores it (its tokens, then EOS), so the
same text gives the same number from a jsonl file and from its shards.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

from engine.eval import (
    IGNORE_INDEX,
    eval_mode,
    heldout_metrics,
    perplexity,
    score_batch,
)
from engine.step import model_device

TASKS = ("ppl", "lambada", "mc")
# Documents buffered by the ppl task before sorting their windows by length and scoring them.
PPL_BUFFER_WINDOWS = 512

T = TypeVar("T")


class EvalInputError(ValueError):
    """A data file, tokenizer or model that cannot be evaluated; the message names it."""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises with file:line.

    The bytes come from data.jsonl.iter_lines (streamed, .zst or plain, a truncated or corrupt
    .zst raises naming the file): an evaluation file is small, but a ppl corpus is the Pile.
    """
    from data.jsonl import InputError, iter_lines

    path = Path(path)
    if not path.is_file():
        raise EvalInputError(f"{path}: data file not found")
    try:
        for line_no, raw in enumerate(iter_lines(path), start=1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as error:
                raise EvalInputError(
                    f"{path}:{line_no}: invalid UTF-8 at byte {error.start}"
                ) from None
            except json.JSONDecodeError as error:
                raise EvalInputError(
                    f"{path}:{line_no}: malformed JSON ({error.msg} at column {error.colno})"
                ) from None
            if not isinstance(obj, dict):
                raise EvalInputError(
                    f"{path}:{line_no}: expected a JSON object, got {type(obj).__name__}"
                )
            yield line_no, obj
    except InputError as error:  # unreadable compressed data: one error type for callers
        raise EvalInputError(str(error)) from error


def read_documents(path: str | Path, limit: int | None, parse: Callable[[dict, int], T]) -> list[T]:
    """parse(object, line number) for each line of a task file, at most `limit` of them.

    An empty file (or one of only blank lines) raises: a task needs at least one document.
    """
    docs = []
    for line_no, obj in read_jsonl(path):
        docs.append(parse(obj, line_no))
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise EvalInputError(f"{path}: no documents")
    return docs


def _field(obj: dict, key: str, kind, path, line_no):
    if key not in obj:
        raise EvalInputError(f"{path}:{line_no}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise EvalInputError(
            f"{path}:{line_no}: field {key!r} must be {getattr(kind, '__name__', kind)}, "
            f"got {type(value).__name__}"
        )
    return value


# --------------------------------------------------------------------------------------
# Tokenisation
# --------------------------------------------------------------------------------------


class TextEncoder:
    """A tokenizers.Tokenizer used exactly as the harness uses a HF tokenizer: no added
    special tokens, EOS = <|endoftext|> (Pythia: 0)."""

    def __init__(self, path: str | Path, *, eos_id: int = 0):
        from tokenizers import Tokenizer

        self.path = Path(path)
        if not self.path.is_file():
            raise EvalInputError(f"{self.path}: tokenizer file not found")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as error:  # tokenizers raises a plain Exception on bad JSON
            raise EvalInputError(f"{self.path}: not a tokenizers JSON file ({error})") from None
        self.vocab_size = self.tokenizer.get_vocab_size(with_added_tokens=True)
        found = self.tokenizer.token_to_id("<|endoftext|>")
        self.eos_id = eos_id if found is None else found

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        if not texts:
            return []
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encodings]

    def check_fits(self, model_vocab: int, model_name: str) -> None:
        """Token ids >= the model's vocab_size would index past its embedding: refuse."""
        if self.vocab_size > model_vocab:
            raise EvalInputError(
                f"tokenizer {self.path} has {self.vocab_size} tokens but model {model_name} "
                f"has vocab_size {model_vocab}: they do not belong together"
            )


@dataclass
class Request:
    """One log-likelihood question: score `continuation` token ids after `context` ids."""

    context: list[int]
    continuation: list[int]


def encode_requests(encoder: TextEncoder, pairs: Sequence[tuple[str, str]]) -> list[Request]:
    """Harness tokenisation of (context, continuation) string pairs, batched for speed.

    One deliberate difference: a context of only whitespace is treated like an empty one
    (EOS, then its whitespace leads the continuation). The harness would split such a pair at
    zero context tokens and leave the first continuation token without a prediction.
    """
    contexts, continuations = [], []
    for context, continuation in pairs:
        stripped = context.rstrip()
        continuations.append(context[len(stripped) :] + continuation)
        contexts.append(stripped)
    wholes = encoder.encode_batch([c + k for c, k in zip(contexts, continuations, strict=True)])
    # Each distinct context is encoded once (mc repeats it for every choice). An empty
    # context's whole is its continuation alone, which follows EOS.
    distinct = list(dict.fromkeys(c for c in contexts if c))
    encoded = encoder.encode_batch(distinct)
    split_at = {c: len(ids) for c, ids in zip(distinct, encoded, strict=True)}
    requests = []
    for context, whole in zip(contexts, wholes, strict=True):
        if not context:
            requests.append(Request([encoder.eos_id], whole))
        else:
            split = split_at[context]
            requests.append(Request(whole[:split], whole[split:]))
    return requests


# --------------------------------------------------------------------------------------
# Progress
# --------------------------------------------------------------------------------------


class Progress:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, total: int | None, unit: str, enabled: bool | None = None):
        self.label, self.total, self.unit = label, total, unit
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self.last_draw = 0.0

    def update(self, count: int, tokens: int = 0) -> None:
        self.done += count
        self.tokens += tokens
        now = time.perf_counter()
        if self.enabled and now - self.last_draw > 0.2:
            self.last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.tokens / max(now - self.start, 1e-9)
        if self.total:
            filled = int(30 * self.done / self.total)
            bar = "#" * filled + "." * (30 - filled)
            text = f"{self.label} [{bar}] {self.done}/{self.total} {self.unit}"
        else:
            text = f"{self.label} {self.done} {self.unit}"
        sys.stderr.write(f"\r{text}  {rate:,.0f} tok/s ")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            self._draw(time.perf_counter())
            sys.stderr.write("\n")
            sys.stderr.flush()


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


def request_items(
    requests: Sequence[Request], max_length: int, where: Callable[[int], str]
) -> list[tuple[list[int], list[int]]]:
    """Harness truncation: inputs = (context+continuation)[-(max_length+1):][:-1]."""
    items = []
    for i, request in enumerate(requests):
        if not request.continuation:
            raise EvalInputError(f"{where(i)}: the continuation encodes to no tokens")
        if len(request.continuation) > max_length:
            raise EvalInputError(
                f"{where(i)}: the continuation has {len(request.continuation)} tokens, more "
                f"than max_length {max_length}: it cannot be scored"
            )
        whole = (request.context + request.continuation)[-(max_length + 1) :]
        items.append((whole[:-1], request.continuation))
    return items


def score_requests(
    setup: ScoringSetup, requests: Sequence[Request], where: Callable[[int], str], label: str
) -> tuple[np.ndarray, np.ndarray]:
    """Log-likelihood and greedy match of each request (the harness's loglikelihood)."""
    items = request_items(requests, setup.max_length, where)
    progress = Progress(label, len(items), "requests", setup.progress)
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


def evaluate_lambada(
    setup: ScoringSetup,
    encoder: TextEncoder,
    path: str | Path,
    limit: int | None = None,
    samples: bool = False,
) -> dict:
    """lambada_openai: ppl and acc; with `samples`, each document's line, ll and greedy."""

    def parse(obj: dict, line_no: int) -> tuple[int, tuple[str, str]]:
        text = _field(obj, "text", str, path, line_no)
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
    context = _field(obj, "context", str, path, line_no)
    choices = _field(obj, "choices", list, path, line_no)
    gold = _field(obj, "gold", int, path, line_no)
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


def evaluate_mc(
    setup: ScoringSetup,
    encoder: TextEncoder,
    path: str | Path,
    limit: int | None = None,
    samples: bool = False,
) -> dict:
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


def rolling_windows(
    tokens: Sequence[int], prefix_id: int, max_length: int, stride: int
) -> list[tuple[Sequence[int], Sequence[int]]]:
    """(inputs, targets) windows that score every token of `tokens` exactly once.

    The sequence read is [prefix_id] + tokens. The first window reads up to max_length inputs
    and scores all its predictions; each later window scores the next `stride` tokens and
    reads as much preceding context as fits in max_length.
    """
    if not 0 < stride <= max_length:
        raise ValueError(f"stride must be in [1, max_length={max_length}], got {stride}")
    sequence = np.concatenate(
        [np.asarray([prefix_id], dtype=np.int64), np.asarray(tokens, dtype=np.int64)]
    )
    n = len(sequence) - 1  # tokens to predict: sequence[1..n]
    windows = []
    scored = 0
    while scored < n:
        end = min(n, max_length if scored == 0 else scored + stride)  # last predicted index
        begin = max(0, end - max_length)  # first input index
        windows.append((sequence[begin:end], sequence[scored + 1 : end + 1]))
        scored = end
    return windows


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


def _corpus_documents(
    data: Path, encoder: TextEncoder | None, model_vocab: int, eos_id: int
) -> Iterator[tuple[str | None, np.ndarray]]:
    """(pile_set_name or None, tokens) per document of a jsonl corpus or of shards."""
    if data.is_dir() or data.suffix in (".idx", ".bin"):
        from data.shards import ShardSet

        shards = ShardSet(data)
        for i in range(len(shards)):
            tokens = np.asarray(shards.doc(i), dtype=np.int64)
            if tokens.size and int(tokens.max()) >= model_vocab:
                raise EvalInputError(
                    f"{data}: document {i} holds token id {int(tokens.max())} but the model's "
                    f"vocab_size is {model_vocab}: shards and model do not belong together"
                )
            yield None, tokens
        return
    if encoder is None:
        raise EvalInputError(
            f"{data}: a text corpus needs --tokenizer (or a model folder with tokenizer.json)"
        )
    batch: list[tuple[str | None, str]] = []

    def flush():
        encoded = encoder.encode_batch([text for _, text in batch])
        for (name, _), ids in zip(batch, encoded, strict=True):
            yield name, np.asarray([*ids, eos_id], dtype=np.int64)
        batch.clear()

    for line_no, obj in read_jsonl(data):
        text = _field(obj, "text", str, data, line_no)
        if not text:
            continue  # data.preprocess skips empty documents too
        meta = obj.get("meta")
        name = meta.get("pile_set_name") if isinstance(meta, dict) else None
        batch.append((name if isinstance(name, str) else None, text))
        if len(batch) >= 256:
            yield from flush()
    if batch:
        yield from flush()


def _window_batches(
    windows: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int,
    device: torch.device,
    progress: Progress,
) -> Iterator[dict[str, torch.Tensor]]:
    """Windows as heldout_metrics batches: longest first, right-padded, labels -100 elsewhere."""
    for chosen, input_ids, labels in _sorted_batches(windows, batch_size):
        yield {"input_ids": input_ids.to(device), "labels": labels.to(device)}
        progress.update(len(chosen), tokens=int(input_ids.numel()))


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
    temperature: float = 2.0,
) -> dict:
    """Token perplexity of a corpus, overall and per meta.pile_set_name when present.

    Scored through heldout_metrics, one call per pile_set_name group and buffer of windows,
    so with a teacher the KD and teacher CE come out per group as well.
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
    progress = Progress("ppl", None, "windows", setup.progress)
    device = model_device(setup.model)

    def score_pending():
        for name, windows in pending.items():
            metrics = heldout_metrics(
                setup.model,
                _window_batches(windows, setup.batch_size, device, progress),
                teacher=teacher,
                temperature=temperature,
                valid_vocab=setup.valid_vocab,
                autocast_dtype=setup.autocast_dtype,
            )
            overall.add(metrics)
            if name is not None:
                by_set[name].add(metrics)
        pending.clear()

    try:
        buffered = 0
        for name, tokens in _corpus_documents(path, encoder, model_vocab, eos_id):
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
    temperature: float = 2.0,
) -> dict:
    """The training run's validation, reproduced: the loader's val split of a shard folder.

    Same dataset (packed windows or padded documents of max_length tokens), same held-out
    items (data.loader.validation_indices), same heldout_metrics: with the run's seq_len,
    val_fraction and valid_vocab this gives the numbers of its metrics.jsonl (val_*). `limit`
    counts sequences.
    """
    from data.loader import BatchLoader, PackedDataset, PaddedDataset

    path = Path(path)
    if not path.exists():
        raise EvalInputError(f"{path}: data not found")
    if packed:
        dataset = PackedDataset(path, setup.max_length)
    else:
        dataset = PaddedDataset(path, setup.max_length, pad_id=pad_id)
    loader = BatchLoader(
        dataset,
        setup.batch_size,
        split="val",
        val_fraction=val_fraction,
        rank=0,
        world_size=1,
        device=model_device(setup.model),
        drop_last=False,
    )
    if len(loader.items) == 0:
        raise EvalInputError(
            f"{path}: val_fraction {val_fraction} of {len(dataset)} sequences holds out none"
        )
    progress = Progress("heldout", len(loader.items), "sequences", setup.progress)

    def batches():
        remaining = len(loader.items) if limit is None else min(limit, len(loader.items))
        for batch in loader:
            if remaining <= 0:
                return
            batch = {key: value[:remaining] for key, value in batch.items()}
            remaining -= batch["input_ids"].shape[0]
            yield batch
            progress.update(batch["input_ids"].shape[0], tokens=int(batch["input_ids"].numel()))

    try:
        metrics = heldout_metrics(
            setup.model,
            batches(),
            teacher=teacher,
            temperature=temperature,
            valid_vocab=setup.valid_vocab,
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
