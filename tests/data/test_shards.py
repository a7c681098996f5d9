"""Megatron .bin/.idx writer and the reader's validation at open."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from engine.data.shards import IndexedShard, ShardError, ShardSet, ShardWriter, encode_index
from tests.data.common import read_docs_from_spec, read_idx_from_spec


def random_docs(seed: int, count: int, high: int = 50277, max_len: int = 40) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, high, size=int(rng.integers(1, max_len))) for _ in range(count)]


def write_shard(prefix, docs, dtype=np.uint16) -> dict:
    writer = ShardWriter(prefix, dtype)
    # Two calls: documents may arrive in several groups.
    half = len(docs) // 2
    for group in (docs[:half], docs[half:]):
        if group:
            writer.add_documents(np.concatenate(group), np.array([len(d) for d in group]))
    return writer.finish()


def test_written_shard_reads_back_with_spec_reader_and_indexed_shard(tmp_path):
    docs = random_docs(0, 23)
    entry = write_shard(tmp_path / "shard_00000", docs)
    assert entry["documents"] == 23 and entry["tokens"] == sum(len(d) for d in docs)
    index = read_idx_from_spec(tmp_path / "shard_00000.idx")
    assert index["version"] == 1 and index["dtype"] == np.dtype("<u2")
    assert index["doc_idx"] == list(range(24))
    assert read_docs_from_spec(tmp_path / "shard_00000") == [d.tolist() for d in docs]

    shard = IndexedShard(tmp_path / "shard_00000.bin")  # .bin, .idx or bare prefix all work
    assert len(shard) == 23 and shard.total_tokens == entry["tokens"]
    assert shard.sizes.tolist() == [len(d) for d in docs]
    for i, d in enumerate(docs):
        view = shard.doc(i)
        assert view.tolist() == d.tolist()
        assert not view.flags.writeable  # a view into the read-only memmap, not a copy
    assert shard.doc(-1).tolist() == docs[-1].tolist()
    with pytest.raises(IndexError):
        shard.doc(23)
    assert not list(tmp_path.glob("*.tmp"))


def test_int32_shard_and_empty_shard(tmp_path):
    docs = random_docs(1, 5, high=200_000)
    write_shard(tmp_path / "big", docs, dtype=np.int32)
    assert read_idx_from_spec(tmp_path / "big.idx")["dtype"] == np.dtype("<i4")
    assert [d.tolist() for d in (IndexedShard(tmp_path / "big").doc(i) for i in range(5))] == [
        d.tolist() for d in docs
    ]
    write_shard(tmp_path / "empty", [])
    empty = IndexedShard(tmp_path / "empty")
    assert len(empty) == 0 and empty.total_tokens == 0


def test_aborted_writer_leaves_nothing(tmp_path):
    writer = ShardWriter(tmp_path / "s", np.uint16)
    writer.add_documents(np.arange(10), np.array([4, 6]))
    writer.abort()
    assert list(tmp_path.iterdir()) == []


def test_pythia_style_idxmap_with_its_own_doc_idx(tmp_path):
    """EleutherAI idxmaps: doc_idx need not be 0..N (several sequences per document)."""
    sizes = np.array([5, 3, 2049, 1])
    tokens = np.random.default_rng(2).integers(0, 50277, size=int(sizes.sum())).astype("<u2")
    (tmp_path / "pile.bin").write_bytes(tokens.tobytes())
    (tmp_path / "pile.idx").write_bytes(encode_index(sizes, np.uint16, doc_idx=[0, 2, 4]))
    shard = IndexedShard(tmp_path / "pile")
    assert shard.doc_idx.tolist() == [0, 2, 4]
    assert shard.doc(2).tolist() == tokens[8 : 8 + 2049].tolist()


def _good_pair(tmp_path):
    write_shard(tmp_path / "s", random_docs(3, 9))
    return tmp_path / "s.idx", tmp_path / "s.bin"


def _patch(path, offset, data: bytes):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda idx, b: _patch(idx, 0, b"NOTMMIDX\x00"), "bad magic"),
        (lambda idx, b: _patch(idx, 9, struct.pack("<Q", 2)), "version 2"),
        (lambda idx, b: _patch(idx, 17, bytes([6])), "float"),
        (lambda idx, b: _patch(idx, 17, bytes([11])), "unknown dtype code 11"),
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:-8]), "implies"),
        (lambda idx, b: idx.write_bytes(idx.read_bytes()[:20]), "shorter than the header"),
        (lambda idx, b: b.write_bytes(b.read_bytes() + b"\x00\x00"), ".bin is"),
        (lambda idx, b: b.write_bytes(b.read_bytes()[:-2]), ".bin is"),
        (lambda idx, b: _patch(idx, 34 + 9 * 4 + 8 * 3, struct.pack("<q", 7)), "pointer of"),
        (lambda idx, b: _patch(idx, 34 + 4, struct.pack("<i", -3)), "negative size"),
        (lambda idx, b: b.unlink(), "not found"),
    ],
    ids=["magic", "version", "float-dtype", "unknown-dtype", "idx-size", "idx-short",
         "bin-long", "bin-short", "pointer", "negative-size", "missing-bin"],
)
def test_reader_rejects_bad_files_naming_file_and_problem(tmp_path, damage, message):
    idx, bin_path = _good_pair(tmp_path)
    damage(idx, bin_path)
    with pytest.raises(ShardError) as info:
        IndexedShard(tmp_path / "s")
    assert message in str(info.value)
    assert "s.idx" in str(info.value) or "s.bin" in str(info.value)


def test_shard_set_spans_shards_in_order(tmp_path):
    groups = [random_docs(10 + k, n) for k, n in enumerate([4, 1, 7])]
    prefixes = []
    for k, docs in enumerate(groups):
        write_shard(tmp_path / f"part_{k}", docs)
        prefixes.append(tmp_path / f"part_{k}")
    all_docs = [d.tolist() for g in groups for d in g]
    stream = np.concatenate([d for g in groups for d in g])
    for shard_set in (ShardSet(prefixes), ShardSet(tmp_path)):  # list, or folder sorted by name
        assert len(shard_set) == len(all_docs)
        assert [shard_set.doc(i).tolist() for i in range(len(all_docs))] == all_docs
        assert shard_set.sizes.tolist() == [len(d) for d in all_docs]
        assert shard_set.total_tokens == len(stream)
        rng = np.random.default_rng(0)
        for _ in range(50):
            a = int(rng.integers(0, len(stream)))
            b = int(rng.integers(a, len(stream) + 1))
            assert shard_set.token_slice(a, b).tolist() == stream[a:b].tolist()
        with pytest.raises(IndexError):
            shard_set.token_slice(0, len(stream) + 1)
    before = ShardSet(prefixes).fingerprint()
    write_shard(tmp_path / "part_1", random_docs(99, 2))
    assert ShardSet(prefixes).fingerprint() != before


def test_shard_set_errors(tmp_path):
    with pytest.raises(ShardError, match="no shards"):
        ShardSet(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ShardError, match="manifest"):
        ShardSet(tmp_path)


def test_shard_set_names_the_path_the_user_gave(tmp_path):
    for given in (tmp_path / "missing", tmp_path / "missing.bin", tmp_path / "no" / "folder"):
        with pytest.raises(ShardError) as info:
            ShardSet(given)
        assert str(info.value) == f"{given}: no such file or folder"
    write_shard(tmp_path / "half", random_docs(4, 3))
    (tmp_path / "half.bin").unlink()  # a prefix that exists in part: name the missing file
    with pytest.raises(ShardError, match=r"half\.bin: shard file not found"):
        ShardSet(tmp_path / "half")


def test_writer_temporary_names_are_unique_and_abort_removes_only_its_own(tmp_path):
    first, second = ShardWriter(tmp_path / "s", np.uint16), ShardWriter(tmp_path / "s", np.uint16)
    assert first.temporary_path != second.temporary_path
    assert not list(tmp_path.iterdir())  # nothing exists before the first document
    for writer in (first, second):
        writer.add_documents(np.arange(6), np.array([2, 4]))
    first.abort()
    assert list(tmp_path.iterdir()) == [second.temporary_path]
    entry = second.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.bin", "s.idx"]
    assert entry["max_token_id"] == 5 and read_docs_from_spec(tmp_path / "s") == [[0, 1],
                                                                                   [2, 3, 4, 5]]
    tagged = ShardWriter(tmp_path / "t", np.uint16, tag="0badcafe")
    assert tagged.temporary_path.name == "t.bin.0badcafe.tmp"


def _manifest_folder(tmp_path, **changes) -> dict:
    entry = write_shard(tmp_path / "shard_00000", random_docs(5, 4))
    manifest = {"format": "neox-distill-token-shards", "format_version": 2, "shards": [entry],
                "tokenizer": {"sha256": "ab", "fingerprint": "cd", "vocab_size": 300,
                              "eos_id": 0},
                "totals": {"max_token_id": entry["max_token_id"]}, **changes}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_manifest_format_and_version_are_checked(tmp_path):
    manifest = _manifest_folder(tmp_path)
    shards = ShardSet(tmp_path, verify=True)
    assert shards.tokenizer_info() == {"sha256": "ab", "fingerprint": "cd", "vocab_size": 300,
                                       "eos_id": 0, "max_token_id": manifest["totals"][
                                           "max_token_id"]}
    _manifest_folder(tmp_path, format_version=3)
    with pytest.raises(ShardError, match=r"manifest\.json: format_version 3 is not one this"):
        ShardSet(tmp_path)
    _manifest_folder(tmp_path, format="something-else")
    with pytest.raises(ShardError, match=r"manifest\.json: not a manifest written by neox-dis"):
        ShardSet(tmp_path)
    _manifest_folder(tmp_path, shards={"name": "shard_00000"})
    with pytest.raises(ShardError, match=r"manifest\.json: \"shards\" must be a list"):
        ShardSet(tmp_path)


def test_an_unreadable_progress_record_still_marks_the_folder_unfinished(tmp_path):
    write_shard(tmp_path / "shard_00000", random_docs(6, 3))
    (tmp_path / ".progress.json").write_text("{torn")
    with pytest.raises(ShardError, match=r"run the same neox-distill preprocess command again"):
        ShardSet(tmp_path)
