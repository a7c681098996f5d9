"""The preprocess command's user errors: one line, naming the file, exit 1, nothing left."""

from __future__ import annotations

import errno
import os
import re
import stat

import pytest

import engine.data.preprocess as prep
from tests.data.common import docs_lines, write_jsonl


def run_main(capsys, *args) -> tuple[int, str]:
    code = prep.main([str(a) for a in args])
    return code, capsys.readouterr().err


def assert_one_clean_line(err: str, starts: str) -> None:
    assert err.startswith(f"error: {starts}"), err
    assert err.count("\n") == 1 and "Error" not in err and "Traceback" not in err, err


@pytest.mark.parametrize(
    "lines, message",
    [
        ([], r"no lines to tokenise \(empty input\); no shards written"),
        (['{"body": "x"}', "", '{"text": ""}'], r"every one of the 3 lines was skipped "
                                                r"\(blank_line 1, missing_text 1, empty_text 1; "
                                                r"e\.g\. .*:1: missing_text"),
    ],
    ids=["empty", "all-skipped"],
)
def test_no_tokens_is_an_error_that_leaves_the_folder_empty(tmp_path, bpe, capsys, lines,
                                                            message):
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    out = tmp_path / "out"
    code, err = run_main(capsys, "--input", source, "--tokenizer", bpe, "--output", out)
    assert code == 1
    assert_one_clean_line(err, f"{source}: ")
    assert re.search(message, err), err
    assert list(out.iterdir()) == []  # no record: the next run starts afresh


def test_zstd_data_in_a_file_named_jsonl_is_named_before_anything_is_written(tmp_path, bpe,
                                                                             capsys, texts):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:5]), compress=True)
    code, err = run_main(capsys, "--input", source, "--tokenizer", bpe, "--output",
                         tmp_path / "out")
    assert code == 1
    assert_one_clean_line(err, f"{source}: zstd-compressed data in a file not named .zst; "
                               "rename it to in.jsonl.zst")
    assert not (tmp_path / "out").exists()


def test_messages_name_the_file_without_class_names(tmp_path, bpe, capsys, texts):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:5]))
    not_a_tokenizer = write_jsonl(tmp_path / "x.json", ['{"vocab": {}}'])
    code, err = run_main(capsys, "--input", source, "--tokenizer", not_a_tokenizer,
                         "--output", tmp_path / "out")
    assert code == 1
    assert_one_clean_line(err, f"{not_a_tokenizer}: not a tokenizer.json")

    a_file = tmp_path / "a_file"
    a_file.write_text("user data")
    code, err = run_main(capsys, "--input", source, "--tokenizer", bpe, "--output", a_file)
    assert code == 1 and a_file.read_text() == "user data"
    assert_one_clean_line(err, f"{a_file}: exists and is not a folder")

    code, err = run_main(capsys, "--input", source, "--tokenizer", bpe, "--output",
                         tmp_path / "out", "--workers", "0")
    assert code == 1
    assert_one_clean_line(err, "--workers: must be >= 1, not 0")


def test_os_errors_name_the_file_not_the_errno(tmp_path):
    error = OSError(28, "No space left on device", str(tmp_path / "shard_00003.bin"))
    assert prep._os_error_message(error) == f"{tmp_path}/shard_00003.bin: No space left on device"


@pytest.mark.parametrize("umask", [0o027, 0o002])
def test_shards_record_and_manifest_follow_the_umask(tmp_path, bpe, texts, umask, monkeypatch):
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:60]))
    out = tmp_path / "out"
    modes = {}
    real_finish = prep.JobRecord.finish_shard

    def finish_and_look(self, entry):  # the record exists only while the job runs
        real_finish(self, entry)
        modes[".progress.json"] = stat.S_IMODE((out / ".progress.json").stat().st_mode)

    monkeypatch.setattr(prep.JobRecord, "finish_shard", finish_and_look)
    previous = os.umask(umask)
    try:
        prep.preprocess([source], bpe, out, shard_tokens=600)
    finally:
        os.umask(previous)
    modes.update({p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()})
    assert len(modes) > 3 and set(modes.values()) == {0o666 & ~umask}
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask


def test_a_full_disk_in_the_first_shard_is_named_and_leaves_nothing(tmp_path, bpe, texts, capsys,
                                                                    monkeypatch):
    import engine.data.shards

    def disk_full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    # The .bin is already renamed into place when its .idx fails to be written.
    monkeypatch.setattr(engine.data.shards, "open_atomic", disk_full)
    source = write_jsonl(tmp_path / "in.jsonl", docs_lines(texts[:5]))
    out = tmp_path / "out"
    code, err = run_main(capsys, "--input", source, "--tokenizer", bpe, "--output", out)
    assert code == 1
    assert_one_clean_line(err, f"{out / 'shard_00000.idx'}: No space left on device")
    assert list(out.iterdir()) == []  # no orphan .bin: the next run is not refused
