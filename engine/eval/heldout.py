"""The held-out split of a token dataset: the one place that says which batches are "val".

The training loop's validation, the quickstart's comparison table and `engine.eval --heldout`
all score these batches, so their numbers agree: the same items (engine.data.loader
.validation_indices, fixed and seed-independent), in the same order, none dropped.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

from engine.data.loader import BatchLoader


def heldout_loader(
    dataset,
    micro_batch: int,
    *,
    val_fraction: float,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
) -> BatchLoader:
    """One pass over the validation items, this rank's share, in order, in micro-batches."""
    return BatchLoader(
        dataset,
        micro_batch,
        rank=rank,
        world_size=world_size,
        split="val",
        val_fraction=val_fraction,
        device=device,
        drop_last=False,
    )


def heldout_batches(
    loader: BatchLoader,
    *,
    max_batches: int | None = None,
    max_sequences: int | None = None,
) -> Iterator[dict[str, torch.Tensor]]:
    """The loader's batches, stopping after `max_batches` batches or `max_sequences` rows
    (the last batch cut short); None means the whole split."""
    remaining = max_sequences
    for number, batch in enumerate(loader):
        if max_batches is not None and number >= max_batches:
            return
        if remaining is not None:
            if remaining <= 0:
                return
            batch = {key: value[:remaining] for key, value in batch.items()}
            remaining -= batch["input_ids"].shape[0]
        yield batch
