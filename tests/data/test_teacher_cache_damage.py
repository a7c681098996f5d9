"""A teacher cache that is damaged, or built for other text of the same shape, is refused
naming the file (issue 22): sha256 verified when a run opens it, every batch's records
checked as they are read, the shards fingerprinted by their content."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from engine.data.loader import build_dataset
from engine.data.shards import file_sha256
from engine.data.teacher_cache import (
    CachedTargets,
    CacheError,
    TeacherCache,
    check_cache_matches,
    item_rows,
)
from engine.teacher_cache import build_teacher_cache
from engine.train.__main__ import main as train_main
from tests.cache_assets import SEQ_LEN, VALID_VOCAB, make_cache_assets
from tests.engine.test_teacher_cache_training import overrides


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("damage-assets")
    assets = make_cache_assets(root)
    assets["bare"] = root / "bare"  # the same shards without their manifest.json
    assets["bare"].mkdir()
    for path in sorted(assets["data"].glob("shard_*")):
        shutil.copy(path, assets["bare"] / path.name)
    for name, data in (("cache", assets["data"]), ("bare_cache", assets["bare"])):
        assets[name] = root / name
        build_teacher_cache(str(assets["teacher"]), str(data), str(assets[name]), top_k=8,
                            seq_len=SEQ_LEN, valid_vocab=VALID_VOCAB, dtype="fp32",
                            device="cpu", show_progress=False)
    return assets


def damaged_copy(source: Path, folder: Path, damage, *, rehash: bool = False) -> Path:
    """A copy of the cache whose shard_00001.cache records pass through damage(records) in
    place (same size); with rehash, its manifest is rewritten to the damaged file's sha256."""
    shutil.copytree(source, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    cache = TeacherCache(folder)
    path = folder / "shard_00001.cache"
    records = np.fromfile(path, dtype=cache.dtype)
    damage(records)
    records.tofile(path)
    if rehash:
        manifest["shards"][1]["sha256"] = file_sha256(path)
        (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def trained_row(records, nth: int = 5) -> int:
    return int(np.flatnonzero(records["count"] > 0)[nth])


def set_nan(records):
    records["values"][trained_row(records), 2] = np.nan


def set_big_id(records):
    row = trained_row(records)
    records["ids"][row, -1] = VALID_VOCAB + 7  # still ascending, outside the vocabulary


def flip_log_probs(records):
    used = records["count"] > 0
    records["values"][used] = records["values"][used][:, ::-1]


def test_a_cache_damaged_in_place_is_refused_when_opened(assets, tmp_path):
    folder = damaged_copy(assets["cache"], tmp_path / "damaged", flip_log_probs)
    with pytest.raises(CacheError, match=r"shard_00001\.cache: damaged \(its sha256 differs"):
        TeacherCache(folder)


def test_a_training_run_refuses_a_damaged_cache_naming_the_file(assets, tmp_path, capsys):
    folder = damaged_copy(assets["cache"], tmp_path / "damaged", flip_log_probs)
    code = train_main(overrides(assets, tmp_path / "run", teacher__cache=folder))
    err = capsys.readouterr().err
    assert code != 0 and f"{folder}/shard_00001.cache: damaged" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(("damage", "words"), [
    (set_nan, "a log-probability that is not finite and <= 0 (nan)"),
    (set_big_id, f"a token id outside [0, {VALID_VOCAB})"),
], ids=["nan", "id"])
def test_records_no_build_writes_are_refused_naming_file_and_record(assets, tmp_path, damage,
                                                                   words):
    """Records whose manifest was rewritten with them (so the sha256 agrees): the batch that
    reads them names the file and the record instead of training on them."""
    folder = damaged_copy(assets["cache"], tmp_path / "bad", damage, rehash=True)
    cache = TeacherCache(folder)
    dataset = build_dataset(assets["data"], "packed", SEQ_LEN)
    path, local = cache.locate(cache.row_starts[1] + trained_row(cache.shards[1][:]))
    bad_row = int(cache.row_starts[1]) + local
    item = bad_row // SEQ_LEN
    assert item_rows(dataset, item)[0] <= bad_row < item_rows(dataset, item)[0] + SEQ_LEN
    cached = CachedTargets(dataset, cache)
    cached.get_batch(np.array([0, 1]))  # batches away from the damage still read
    with pytest.raises(CacheError) as failure:
        cached.get_batch(np.array([0, item]))
    assert str(failure.value).startswith(f"{path}: record {local} is not one neox-distill "
                                         f"cache-teacher writes ({words})")


def test_shards_without_a_manifest_are_told_apart_by_their_content(assets, tmp_path):
    """Other text of the same shape (each .bin's tokens shuffled) has the same counts-only
    fingerprint; the cache records the content, so a run over it is refused."""
    other = tmp_path / "other"
    other.mkdir()
    rng = np.random.default_rng(0)
    for path in sorted(assets["bare"].iterdir()):
        if path.suffix == ".bin":
            rng.permutation(np.fromfile(path, dtype="<u2")).tofile(other / path.name)
        else:
            shutil.copy(path, other / path.name)
    cache = TeacherCache(assets["bare_cache"])
    same = build_dataset(assets["bare"], "packed", SEQ_LEN)
    shuffled = build_dataset(other, "packed", SEQ_LEN)
    assert same.fingerprint() == shuffled.fingerprint()  # what a counts-only check sees
    check_cache_matches(cache, same, temperature=2.0, valid_vocab=VALID_VOCAB)
    with pytest.raises(CacheError, match="other token shards of the same shape"):
        check_cache_matches(cache, shuffled, temperature=2.0, valid_vocab=VALID_VOCAB)


def test_a_version_1_cache_is_read_where_its_fingerprint_covers_the_content(assets, tmp_path):
    """Format version 1 had no data.content: still read for shards with a manifest (its
    fingerprint holds their sha256), refused for shards without one."""
    for name in ("cache", "bare_cache"):
        folder = tmp_path / name
        shutil.copytree(assets[name], folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        manifest["format_version"] = 1
        del manifest["data"]["content"]
        (folder / "manifest.json").write_text(json.dumps(manifest))
    check_cache_matches(TeacherCache(tmp_path / "cache"),
                        build_dataset(assets["data"], "packed", SEQ_LEN), temperature=2.0,
                        valid_vocab=VALID_VOCAB)
    with pytest.raises(CacheError, match="format_version 1 identified by their shapes only"):
        check_cache_matches(TeacherCache(tmp_path / "bare_cache"),
                            build_dataset(assets["bare"], "packed", SEQ_LEN), temperature=2.0,
                            valid_vocab=VALID_VOCAB)
