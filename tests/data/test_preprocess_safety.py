"""Preprocess never deletes what it did not create, never passes an unfinished or stale folder
as finished, and stops (never hangs) when a worker dies. Issue 10, items 2, 6, 7, 9, 11."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

import engine.data.preprocess as prep
from engine.data import failpoints
from engine.data.preprocess import PreprocessError, preprocess
from engine.data.preprocess_job import settings_of
from engine.data.shards import ShardError, ShardSet, file_sha256
from tests.data.common import (
    REPO_ROOT,
    docs_lines,
    folder_bytes,
    random_texts,
    read_docs_from_spec,
    write_jsonl,
)


def interrupt_after(monkeypatch, calls: int) -> None:
    """Make the run raise KeyboardInterrupt at its `calls`-th tokenised batch."""
    real_consume = prep._Run.consume
    seen = {"n": 0}

    def consume_then_stop(self, *args):
        seen["n"] += 1
        if seen["n"] == calls:
            raise KeyboardInterrupt
        return real_consume(self, *args)

    monkeypatch.setattr(prep._Run, "consume", consume_then_stop)


def interrupted_job(tmp_path, bpe, texts, monkeypatch, calls: int = 10):
    """(input, reference folder, folder of the same job interrupted after a few shards)."""
    monkeypatch.setattr(prep, "BATCH_DOCS", 9)
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts))
    preprocess([source], bpe, tmp_path / "ref", shard_tokens=700)
    out = tmp_path / "out"
    with monkeypatch.context() as patch:
        interrupt_after(patch, calls)
        with pytest.raises(KeyboardInterrupt):
            preprocess([source], bpe, out, shard_tokens=700)
    assert not (out / "manifest.json").exists()
    return source, tmp_path / "ref", out


def run_python(code: str, *args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


# ------------------------------------------------------- item 2: only ever delete our own


def test_a_non_empty_folder_that_is_not_ours_is_refused_and_left_untouched(tmp_path, bpe, texts):
    inputs = tmp_path / "corpus"
    inputs.mkdir()
    # Named like a shard on purpose: the old clean-up deleted it before reading it.
    source = write_jsonl(inputs / "shard_00000.jsonl", docs_lines(texts[:20]))
    before = folder_bytes(inputs)
    for output in (inputs, tmp_path):  # the input's folder, and a folder containing it
        with pytest.raises(PreprocessError, match=r"not empty .*holds the input") as info:
            preprocess([source], bpe, output)
        assert str(output) in str(info.value) and "Nothing was deleted" in str(info.value)
        assert folder_bytes(inputs) == before

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.tmp").write_text("my notes")
    (mine / "shard_7.bin").write_bytes(b"mine")
    with pytest.raises(PreprocessError, match=r"notes\.tmp, shard_7\.bin\. Nothing was deleted"):
        preprocess([source], bpe, mine)
    assert folder_bytes(mine) == {"notes.tmp": b"my notes", "shard_7.bin": b"mine"}


def test_shards_whose_manifest_was_lost_are_refused_and_kept(tmp_path, bpe, texts):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:80]))
    out = tmp_path / "out"
    preprocess([source], bpe, out, shard_tokens=500)
    (out / "manifest.json").unlink()
    (out / "shard_00001.bin.bak").write_bytes(b"backup")
    (out / "notes.tmp").write_text("notes")
    before = folder_bytes(out)
    assert sum(name.endswith(".idx") for name in before) >= 4
    with pytest.raises(PreprocessError, match=r"manifest\.json was lost") as info:
        preprocess([source], bpe, out, shard_tokens=500)
    assert "Nothing was deleted" in str(info.value)
    assert folder_bytes(out) == before
    # The complete pairs still train, as a folder without a manifest does.
    shards = ShardSet(out)
    assert len(shards) == 80 and shards.tokenizer_info() is None and shards.max_token_id() is None


def test_a_record_left_beside_a_complete_folder_is_dropped_only_if_it_is_the_jobs(tmp_path, bpe,
                                                                                    texts):
    """A run killed between writing its manifest and removing its record leaves the record:
    the rerun deletes it after checking it is this job's; a foreign file by that name stays."""
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:40]))
    out = tmp_path / "out"
    preprocess([source], bpe, out, shard_tokens=500)
    manifest = json.loads((out / "manifest.json").read_text())
    record = out / ".progress.json"
    record.write_text(json.dumps({"settings": settings_of(manifest), "shards": []}))
    preprocess([source], bpe, out, shard_tokens=500)
    assert not record.exists()
    record.write_text(json.dumps({"settings": {"format": "someone else's"}}))
    with pytest.raises(PreprocessError, match="not its own job record") as info:
        preprocess([source], bpe, out, shard_tokens=500)
    assert "nothing was deleted" in str(info.value)
    assert json.loads(record.read_text()) == {"settings": {"format": "someone else's"}}


def test_a_resume_deletes_exactly_what_its_record_names(tmp_path, bpe, texts, monkeypatch):
    source, reference, out = interrupted_job(tmp_path, bpe, texts, monkeypatch)
    record = json.loads((out / ".progress.json").read_text())
    # The user's files, dropped into the folder while the job was interrupted; the last one
    # under a name the job writes later, so the job must stop before it rather than replace it.
    theirs = {"notes.tmp": b"notes", "shard_99999.bin.bak": b"backup",
              "shard_00000.bin.tmp": b"not the job's"}
    for name, data in theirs.items():
        (out / name).write_bytes(data)
    later = out / f"shard_{len(record['shards']) + 1:05d}.bin"
    later.write_bytes(b"mine")
    with pytest.raises(PreprocessError, match=rf"{later}: exists, but this job did not write"):
        preprocess([source], bpe, out, shard_tokens=700)
    assert later.read_bytes() == b"mine"
    later.unlink()
    preprocess([source], bpe, out, shard_tokens=700)
    assert folder_bytes(out) == {**folder_bytes(reference), **theirs}


def test_each_run_of_a_job_writes_under_temporary_names_of_its_own(tmp_path, bpe, texts,
                                                                    monkeypatch):
    _, _, out = interrupted_job(tmp_path, bpe, texts, monkeypatch)
    record = json.loads((out / ".progress.json").read_text())
    pending = record["pending"]
    assert re.fullmatch(rf"{pending['name']}\.bin\.[0-9a-f]{{8}}\.tmp", pending["temporary"])
    assert f"--output {out}" in record["command"]
    first = pending["temporary"]
    with monkeypatch.context() as patch:
        interrupt_after(patch, 3)
        with pytest.raises(KeyboardInterrupt):
            preprocess([tmp_path / "in.jsonl"], bpe, out, shard_tokens=700)
    second = json.loads((out / ".progress.json").read_text())["pending"]["temporary"]
    assert first != second and not list(out.glob("*.tmp"))


# ------------------------------------------- item 6: an unfinished folder never trains


def test_an_unfinished_folder_is_refused_with_the_command_that_finishes_it(tmp_path, bpe, texts,
                                                                           monkeypatch):
    _, reference, out = interrupted_job(tmp_path, bpe, texts, monkeypatch)
    assert list(out.glob("shard_*.idx"))  # finished shards a loader could have globbed
    unfinished = rf"{out}: an unfinished neox-distill preprocess job"
    with pytest.raises(ShardError, match=unfinished) as info:
        ShardSet(out)
    command = str(info.value).split("finish it with: ", 1)[1]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT),
           "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"]}
    done = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == folder_bytes(reference)
    assert len(ShardSet(out, verify=True)) == len(texts)


KILLED_IN_FIRST_SHARD = """
import os, signal, sys
import engine.data.shards
import engine.data.preprocess
engine.data.shards.ShardWriter.finish = lambda self: os.kill(os.getpid(), signal.SIGKILL)
engine.data.preprocess.preprocess([sys.argv[1]], sys.argv[2], sys.argv[3])
"""


def test_a_job_killed_before_its_first_shard_is_finished_is_detected(tmp_path, bpe, texts):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:50]))
    out = tmp_path / "out"
    killed = run_python(KILLED_IN_FIRST_SHARD, source, bpe, out)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    leftovers = sorted(p.name for p in out.iterdir())
    assert ".progress.json" in leftovers and any(n.endswith(".tmp") for n in leftovers)
    with pytest.raises(ShardError, match=r"unfinished neox-distill preprocess job"):
        ShardSet(out)
    manifest = preprocess([source], bpe, out)  # the rerun deletes the recorded temporary
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard_00000.bin",
                                                     "shard_00000.idx"]
    assert manifest["totals"]["documents"] == 50


# ------------------------------------------------ item 9: an input is known by its content


def test_an_input_edited_to_the_same_size_is_noticed(tmp_path, bpe, texts, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(["hello world", *texts[:59]]))
    out = tmp_path / "out"
    manifest = preprocess([source], bpe, out, shard_tokens=500)
    size = source.stat().st_size
    source.write_bytes(source.read_bytes().replace(b"hello world", b"jello world"))
    assert source.stat().st_size == size
    with pytest.raises(PreprocessError, match=rf"other input content \({source} changed"):
        preprocess([source], bpe, out, shard_tokens=500)
    assert manifest["inputs"][0]["sha256"] != file_sha256(source)

    # The same for an interrupted job: the resumed half would not match the first half.
    source.write_bytes(source.read_bytes().replace(b"jello world", b"hello world"))
    with monkeypatch.context() as patch:
        patch.setattr(prep, "BATCH_DOCS", 9)
        interrupt_after(patch, 4)
        with pytest.raises(KeyboardInterrupt):
            preprocess([source], bpe, tmp_path / "half", shard_tokens=500)
    source.write_bytes(source.read_bytes().replace(b"hello world", b"jello world"))
    with pytest.raises(PreprocessError, match="interrupted run with other input content"):
        preprocess([source], bpe, tmp_path / "half", shard_tokens=500)


# ----------------------------------------------------- item 7: what the engine will check


def test_manifest_records_the_largest_token_id_and_a_tokenizer_fingerprint(tmp_path, bpe, texts):
    from engine.data.tokenizer_file import tokenizer_identity

    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:100]))
    out = tmp_path / "out"
    manifest = preprocess([source], bpe, out, shard_tokens=800)
    per_shard = [read_docs_from_spec(out / s["name"]) for s in manifest["shards"]]
    assert len(per_shard) > 1
    for entry, docs in zip(manifest["shards"], per_shard, strict=True):
        assert entry["max_token_id"] == max(max(doc) for doc in docs)
    largest = max(max(doc) for docs in per_shard for doc in docs)
    assert manifest["totals"]["max_token_id"] == largest

    shards = ShardSet(out)
    identity = tokenizer_identity(bpe)
    assert shards.max_token_id() == largest
    assert shards.tokenizer_info() == {**identity, "eos_id": 0, "max_token_id": largest}
    # The same tokenizer saved with other whitespace: other bytes, the same fingerprint.
    pretty = tmp_path / "pretty.json"
    pretty.write_text(json.dumps(json.loads(bpe.read_text()), indent=3))
    assert tokenizer_identity(pretty)["fingerprint"] == identity["fingerprint"]
    assert tokenizer_identity(pretty)["sha256"] != identity["sha256"]


def test_a_version_1_folder_still_trains_but_is_not_taken_as_up_to_date(tmp_path, bpe, texts):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:30]))
    out = tmp_path / "out"
    manifest = preprocess([source], bpe, out)
    # What the previous release wrote: no content hashes, fingerprint or max_token_id.
    manifest["format_version"] = 1
    del manifest["tokenizer"]["fingerprint"], manifest["totals"]["max_token_id"]
    for entry in manifest["inputs"]:
        del entry["sha256"]
    for entry in manifest["shards"]:
        del entry["max_token_id"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    shards = ShardSet(out, verify=True)
    assert len(shards) == 30 and shards.max_token_id() is None
    assert shards.tokenizer_info()["fingerprint"] is None
    assert shards.tokenizer_info()["sha256"] == file_sha256(bpe)
    with pytest.raises(PreprocessError, match=r"older neox-distill preprocess \(format_version 1"):
        preprocess([source], bpe, out)


# --------------------------------------------------- item 11: a dead worker never hangs


def test_a_dead_worker_stops_the_run_within_seconds_and_a_rerun_completes(tmp_path, bpe):
    texts = random_texts(26000, seed=7, max_len=60)
    marker = "this document kills the worker that tokenises it"
    line = 6 * prep.BATCH_DOCS + 11  # in the 7th batch: the first three are written by then
    texts[line - 1] = marker
    source = write_jsonl(tmp_path / "in.jsonl.zst", docs_lines(texts))
    reference = tmp_path / "ref"
    preprocess([source], bpe, reference, shard_tokens=3000)
    out = tmp_path / "out"
    command = [sys.executable, "-m", "engine.data.preprocess", "--input", str(source),
               "--tokenizer", str(bpe), "--output", str(out), "--shard-tokens", "3000",
               "--workers", "2"]
    started = time.monotonic()
    died = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **failpoints.arm("preprocess.worker", marker)})
    elapsed = time.monotonic() - started
    assert died.returncode == 1, died.stderr
    held = re.match(rf"error: {re.escape(str(source))}:(\d+)-(\d+): a tokenizer worker process "
                    "died", died.stderr)
    assert held and int(held[1]) <= line <= int(held[2]), died.stderr
    assert "run the same command again" in died.stderr and "Traceback" not in died.stderr
    assert elapsed < 60  # it used to wait forever; a start-up of two workers takes seconds
    finished = json.loads((out / ".progress.json").read_text())["shards"]
    assert finished and not list(out.glob("*.tmp"))
    kept = {s["name"]: os.stat(out / f"{s['name']}.bin").st_ino for s in finished}
    done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert folder_bytes(out) == folder_bytes(reference)
    assert kept == {name: os.stat(out / f"{name}.bin").st_ino for name in kept}


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.skipif(not os.path.exists(f"/proc/{os.getpid()}/task"), reason="needs Linux /proc")
def test_a_killed_run_leaves_no_worker_process_behind(tmp_path, bpe):
    source = write_jsonl(tmp_path / "in.jsonl.zst",
                         docs_lines(random_texts(2000, seed=5, max_len=80) * 50))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "engine.data.preprocess", "--input", str(source),
               "--tokenizer", str(bpe), "--output", str(out), "--shard-tokens", "3000",
               "--workers", "2"]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not (out / "shard_00000.idx").exists():  # the workers are up and tokenising
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    with open(f"/proc/{process.pid}/task/{process.pid}/children") as handle:
        children = [int(pid) for pid in handle.read().split()]
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert len(children) >= 2
    deadline = time.monotonic() + 30
    while any(map(_alive, children)) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = [pid for pid in children if _alive(pid)]
    for pid in left:  # do not leave them to the next test either
        os.kill(pid, signal.SIGKILL)
    assert not left, "worker processes outlived their killed parent"
