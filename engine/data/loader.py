"""Training items from token shards, and the loader that turns them into micro-batches.

Two ways to make fixed-length training sequences out of documents (the two data variants of
the seed recipe):

- ``PackedDataset``: documents concatenated in stored order (each already ends in EOS), cut
  into windows of seq_len + 1 tokens that start every seq_len tokens; inputs = window[:-1],
  labels = window[1:]. Consecutive windows share one boundary token, as in Megatron's
  GPTDataset (and so EleutherAI's 2049-token Pythia samples): that way every token of the
  stream except the very first is a training target exactly once.
- ``PaddedDataset``: one document per item, truncated to seq_len + 1 tokens and padded with
  ``pad_id``; labels are IGNORE_INDEX wherever the target position is padding.

EleutherAI's preshuffled Pythia idxmaps store one 2049-token sample per sequence, so
``PaddedDataset(path, 2048)`` over them yields exactly Pythia's training samples (no padding).

``BatchLoader`` shuffles items deterministically from (seed, epoch), splits them across
ranks, holds out a fixed validation split, and can resume exactly from ``state_dict()``.

No zstandard here: the GPU machine trains from finished shards without it.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from engine.data.shards import IndexedShard, ShardSet
from engine.kernels.constants import IGNORE_INDEX


def open_shards(path) -> ShardSet:
    """A ShardSet from a folder, a prefix, a list of prefixes, or an open shard/set."""
    if isinstance(path, ShardSet):
        return path
    if isinstance(path, IndexedShard):
        return ShardSet([path.bin_path.with_suffix("")])
    return ShardSet(path)


class PackedDataset:
    """Constant-length windows over the concatenated token stream (stride seq_len)."""

    def __init__(self, path, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, not {seq_len}")
        self.shards = open_shards(path)
        self.seq_len = seq_len
        self._length = max(self.shards.total_tokens - 1, 0) // seq_len

    def __len__(self) -> int:
        return self._length

    def fingerprint(self) -> str:
        return f"packed:{self.seq_len}:{self.shards.fingerprint()}"

    def window(self, i: int) -> np.ndarray:
        """The seq_len + 1 tokens of item i (a zero-copy view unless it spans two shards)."""
        if not 0 <= i < self._length:
            raise IndexError(f"window {i} out of range ({self._length} windows)")
        start = i * self.seq_len
        return self.shards.token_slice(start, start + self.seq_len + 1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        batch = self.get_batch(np.array([i]))
        return {k: v[0] for k, v in batch.items()}

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        input_ids = torch.empty((len(indices), self.seq_len), dtype=torch.int64)
        labels = torch.empty((len(indices), self.seq_len), dtype=torch.int64)
        inputs_np, labels_np = input_ids.numpy(), labels.numpy()
        for row, i in enumerate(indices.tolist()):
            window = self.window(i)
            inputs_np[row] = window[:-1]  # the one unavoidable copy: uint16 -> int64
            labels_np[row] = window[1:]
        return {"input_ids": input_ids, "labels": labels}


class PaddedDataset:
    """One document per item, truncated to seq_len + 1 tokens, padded with pad_id."""

    def __init__(self, path, seq_len: int, pad_id: int = 1):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, not {seq_len}")
        self.shards = open_shards(path)
        self.seq_len = seq_len
        self.pad_id = pad_id

    def __len__(self) -> int:
        return len(self.shards)

    def fingerprint(self) -> str:
        return f"padded:{self.seq_len}:{self.pad_id}:{self.shards.fingerprint()}"

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range ({len(self)} documents)")
        batch = self.get_batch(np.array([i]))
        return {k: v[0] for k, v in batch.items()}

    def get_batch(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        width = self.seq_len + 1
        tokens = torch.full((len(indices), width), self.pad_id, dtype=torch.int64)
        labels = torch.full((len(indices), self.seq_len), IGNORE_INDEX, dtype=torch.int64)
        tokens_np, labels_np = tokens.numpy(), labels.numpy()
        for row, i in enumerate(indices.tolist()):
            doc = self.shards.doc(i)[:width]
            n = len(doc)
            tokens_np[row, :n] = doc
            # Position t predicts token t + 1: a real target only while t + 1 < n.
            labels_np[row, : max(n - 1, 0)] = doc[1:]
        return {"input_ids": tokens[:, :-1].contiguous(), "labels": labels}


DATASET_MODES = ("packed", "padded")


def build_dataset(path: str | os.PathLike, mode: str, seq_len: int, pad_id: int = 1):
    """The dataset for a data mode: "packed" windows or "padded" documents of seq_len tokens."""
    if mode == "packed":
        return PackedDataset(path, seq_len)
    if mode == "padded":
        return PaddedDataset(path, seq_len, pad_id=pad_id)
    raise ValueError(f"data mode must be one of {', '.join(DATASET_MODES)}, not {mode!r}")


def validation_indices(num_items: int, val_fraction: float) -> np.ndarray:
    """A fixed, seed-independent set of round(n * fraction) items spread evenly over the data.

    Evenly spaced rather than random so it never depends on a seed or a numpy version, and
    covers all shards/sources in proportion.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), not {val_fraction}")
    count = round(num_items * val_fraction)
    if val_fraction > 0 and count == 0 and num_items > 1:
        count = 1
    k = np.arange(count, dtype=np.int64)
    return (2 * k + 1) * num_items // (2 * count) if count else k


def _distributed_rank_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class BatchLoader:
    """Deterministic, rank-split, resumable micro-batches over a dataset.

    split="train": loops over epochs forever; epoch e uses a permutation of the training
    items drawn from (seed, e); rank r takes every world_size-th item of it, so ranks are
    disjoint and together cover the epoch (with drop_last, the at most world_size *
    micro_batch - 1 left-over items of that epoch's permutation are skipped).
    split="val": one pass over the held-out items in order, never dropping any; every new
    iteration starts the pass afresh.
    """

    def __init__(self, dataset, micro_batch: int, *, seed: int = 0, rank: int | None = None,
                 world_size: int | None = None, split: str = "train",
                 val_fraction: float = 0.01, device: str | torch.device = "cpu",
                 drop_last: bool = True):
        if micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, not {micro_batch}")
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        default_rank, default_world = _distributed_rank_world()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} outside world_size {self.world_size}")
        self.dataset = dataset
        self.micro_batch = micro_batch
        self.seed = seed
        self.split = split
        self.val_fraction = val_fraction
        self.device = torch.device(device)
        self.drop_last = drop_last and split == "train"
        n = len(dataset)
        val = validation_indices(n, val_fraction)
        if split == "val":
            self.items = val
        else:
            keep = np.ones(n, dtype=bool)
            keep[val] = False
            self.items = np.flatnonzero(keep)
        if split == "train" and len(self) == 0:
            raise ValueError(
                f"{len(self.items)} training items are too few for micro_batch {micro_batch} "
                f"x world_size {self.world_size}"
            )
        self.epoch = 0
        self.position = 0  # batches already yielded in this epoch
        self._fingerprint = dataset.fingerprint() if hasattr(dataset, "fingerprint") else None

    def _rank_items(self, epoch: int) -> np.ndarray:
        items = self.items
        if self.split == "train":
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, epoch])))
            items = items[rng.permutation(len(items))]
        if self.drop_last:
            per_step = self.world_size * self.micro_batch
            items = items[: len(items) // per_step * per_step]
        return items[self.rank :: self.world_size]

    def __len__(self) -> int:
        n, world = len(self.items), self.world_size
        if self.drop_last:
            return n // (world * self.micro_batch)
        per_rank = max(n - self.rank + world - 1, 0) // world  # len(items[rank::world])
        return -(-per_rank // self.micro_batch)

    def _collate(self, indices: np.ndarray) -> dict[str, torch.Tensor]:
        if hasattr(self.dataset, "get_batch"):
            return self.dataset.get_batch(indices)
        items = [self.dataset[int(i)] for i in indices]
        return {k: torch.stack([item[k] for item in items]) for k in items[0]}

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return batch
        if self.device.type == "cuda":
            # Pinned host memory lets the copy run asynchronously with compute.
            return {k: v.pin_memory().to(self.device, non_blocking=True) for k, v in batch.items()}
        return {k: v.to(self.device) for k, v in batch.items()}

    def __iter__(self):
        if self.split == "val":
            self.position = 0  # every iteration is the whole split, even after a cut-short one
        while True:
            items = self._rank_items(self.epoch)
            while self.position * self.micro_batch < len(items):
                start = self.position * self.micro_batch
                indices = items[start : start + self.micro_batch]
                self.position += 1
                yield self._to_device(self._collate(indices))
            if self.split == "val":
                self.position = 0
                return
            self.epoch += 1
            self.position = 0

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "split": self.split,
            "micro_batch": self.micro_batch,
            "world_size": self.world_size,
            "val_fraction": self.val_fraction,
            "drop_last": self.drop_last,
            "num_items": len(self.dataset),
            "fingerprint": self._fingerprint,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where the saved loader stopped; refuse a different data order."""
        current = self.state_dict()
        for key in ("seed", "split", "micro_batch", "world_size", "val_fraction", "drop_last",
                    "num_items", "fingerprint"):
            mine = current[key]
            if state.get(key) != mine:
                raise ValueError(
                    f"loader state does not match this loader: {key} is {state.get(key)!r} "
                    f"in the state but {mine!r} here"
                )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
