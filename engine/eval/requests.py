"""What the evaluation tasks score, built from data files: token requests and windows.

lambada and mc follow lm-evaluation-harness exactly, because the point is to compare our
students with published Pythia numbers:

- a request is (context, continuation); trailing whitespace of the context moves to the
  front of the continuation; context+continuation are encoded together and split at
  len(encode(context)), so the continuation's first token is the one the tokenizer really
  produces at that boundary; an empty context is replaced by the EOS token;
- the model sees (context+continuation)[-(max_length+1):][:-1], i.e. truncation from the
  left, and the last len(continuation) positions are scored.

ppl reads documents (jsonl text tokenised as engine.data.preprocess stores it: its tokens, then
EOS; or token shards) and cuts them into rolling windows that score every token once.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from engine.data.jsonl import InputError, iter_lines
from engine.data.shards import ShardSet

T = TypeVar("T")


class EvalInputError(ValueError):
    """A data file, tokenizer or model that cannot be evaluated; the message names it."""


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-blank line; a bad line raises with file:line.

    The bytes come from engine.data.jsonl.iter_lines (streamed, .zst or plain, a truncated or
    corrupt
    .zst raises naming the file): an evaluation file is small, but a ppl corpus is the Pile.
    """
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


def field_of(obj: dict, key: str, kind, path, line_no):
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
# Tokenisation and requests
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



# --------------------------------------------------------------------------------------
# Documents and windows (ppl)
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


def corpus_documents(
    data: Path, encoder: TextEncoder | None, model_vocab: int, eos_id: int
) -> Iterator[tuple[str | None, np.ndarray]]:
    """(pile_set_name or None, tokens) per document of a jsonl corpus or of shards."""
    if data.is_dir() or data.suffix in (".idx", ".bin"):
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
        text = field_of(obj, "text", str, data, line_no)
        if not text:
            continue  # engine.data.preprocess skips empty documents too
        meta = obj.get("meta")
        name = meta.get("pile_set_name") if isinstance(meta, dict) else None
        batch.append((name if isinstance(name, str) else None, text))
        if len(batch) >= 256:
            yield from flush()
    if batch:
        yield from flush()
