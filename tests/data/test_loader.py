"""Packed and padded datasets, and the shuffling, rank-splitting, resumable loader."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from engine.data.loader import (
    BatchLoader,
    PackedDataset,
    PaddedDataset,
    build_dataset,
    validation_indices,
)
from engine.data.shards import ShardWriter


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    """Three shards of random documents (lengths 1..60, one much longer)."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(5)
    docs = []
    for k, count in enumerate([13, 1, 29]):
        group = [rng.integers(2, 50277, size=int(rng.integers(1, 60))) for _ in range(count)]
        if k == 2:
            group[3] = rng.integers(2, 50277, size=300)
        for d in group:
            d[-1] = 0  # EOS, as preprocess stores it
        writer = ShardWriter(folder / f"shard_{k:05d}", np.uint16)
        writer.add_documents(np.concatenate(group), np.array([len(d) for d in group]))
        writer.finish()
        docs.extend(group)
    return folder, docs


class IndexDataset:
    """Items that carry their own index, to check which items a loader hands out."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"input_ids": torch.tensor([i]), "labels": torch.tensor([i])}

    def fingerprint(self):
        return f"index:{self.n}"


def ids_of(batches):
    return [b["input_ids"][:, 0].tolist() for b in batches]


def flat(lists):
    return list(itertools.chain.from_iterable(lists))


@pytest.mark.parametrize("seq_len", [1, 7, 64, 2048])
def test_packed_windows_reconstruct_the_stream(shard_dir, seq_len):
    folder, docs = shard_dir
    stream = np.concatenate(docs)
    dataset = PackedDataset(folder, seq_len)
    assert len(dataset) == (len(stream) - 1) // seq_len
    labels_all = []
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["input_ids"].dtype == torch.int64 and item["input_ids"].shape == (seq_len,)
        start = i * seq_len
        assert item["input_ids"].tolist() == stream[start : start + seq_len].tolist()
        assert item["labels"].tolist() == stream[start + 1 : start + seq_len + 1].tolist()
        labels_all.extend(item["labels"].tolist())
    # Every token after the first is a target exactly once (up to the last full window).
    assert labels_all == stream[1 : 1 + len(dataset) * seq_len].tolist()


@pytest.mark.parametrize("seq_len", [1, 5, 33])
def test_padded_items_match_their_documents(shard_dir, seq_len):
    folder, docs = shard_dir
    dataset = PaddedDataset(folder, seq_len, pad_id=1)
    assert len(dataset) == len(docs)
    batch = dataset.get_batch(np.arange(len(docs)))
    for i, doc in enumerate(docs):
        kept = doc[: seq_len + 1].tolist()
        padded = kept + [1] * (seq_len + 1 - len(kept))
        assert batch["input_ids"][i].tolist() == padded[:-1]
        expected_labels = [tok if t + 1 < len(kept) else -100 for t, tok in enumerate(padded[1:])]
        assert batch["labels"][i].tolist() == expected_labels
        assert dataset[i]["labels"].tolist() == expected_labels
    assert batch["input_ids"].is_contiguous() and batch["labels"].dtype == torch.int64


def test_loader_is_deterministic_and_reshuffles_each_epoch():
    dataset = IndexDataset(50)
    first = ids_of(itertools.islice(BatchLoader(dataset, 4, seed=3, val_fraction=0.1), 30))
    again = ids_of(itertools.islice(BatchLoader(dataset, 4, seed=3, val_fraction=0.1), 30))
    other = ids_of(itertools.islice(BatchLoader(dataset, 4, seed=4, val_fraction=0.1), 30))
    assert first == again and first != other
    loader = BatchLoader(dataset, 4, seed=3, val_fraction=0.1)
    per_epoch = len(loader)
    assert per_epoch == 45 // 4
    epoch0 = sorted(flat(first[:per_epoch]))
    epoch1 = sorted(flat(first[per_epoch : 2 * per_epoch]))
    assert len(set(epoch0)) == len(epoch0) == per_epoch * 4
    assert first[:per_epoch] != first[per_epoch : 2 * per_epoch]
    assert set(epoch0) | set(epoch1) <= set(range(50)) - set(validation_indices(50, 0.1).tolist())


@pytest.mark.parametrize("world_size", [2, 3])
def test_rank_splits_are_disjoint_and_covering(world_size):
    dataset = IndexDataset(103)
    train = set(range(103)) - set(validation_indices(103, 0.05).tolist())
    for drop_last in (False, True):
        per_rank = []
        for rank in range(world_size):
            loader = BatchLoader(dataset, 4, seed=1, rank=rank, world_size=world_size,
                                 val_fraction=0.05, drop_last=drop_last)
            batches = ids_of(itertools.islice(loader, len(loader)))
            per_rank.append(flat(batches))
        seen = flat(per_rank)
        assert len(seen) == len(set(seen))  # disjoint
        if drop_last:
            assert len({len(items) for items in per_rank}) == 1  # same number of steps per rank
            assert len(train) - len(seen) < world_size * 4
            assert set(seen) <= train
        else:
            assert set(seen) == train  # covering


def test_validation_split_is_fixed_disjoint_and_one_pass(shard_dir):
    folder, _ = shard_dir
    dataset = PackedDataset(folder, 8)
    n = len(dataset)
    val_a = BatchLoader(dataset, 3, seed=0, split="val", val_fraction=0.1)
    val_b = BatchLoader(dataset, 3, seed=123, split="val", val_fraction=0.1)
    batches_a, batches_b = list(val_a), list(val_b)  # one pass: list() terminates
    assert len(batches_a) == len(val_a) == -(-round(n * 0.1) // 3)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches_a, batches_b,
                                                                           strict=True))
    val = set(validation_indices(n, 0.1).tolist())
    assert len(val) == round(n * 0.1)
    train = BatchLoader(dataset, 3, seed=0, val_fraction=0.1)
    assert not val & set(train.items.tolist())
    assert val | set(train.items.tolist()) == set(range(n))
    assert len(list(val_a)) == len(batches_a)  # a second pass is the same pass again


def test_resumed_loader_yields_exactly_the_remaining_batches(shard_dir):
    folder, _ = shard_dir
    for dataset in (PackedDataset(folder, 16), PaddedDataset(folder, 16)):
        reference = list(itertools.islice(BatchLoader(dataset, 3, seed=9), 40))
        for stop in (0, 1, 7, len(BatchLoader(dataset, 3, seed=9)) + 2):
            loader = BatchLoader(dataset, 3, seed=9)
            consumed = list(itertools.islice(loader, stop))
            state = loader.state_dict()
            resumed = BatchLoader(dataset, 3, seed=9)
            resumed.load_state_dict(state)
            rest = list(itertools.islice(resumed, 40 - stop))
            for got, want in zip(consumed + rest, reference, strict=True):
                assert torch.equal(got["input_ids"], want["input_ids"])
                assert torch.equal(got["labels"], want["labels"])


def test_loader_state_refuses_other_data_or_settings(shard_dir):
    folder, _ = shard_dir
    loader = BatchLoader(PackedDataset(folder, 16), 2, seed=1)
    next(iter(loader))
    state = loader.state_dict()
    with pytest.raises(ValueError, match="seed"):
        BatchLoader(PackedDataset(folder, 16), 2, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"num_items|fingerprint"):
        BatchLoader(PackedDataset(folder, 17), 2, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="micro_batch"):
        BatchLoader(PackedDataset(folder, 16), 3, seed=1).load_state_dict(state)


def test_loader_argument_errors(shard_dir):
    folder, _ = shard_dir
    dataset = PackedDataset(folder, 16)
    with pytest.raises(ValueError, match="rank"):
        BatchLoader(dataset, 2, rank=2, world_size=2)
    with pytest.raises(ValueError, match="too few"):
        BatchLoader(dataset, 10_000)
    with pytest.raises(ValueError, match="split"):
        BatchLoader(dataset, 2, split="test")


def test_batches_have_the_training_shape(shard_dir):
    folder, _ = shard_dir
    batch = next(iter(BatchLoader(PackedDataset(folder, 32), 5)))
    assert batch["input_ids"].shape == batch["labels"].shape == (5, 32)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert batch["input_ids"].is_contiguous() and batch["labels"].is_contiguous()


@pytest.mark.gpu
def test_cuda_batches_arrive_on_the_device(shard_dir):
    folder, _ = shard_dir
    batch = next(iter(BatchLoader(PackedDataset(folder, 32), 2, device="cuda")))
    assert batch["input_ids"].is_cuda and batch["labels"].is_cuda
    cpu = next(iter(BatchLoader(PackedDataset(folder, 32), 2)))
    assert torch.equal(batch["input_ids"].cpu(), cpu["input_ids"])


def _distributed_worker(rank, world_size, init_file, out_dir):
    import datetime
    import json
    import os

    from tests.dist_helpers import LOOPBACK_ENV, leave_process_group

    os.environ.update(LOOPBACK_ENV)
    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=300),  # generous: a loaded 2-core machine
    )
    try:
        loader = BatchLoader(IndexDataset(37), 2, seed=4, val_fraction=0.1, drop_last=False)
        seen = flat(ids_of(itertools.islice(loader, len(loader))))
        with open(f"{out_dir}/rank{rank}.json", "w") as handle:
            json.dump({"rank": loader.rank, "world": loader.world_size, "seen": seen}, handle)
    finally:
        leave_process_group()


@pytest.mark.distributed
def test_rank_and_world_size_default_to_torch_distributed(tmp_path):
    import json

    import torch.multiprocessing as mp

    mp.spawn(_distributed_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [(r["rank"], r["world"]) for r in results] == [(0, 2), (1, 2)]
    seen = results[0]["seen"] + results[1]["seen"]
    assert sorted(seen) == sorted(set(range(37)) - set(validation_indices(37, 0.1).tolist()))


def test_build_dataset_picks_the_mode(shard_dir):
    folder, docs = shard_dir
    packed = build_dataset(folder, "packed", 16)
    assert isinstance(packed, PackedDataset) and packed.seq_len == 16
    padded = build_dataset(folder, "padded", 16, pad_id=7)
    assert isinstance(padded, PaddedDataset) and padded.pad_id == 7 and len(padded) == len(docs)
    with pytest.raises(ValueError, match="packed, padded, not 'stacked'"):
        build_dataset(folder, "stacked", 16)
