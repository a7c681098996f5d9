"""Token ids against a model's embedding: a clear error before a lookup could fail.

An id outside the embedding raises IndexError on the CPU and a device-side assert on CUDA
(which also ruins the CUDA context for the rest of the process). Shards from another
tokenizer, a pad id past the vocabulary or a model smaller than its tokenizer all end there,
so training, `engine.eval --heldout` and `engine.generate` check the ids first: one min/max
per batch, on the batch's CPU copy where there is one.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch

from engine.kernels.constants import IGNORE_INDEX


class TokenIdError(ValueError):
    """Token ids that the model cannot embed or score; the message says where they came from."""


def check_ids(ids: torch.Tensor, rows: int, what: str) -> None:
    """Every id in [0, rows), else TokenIdError naming `what`, the id and the row count."""
    if ids.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(ids)).tolist()
    if low < 0 or high >= rows:
        bad = high if high >= rows else low
        raise TokenIdError(
            f"{what}: token id {bad} is outside the model's embedding of {rows} rows "
            "(data made with another tokenizer, or a model too small for it)"
        )


def check_batch(batch: dict[str, torch.Tensor], rows: int, what: str,
                label_limit: int | None = None) -> None:
    """input_ids in [0, rows); labels (IGNORE_INDEX aside) in [0, label_limit or rows)."""
    check_ids(batch["input_ids"], rows, what)
    labels = batch["labels"]
    check_ids(labels[labels != IGNORE_INDEX], label_limit or rows, what + " (labels)")


def checked_batches(batches: Iterable[dict[str, torch.Tensor]], rows: int, what: str,
                    label_limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """`batches`, each checked by check_batch before it is handed on."""
    for number, batch in enumerate(batches):
        check_batch(batch, rows, f"{what}, batch {number}", label_limit)
        yield batch
