"""End-to-end preprocessing: tokens, shard layout, determinism, bad input, resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import engine.data.preprocess as prep
from engine.data.jsonl import InputError
from engine.data.preprocess import PreprocessError, preprocess
from engine.data.shards import IndexedShard, ShardSet, file_sha256
from engine.data.tokenizer_file import TokenizerFileError
from tests.data.common import (
    REPO_ROOT,
    docs_lines,
    expected_docs,
    folder_bytes,
    random_texts,
    read_docs_from_spec,
    read_idx_from_spec,
    write_jsonl,
)


def all_docs(out_dir) -> list[list[int]]:
    manifest = json.loads((out_dir / "manifest.json").read_text())
    return [d for s in manifest["shards"] for d in read_docs_from_spec(out_dir / s["name"])]


def test_shards_hold_encode_plus_eos_of_every_document_in_order(tmp_path, bpe, texts):
    # Two inputs, one plain and one multi-frame .zst; read in the order given.
    first = write_jsonl(tmp_path / "a.jsonl", docs_lines(texts[:100]))
    second = write_jsonl(tmp_path / "b.jsonl.zst", docs_lines(texts[100:]), frames=3)
    manifest = preprocess([first, second], bpe, tmp_path / "out", shard_tokens=1500)
    out = tmp_path / "out"
    expected = expected_docs(bpe, texts)
    assert all_docs(out) == expected

    shards = manifest["shards"]
    assert len(shards) > 3 and manifest["totals"]["shards"] == len(shards)
    assert manifest["totals"]["documents"] == len(texts)
    assert manifest["totals"]["tokens"] == sum(map(len, expected))
    # Documents are never split; a shard only passes shard_tokens if one document does.
    boundaries = np.cumsum([s["documents"] for s in shards])
    assert boundaries[-1] == len(texts)
    for k, shard in enumerate(shards):
        index = read_idx_from_spec(out / f"{shard['name']}.idx")
        assert index["dtype"] == np.dtype("<u2") and sum(index["sizes"]) == shard["tokens"]
        assert shard["tokens"] <= 1500 or shard["documents"] == 1
        if k + 1 < len(shards):  # the next document would not have fitted
            assert shard["tokens"] + len(expected[boundaries[k]]) > 1500
        assert file_sha256(out / f"{shard['name']}.bin") == shard["bin_sha256"]
        assert file_sha256(out / f"{shard['name']}.idx") == shard["idx_sha256"]
    assert [i["documents"] for i in manifest["inputs"]] == [100, len(texts) - 100]
    assert manifest["tokenizer"]["sha256"] == file_sha256(bpe)
    assert manifest["tokenizer"]["eos_id"] == 0
    assert manifest["skipped"]["total"] == 0
    assert ShardSet(out, verify=True).total_tokens == manifest["totals"]["tokens"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["manifest.json"] + [f"{s['name']}.{ext}" for s in shards for ext in ("bin", "idx")]
    )


def test_one_and_two_workers_write_byte_identical_folders(tmp_path, bpe, texts, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_DOCS", 16)  # many batches in flight
    source = write_jsonl(tmp_path / "in.jsonl.zst", [*docs_lines(texts), "{bad json"])
    preprocess([source], bpe, tmp_path / "w1", workers=1, shard_tokens=2000)
    preprocess([source], bpe, tmp_path / "w2", workers=2, shard_tokens=2000)
    assert folder_bytes(tmp_path / "w1") == folder_bytes(tmp_path / "w2")


def test_real_pile_sample_with_the_real_tokenizer(tmp_path, neox_tokenizer_path,
                                                  pile_sample_path):
    from tokenizers import Tokenizer

    from engine.data.jsonl import iter_lines

    tokenizer = Tokenizer.from_file(str(neox_tokenizer_path))
    assert tokenizer.encode("Hello world, this is the Pile.").ids == [
        12092, 1533, 13, 436, 310, 253, 367, 587, 15]
    lines = []
    for raw in iter_lines(pile_sample_path):  # bounded: the first 1000 documents
        lines.append(raw)
        if len(lines) == 1000:
            break
    source = write_jsonl(tmp_path / "sample.jsonl.zst", lines)
    manifest = preprocess([source], neox_tokenizer_path, tmp_path / "out")
    texts = [json.loads(raw)["text"] for raw in lines]
    # Plain Tokenizer.encode (its defaults) + EOS 0: NeoX's template adds nothing.
    expected = [[*tokenizer.encode(t).ids, 0] for t in texts]
    assert manifest["dtype"] == "uint16" and manifest["totals"]["documents"] == 1000
    shard = IndexedShard(tmp_path / "out" / "shard_00000")
    assert [shard.doc(i).tolist() for i in range(len(shard))] == expected


@pytest.mark.slow
def test_whole_pile_sample_streams_from_the_real_file(tmp_path, neox_tokenizer_path,
                                                      pile_sample_path):
    from tokenizers import Tokenizer

    from engine.data.jsonl import iter_lines

    manifest = preprocess([pile_sample_path], neox_tokenizer_path, tmp_path / "out")
    texts = [json.loads(raw)["text"] for raw in iter_lines(pile_sample_path)]
    tokenizer = Tokenizer.from_file(str(neox_tokenizer_path))
    shards = ShardSet(tmp_path / "out", verify=True)
    assert manifest["skipped"]["total"] == 0 and len(shards) == len(texts)
    for start in range(0, len(texts), 2000):  # bounded memory for the reference encodings
        encodings = tokenizer.encode_batch(texts[start : start + 2000])
        for i, encoding in enumerate(encodings, start=start):
            assert shards.doc(i).tolist() == [*encoding.ids, 0], f"document {i}"


def test_bad_lines_are_skipped_counted_and_located(tmp_path, bpe, texts):
    good = docs_lines(texts[:6])
    lines = [
        good[0],
        "{not json",                       # 2 malformed
        json.dumps({"body": "x"}),         # 3 missing text
        json.dumps({"text": 17}),          # 4 non-string
        json.dumps({"text": None}),        # 5 non-string
        good[1],
        json.dumps({"text": ""}),          # 7 empty
        b'{"text": "caf\xe9 broken"}',     # 8 invalid UTF-8
        "",                                # 9 blank line
        json.dumps(["text", "list"]),      # 10 not an object -> missing text
        '{"text": "lone \\ud800 surrogate"}',  # 11 unencodable
        *good[2:],
    ]
    source = write_jsonl(tmp_path / "bad.jsonl.zst", lines)
    manifest = preprocess([source], bpe, tmp_path / "out")
    assert all_docs(tmp_path / "out") == expected_docs(bpe, texts[:6])
    skipped = manifest["skipped"]
    assert skipped["total"] == 9
    assert skipped["counts"] == {
        "blank_line": 1, "empty_text": 1, "invalid_utf8": 2, "malformed_json": 1,
        "missing_text": 2, "non_string_text": 2,
    }
    assert skipped["examples"][0].startswith(f"{source}:2: malformed_json")
    assert any(e.startswith(f"{source}:8: invalid_utf8") for e in skipped["examples"])
    assert manifest["inputs"][0]["lines"] == len(lines)
    assert manifest["inputs"][0]["skipped"] == 9
    assert "skipped 9 lines" in prep.summary(manifest)

    with pytest.raises(PreprocessError, match=rf"{source}:2: .*--strict"):
        preprocess([source], bpe, tmp_path / "strict", strict=True)
    leftovers = [p.name for p in (tmp_path / "strict").iterdir()]
    assert not [n for n in leftovers if n.endswith(".tmp") or n == "manifest.json"]


def _zst_with_data(tmp_path, bpe_texts):
    source = write_jsonl(tmp_path / "in.jsonl.zst", docs_lines(bpe_texts))
    return source, source.read_bytes()


@pytest.mark.parametrize("damage", ["truncated", "corrupt-middle", "corrupt-header"])
def test_truncated_or_corrupt_zst_stops_naming_file_and_position(tmp_path, bpe, texts, damage):
    source, raw = _zst_with_data(tmp_path, texts)
    if damage == "truncated":
        source.write_bytes(raw[: len(raw) * 2 // 3])
        message = "truncated zstd stream"
    else:
        broken = bytearray(raw)
        broken[len(raw) // 2 if damage == "corrupt-middle" else 5] ^= 0xFF
        source.write_bytes(bytes(broken))
        message = "corrupt zstd data"
    with pytest.raises(InputError, match=message) as info:
        preprocess([source], bpe, tmp_path / "out", shard_tokens=300)
    assert str(source) in str(info.value) and "byte" in str(info.value)
    names = [p.name for p in (tmp_path / "out").iterdir()]
    assert "manifest.json" not in names and not [n for n in names if n.endswith(".tmp")]
    # Whatever shards did finish are complete and listed in the progress record.
    for name in names:
        if name.endswith(".idx"):
            IndexedShard(tmp_path / "out" / name)


def test_cli_exit_status_and_messages(tmp_path, bpe, texts):
    source, raw = _zst_with_data(tmp_path, texts)
    command = [sys.executable, "-m", "engine.data.preprocess", "--input", str(tmp_path / "*.zst"),
               "--tokenizer", str(bpe), "--output", str(tmp_path / "out")]
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"{len(texts)} documents" in done.stderr.replace(",", "")
    source.write_bytes(raw[:-7])
    command[-1] = str(tmp_path / "out2")
    failed = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1
    assert failed.stderr.startswith("error: ") and str(source) in failed.stderr


def test_token_id_that_does_not_fit_the_dtype_is_an_error(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<|endoftext|>": 0, "<|padding|>": 1, "[UNK]": 2, "small": 3, "huge": 70000}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(tmp_path / "wl.json"))
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(["small small", "small huge"]))
    with pytest.raises(PreprocessError, match=rf"{source}:2: token id 70000 does not fit"):
        preprocess([source], tmp_path / "wl.json", tmp_path / "u16", dtype="uint16")
    assert not [p for p in (tmp_path / "u16").iterdir() if p.suffix in (".tmp", ".json")]
    manifest = preprocess([source], tmp_path / "wl.json", tmp_path / "auto")
    assert manifest["dtype"] == "int32"  # Megatron code 4: ids beyond uint16
    assert read_idx_from_spec(tmp_path / "auto" / "shard_00000.idx")["dtype"] == np.dtype("<i4")
    assert all_docs(tmp_path / "auto") == [[3, 3, 0], [3, 70000, 0]]


def test_interrupted_run_keeps_finished_shards_and_continues(tmp_path, bpe, texts, monkeypatch):
    monkeypatch.setattr(prep, "BATCH_DOCS", 9)
    lines = docs_lines(texts)
    lines[30] = "{broken"  # skip counts must survive the resume exactly
    lines[150] = json.dumps({"text": ""})
    # Two inputs: the crash lands in the second, so the first one's stats must be restored.
    first = write_jsonl(tmp_path / "a.jsonl", lines[:100])
    source = write_jsonl(tmp_path / "in.jsonl.zst", lines[100:], frames=2)
    inputs = [first, source]
    reference = preprocess(inputs, bpe, tmp_path / "ref", shard_tokens=700)

    real_consume = prep._Run.consume
    calls = {"n": 0}

    def consume_then_crash(self, *args):
        calls["n"] += 1
        if calls["n"] == 14:
            raise KeyboardInterrupt
        return real_consume(self, *args)

    monkeypatch.setattr(prep._Run, "consume", consume_then_crash)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        preprocess(inputs, bpe, out, shard_tokens=700)
    progress = json.loads((out / ".progress.json").read_text())
    finished = [s["name"] for s in progress["shards"]]
    assert progress["shards"][-1]["resume"]["position"][0] == 1  # stopped in the 2nd file
    assert finished and not (out / "manifest.json").exists()
    assert not list(out.glob("*.tmp"))
    kept = {name: os.stat(out / f"{name}.bin").st_ino for name in finished}
    monkeypatch.setattr(prep._Run, "consume", real_consume)

    # A second interruption case: a shard renamed into place but never recorded, and a
    # recorded one damaged afterwards; both are re-made.
    last = len(finished)
    (out / f"shard_{last:05d}.bin").write_bytes(b"junk")
    (out / f"shard_{last:05d}.idx").write_bytes(b"junk")

    manifest = preprocess(inputs, bpe, out, shard_tokens=700)
    assert manifest == reference
    assert folder_bytes(out) == folder_bytes(tmp_path / "ref")
    for name, inode in kept.items():  # finished shards were kept, not rewritten
        assert os.stat(out / f"{name}.bin").st_ino == inode

    # Damage a shard of a crashed run: resume restarts from that shard.
    monkeypatch.setattr(prep._Run, "consume", consume_then_crash)
    calls["n"] = 0
    out2 = tmp_path / "out2"
    with pytest.raises(KeyboardInterrupt):
        preprocess(inputs, bpe, out2, shard_tokens=700)
    monkeypatch.setattr(prep._Run, "consume", real_consume)
    damaged = bytearray((out2 / "shard_00001.bin").read_bytes())
    damaged[0] ^= 0xFF
    (out2 / "shard_00001.bin").write_bytes(bytes(damaged))
    preprocess(inputs, bpe, out2, shard_tokens=700)
    assert folder_bytes(out2) == folder_bytes(tmp_path / "ref")


def test_rerun_on_a_finished_folder_and_on_a_foreign_folder(tmp_path, bpe, texts):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:40]))
    first = preprocess([source], bpe, tmp_path / "out", shard_tokens=500)
    mtimes = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    assert preprocess([source], bpe, tmp_path / "out", shard_tokens=500) == first
    assert mtimes == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out").iterdir()}
    with pytest.raises(PreprocessError, match="shard_tokens"):
        preprocess([source], bpe, tmp_path / "out", shard_tokens=501)
    (tmp_path / "out" / "shard_00000.bin").write_bytes(b"\x00\x00")
    with pytest.raises(PreprocessError, match="sha256"):
        preprocess([source], bpe, tmp_path / "out", shard_tokens=500)


def test_argument_errors(tmp_path, bpe):
    with pytest.raises(PreprocessError, match="no such input"):
        preprocess([tmp_path / "missing*.jsonl"], bpe, tmp_path / "out")
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(["a"]))
    with pytest.raises(TokenizerFileError, match=rf"{source}: not a tokenizer.json"):
        preprocess([source], source, tmp_path / "out")
    with pytest.raises(PreprocessError, match="workers"):
        preprocess([source], bpe, tmp_path / "out", workers=0)


def test_cli_killed_hard_then_rerun_gives_the_same_folder(tmp_path, bpe):
    """SIGKILL mid-run: every file under a shard's real name is complete; a rerun finishes."""
    import signal
    import time

    texts = random_texts(6000, seed=7, max_len=120)
    source = write_jsonl(tmp_path / "in.jsonl.zst", docs_lines(texts))
    reference = tmp_path / "ref"
    preprocess([source], bpe, reference, shard_tokens=3000)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "engine.data.preprocess", "--input", str(source),
               "--tokenizer", str(bpe), "--output", str(out), "--shard-tokens", "3000"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "shard_00000.idx").exists() and process.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    for idx in out.glob("shard_*.idx"):  # complete and self-consistent, or not there at all
        IndexedShard(idx)
    assert not (out / "manifest.json").exists() or process.returncode == 0
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == folder_bytes(reference)


def test_unreadable_state_files_are_named(tmp_path, bpe):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(["some text"]))
    out = tmp_path / "out"
    out.mkdir()
    (out / ".progress.json").write_text("{truncated")
    with pytest.raises(PreprocessError, match=r"\.progress\.json: unreadable"):
        preprocess([source], bpe, out)
    (out / ".progress.json").unlink()
    (out / "manifest.json").write_text("[]")
    with pytest.raises(PreprocessError, match=r"manifest\.json: not a JSON object"):
        preprocess([source], bpe, out)
