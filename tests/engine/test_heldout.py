"""engine.eval.heldout: the one validation split, and its limits in batches or sequences."""

from __future__ import annotations

import numpy as np
import torch

from engine.data.loader import PackedDataset, validation_indices
from engine.data.shards import ShardWriter
from engine.eval.heldout import heldout_batches, heldout_loader


def _dataset(tmp_path, seq_len=4):
    tokens = np.arange(2, 2 + 403, dtype=np.int64) % 50
    writer = ShardWriter(tmp_path / "shard_00000", np.uint16)
    writer.add_documents(tokens, np.array([len(tokens)]))
    writer.finish()
    return PackedDataset(tmp_path, seq_len)


def test_heldout_split_is_the_validation_items_in_order(tmp_path):
    dataset = _dataset(tmp_path)
    loader = heldout_loader(dataset, 3, val_fraction=0.1)
    rows = torch.cat([b["input_ids"] for b in heldout_batches(loader)])
    expected = torch.stack([dataset[int(i)]["input_ids"]
                            for i in validation_indices(len(dataset), 0.1)])
    assert torch.equal(rows, expected)  # every held-out item once, none dropped
    # Two ranks share it without overlap and together cover it.
    shares = [torch.cat([b["input_ids"] for b in heldout_batches(
        heldout_loader(dataset, 3, val_fraction=0.1, rank=r, world_size=2))]) for r in (0, 1)]
    assert len(shares[0]) + len(shares[1]) == len(expected)


def test_limits_in_batches_and_in_sequences(tmp_path):
    loader = heldout_loader(_dataset(tmp_path), 3, val_fraction=0.1)
    assert [len(b["input_ids"]) for b in heldout_batches(loader, max_batches=2)] == [3, 3]
    assert [len(b["labels"]) for b in heldout_batches(loader, max_sequences=7)] == [3, 3, 1]
    assert sum(len(b["input_ids"]) for b in heldout_batches(loader)) == 10
