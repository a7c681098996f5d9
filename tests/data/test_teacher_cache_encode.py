"""The teacher cache's batch encoder: byte-identical to the per-block encoder it replaced (one
host copy per block), and one host copy per batch, with nothing else read back on the way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import engine.data.teacher_cache_encode as encode
import engine.data.teacher_cache_job as job
from engine.data.loader import build_dataset
from engine.data.teacher_cache_encode import (
    LOG_PROB_FLOOR,
    encode_batch,
    record_dtype,
    sampled_entries,
    teacher_scores,
    top_k_entries,
)
from engine.teacher_cache import build_teacher_cache
from tests.cache_assets import SEQ_LEN, make_cache_assets


def per_block_records(chunks, *, kind, width, temperature, valid_vocab, dtype, generator):
    """The encoder as it was before batch encoding: each block of ENCODE_BLOCK_ELEMENTS
    encoded and copied to the host field by field (four copies per block), chunk by chunk."""
    parts = []
    for logits in chunks:
        records = np.zeros(logits.shape[0], dtype=dtype)
        step = max(1, encode.ENCODE_BLOCK_ELEMENTS // max(1, logits.shape[-1]))
        for start in range(0, logits.shape[0], step):
            out = records[start:start + step]
            scores, lse = teacher_scores(logits[start:start + step], temperature, valid_vocab)
            if kind == "top_k":
                ids, values, aux = top_k_entries(scores, width, lse)
                count = torch.full((scores.shape[0],), width)
                values = values.clamp_min(LOG_PROB_FLOOR)
            else:
                ids, values, count, aux = sampled_entries(scores, width, generator, lse)
            out["ids"] = ids.cpu().numpy()
            out["values"] = values.cpu().numpy()
            out["aux"] = aux.float().cpu().numpy()
            out["count"] = count.cpu().numpy()
        parts.append(records)
    return np.concatenate(parts)


def logit_chunks(vocab=300, rows=(50, 23, 7), seed=0):
    """Chunks of random logits, some rows so peaked that top-k takes the exact-tail path."""
    gen = torch.Generator().manual_seed(seed)
    chunks = [torch.randn(n, vocab, generator=gen) * 3 for n in rows]
    chunks[0][::5, 7] += 60.0
    chunks[1][3, 11] += 200.0
    return chunks


@pytest.mark.parametrize("sync_free", [False, True])
@pytest.mark.parametrize(("kind", "width", "values"), [("top_k", 16, "float16"),
                                                       ("sampled", 24, "uint16")])
def test_batch_encoding_is_byte_identical_to_the_per_block_encoder(monkeypatch, kind, width,
                                                                   values, sync_free):
    monkeypatch.setattr(encode, "ENCODE_BLOCK_ELEMENTS", 300 * 9)  # several blocks per chunk
    dtype = record_dtype(width, "uint16", values)
    options = dict(kind=kind, width=width, temperature=2.0, valid_vocab=290, dtype=dtype)
    old = per_block_records(logit_chunks(), generator=torch.Generator().manual_seed(5),
                            **options)
    new = encode_batch(logit_chunks(), generator=torch.Generator().manual_seed(5),
                       sync_free=sync_free, **options)
    assert new.tobytes() == old.tobytes()
    if kind == "top_k":  # the exact-tail rows were there to compare
        assert np.any(np.exp(old["aux"].astype(np.float64)) < 1 - encode.EXACT_TAIL_ABOVE)


HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy,
              torch.Tensor.nonzero, torch.nonzero, torch.Tensor.__bool__, torch.Tensor.__int__,
              torch.Tensor.__float__, torch.Tensor.__index__}


class HostReads(torch.overrides.TorchFunctionMode):
    """Records every tensor operation that reads device values back to the host."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind", ["top_k", "sampled"])
def test_the_device_path_reads_back_once_per_batch(monkeypatch, kind):
    """On a GPU every host read is a synchronisation: the device path (sync_free) makes none
    while encoding, and exactly one copy of the batch's entries (entries_to_host)."""
    copies = []
    real_copy = encode.entries_to_host
    mode = HostReads()

    def counted_copy(entries):
        copies.append(sorted(entries))
        with torch.overrides._pop_mode_temporarily():  # the one allowed copy
            return real_copy(entries)

    monkeypatch.setattr(encode, "ENCODE_BLOCK_ELEMENTS", 300 * 9)
    monkeypatch.setattr(encode, "entries_to_host", counted_copy)
    dtype = record_dtype(16, "uint16", "float16" if kind == "top_k" else "uint16")
    with mode:
        encode_batch(logit_chunks(), kind=kind, width=16, temperature=2.0, valid_vocab=290,
                     dtype=dtype, generator=torch.Generator().manual_seed(1), sync_free=True)
    assert mode.calls == []
    assert copies == [sorted(encode.ENTRY_FIELDS)]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_cache_assets(tmp_path_factory.mktemp("encode-assets"))


def build(assets, out, **kind):
    return build_teacher_cache(str(assets["teacher"]), str(assets["data"]), str(out),
                               seq_len=SEQ_LEN, dtype="fp32", device="cpu", batch=8,
                               show_progress=False, **kind)


@pytest.mark.parametrize("kind", [dict(top_k=8), dict(samples=16)], ids=["top_k", "sampled"])
def test_a_build_is_byte_identical_and_copies_once_per_batch(assets, tmp_path, monkeypatch,
                                                            kind):
    copies = []
    real_copy = encode.entries_to_host
    monkeypatch.setattr(encode, "entries_to_host",
                        lambda entries: copies.append(1) or real_copy(entries))
    build(assets, tmp_path / "batch", **kind)
    items = len(build_dataset(assets["data"], "packed", SEQ_LEN))
    assert len(copies) == -(-items // 8) > 1  # one copy per batch of 8 items
    monkeypatch.setattr(job, "encode_batch", per_block_records)
    build(assets, tmp_path / "old", **kind)
    new_files = {p.name: p.read_bytes() for p in sorted((tmp_path / "batch").iterdir())}
    old_files = {p.name: p.read_bytes() for p in sorted((tmp_path / "old").iterdir())}
    assert new_files == old_files
