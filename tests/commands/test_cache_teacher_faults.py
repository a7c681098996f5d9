"""neox-distill cache-teacher under bad arguments, foreign folders and faults (issue 22): every
argument checked before anything is written, a lock per --out, token shards never taken for
a cache folder, write errors and input changes named with what to do."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import engine.teacher_cache as teacher_cache
from engine.commands.cache_teacher import main
from engine.data.preprocess_job import settings_of
from engine.data.teacher_cache import CacheError, TeacherCache
from engine.model import load_pretrained, save_pretrained
from engine.train.lock import RunLock
from tests.cache_assets import make_cache_assets
from tests.commands.test_cache_teacher import cli_args, killed_build

REPO = Path(__file__).resolve().parents[2]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    """Every file but the lock, whose record each build that takes it rewrites."""
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.name != ".lock"}


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_cache_assets(tmp_path_factory.mktemp("fault-assets"))


def bare_shards(assets, folder: Path) -> Path:
    """The assets' shards without their manifest.json (as EleutherAI's Pile comes)."""
    folder.mkdir()
    for path in sorted(assets["data"].glob("shard_*")):
        shutil.copy(path, folder / path.name)
    return folder


@pytest.mark.parametrize("pad_id", ["99999", "-1"])
def test_a_bad_pad_id_is_refused_before_anything_is_written(assets, tmp_path, capsys, pad_id):
    out = tmp_path / "cache"
    assert main(cli_args(assets, out, "--top-k", "4", "--mode", "padded",
                         "--pad-id", pad_id)) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: --pad-id {pad_id}") and err.count("\n") == 1
    assert not out.exists()
    assert main(cli_args(assets, out, "--top-k", "4", "--mode", "padded", "--pad-id", "0")) == 0


def test_a_build_that_wrote_nothing_does_not_block_the_corrected_command(assets, tmp_path,
                                                                        monkeypatch):
    """A build stopped before its first checkpoint (here: its teacher fails) leaves a job
    record with nothing durable; a command with other settings starts over instead of being
    refused with advice to rerun the failed one."""
    out = tmp_path / "cache"

    def failing_teacher(model, device):
        def chunks(input_ids, positions):
            raise RuntimeError("the teacher failed")
            yield
        return chunks

    with monkeypatch.context() as patch:
        patch.setattr(teacher_cache, "teacher_chunk_function", failing_teacher)
        with pytest.raises(RuntimeError, match="the teacher failed"):
            main(cli_args(assets, out, "--top-k", "4"))
    assert (out / ".progress.json").is_file()
    assert main(cli_args(assets, out, "--top-k", "5")) == 0
    assert TeacherCache(out).width == 5


@pytest.mark.parametrize(("options", "message"), [
    (["--top-k", "4", "--temperature", "inf"], "--temperature inf must be a finite number > 0"),
    (["--top-k", "4", "--temperature", "nan"], "--temperature nan must be a finite number > 0"),
    (["--top-k", "4", "--temperature", "-1"], "--temperature -1.0 must be a finite number > 0"),
    (["--top-k", "4", "--valid-vocab", "10"], "--valid-vocab 10: the shards hold token id"),
    (["--top-k", "4", "--valid-vocab", "0"], "--valid-vocab 0 must be >= 1"),
    (["--top-k", "4", "--valid-vocab", "321"], "--valid-vocab 321 must be in [1, 320]"),
    (["--top-k", "301"], "--top-k 301 must be in [1, 300]"),
    (["--top-k", "-3"], "--top-k -3 must be >= 1"),
    (["--samples", "0"], "--samples 0 must be in [1, 65535]"),
    (["--samples", "65536"], "--samples 65536 must be in [1, 65535]"),
    (["--samples", "4", "--seed", "-1"], "--seed -1 must be in [0, 2**63)"),
    (["--top-k", "4", "--seq-len", "0"], "--seq-len 0 must be >= 1"),
    (["--top-k", "4", "--batch", "0"], "--batch 0 must be >= 1"),
    (["--top-k", "4", "--dtype", "fp8"], "--dtype fp8: unknown dtype"),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_arguments_out_of_range_are_refused_before_anything_is_written(assets, tmp_path, capsys,
                                                                       options, message):
    out = tmp_path / "cache"
    assert main(cli_args(assets, out, *options)) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()


def test_ids_beyond_valid_vocab_in_shards_without_a_manifest_are_refused_naming_the_shard(
        assets, tmp_path, capsys):
    data = bare_shards(assets, tmp_path / "bare")
    args = cli_args(assets, tmp_path / "cache", "--top-k", "4", "--valid-vocab", "10")
    args[3] = str(data)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"{data}/shard_00000.bin: token " in err and "outside --valid-vocab (10)" in err
    assert not list((tmp_path / "cache").glob("*.cache"))


def write_preprocess_record(folder: Path) -> dict:
    """Turn a finished preprocess folder into an interrupted one: one shard done, the
    manifest not yet written, the job's own .progress.json in its place."""
    manifest = json.loads((folder / "manifest.json").read_text())
    (folder / "manifest.json").unlink()
    record = {"settings": settings_of(manifest), "command": "neox-distill preprocess ...",
              "shards": manifest["shards"][:1], "pending": None}
    (folder / ".progress.json").write_text(json.dumps(record))
    return record


def test_token_shard_folders_are_never_taken_for_a_cache_folder(assets, tmp_path, capsys):
    """--out at a preprocess folder, finished (even --data itself) or interrupted: refused as
    the user's shards, never with advice to delete the folder, and nothing touched."""
    interrupted = tmp_path / "interrupted"
    shutil.copytree(assets["data"], interrupted)
    write_preprocess_record(interrupted)
    for folder, what in ((interrupted, "holds an unfinished neox-distill preprocess job"),
                         (assets["data"], "holds token shards (neox-distill preprocess output")):
        before = folder_bytes(folder)
        assert main(cli_args(assets, folder, "--top-k", "4")) == 1
        err = capsys.readouterr().err
        assert what in err and "nothing was touched" in err and "delete" not in err
        assert folder_bytes(folder) == before and not (folder / ".lock").exists()
        with pytest.raises(CacheError, match="not a teacher cache"):
            TeacherCache(folder)  # teacher.cache pointed at the shards


def test_a_second_build_into_the_same_out_is_refused_while_the_first_holds_it(assets, tmp_path,
                                                                             capsys):
    out = tmp_path / "cache"
    killed_build(assets, out, ["--top-k", "8"], 7)  # an unfinished build: record and .tmp
    running = RunLock(out)  # the first build, still running, holds the folder's lock
    running.acquire()
    before = folder_bytes(out)
    try:
        assert main(cli_args(assets, out, "--top-k", "8")) == 1
    finally:
        running.release()
    err = capsys.readouterr().err
    assert "--out=" in err and "in use by another neox-distill cache-teacher build" in err
    assert folder_bytes(out) == before  # its temporary file not truncated, nothing renamed
    assert main(cli_args(assets, out, "--top-k", "8")) == 0
    assert not (out / ".lock").exists()  # a finished cache is its manifest and shards


def test_a_file_size_limit_names_the_file_and_the_build_continues_afterwards(assets, tmp_path):
    """RLIMIT_FSIZE (with SIGXFSZ ignored) makes a write fail as a full disk does."""
    out = tmp_path / "cache"
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (40000, 40000))\n"
        "from engine.commands.cache_teacher import main\n"
        f"sys.exit(main({cli_args(assets, out, '--top-k', '8')!r}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 1, proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {out}/shard_00000.cache.") and ".tmp: file too large" in line
    assert "run the same command again" in line and "Traceback" not in proc.stderr
    assert main(cli_args(assets, out, "--top-k", "8")) == 0
    TeacherCache(out)  # complete, every sha256 verified


def changed_teacher(folder: Path) -> None:
    """The teacher's weights changed in place (same shapes, other values)."""
    model = load_pretrained(folder, dtype=torch.float32)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_pretrained(model, folder)


def test_a_teacher_changed_in_place_is_named_with_what_to_do(assets, tmp_path, capsys):
    mine = {**assets, "teacher": tmp_path / "teacher"}
    shutil.copytree(assets["teacher"], mine["teacher"])
    unfinished, finished = tmp_path / "unfinished", tmp_path / "finished"
    killed_build(mine, unfinished, ["--top-k", "8"], 7)
    assert main(cli_args(mine, finished, "--top-k", "8")) == 0
    changed_teacher(mine["teacher"])
    capsys.readouterr()
    for out in (unfinished, finished):
        before = folder_bytes(out)
        assert main(cli_args(mine, out, "--top-k", "8")) == 1  # the very same command
        err = capsys.readouterr().err
        assert "another teacher (--teacher: fingerprint" in err and "choose another --out" in err
        assert "run its own command again" not in err
        assert out is finished or "to finish it, restore what changed as it was" in err
        assert folder_bytes(out) == before


def test_a_teacher_whose_logits_overflow_is_refused_before_its_records_are_written(
        assets, tmp_path, capsys, monkeypatch):
    out = tmp_path / "cache"
    original = teacher_cache.teacher_chunk_function

    def overflowing(model, device):
        def chunks(input_ids, positions):
            for chunk in original(model, device)(input_ids, positions):
                chunk[3] = float("nan")
                yield chunk
        return chunks

    monkeypatch.setattr(teacher_cache, "teacher_chunk_function", overflowing)
    assert main(cli_args(assets, out, "--top-k", "4")) == 1
    err = capsys.readouterr().err
    assert f"{out}/shard_00000.cache: record 3 would not be a valid teacher distribution" in err
    assert "try --dtype fp32" in err and not (out / "manifest.json").exists()


def test_a_build_begun_by_an_older_neox_distill_is_named_as_such(assets, tmp_path, capsys):
    """A record of format version 1 (no data.content): the message names the version, not
    other shards, and the folder is left as it is."""
    out = tmp_path / "cache"
    killed_build(assets, out, ["--top-k", "8"], 7)
    record = json.loads((out / ".progress.json").read_text())
    record["settings"]["format_version"] = 1
    del record["settings"]["data"]["content"]
    (out / ".progress.json").write_text(json.dumps(record))
    before = folder_bytes(out)
    assert main(cli_args(assets, out, "--top-k", "8")) == 1
    err = capsys.readouterr().err
    assert "another neox-distill (cache format_version 1; this one writes 2)" in err
    assert "other token shards" not in err and folder_bytes(out) == before
