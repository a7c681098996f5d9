"""neox-distill cache-teacher: --help, a killed build resumed byte-identical to an
uninterrupted one, reruns, and refusals that leave the user's files alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine.commands.cache_teacher import main
from engine.data import failpoints
from engine.data.atomic import write_json_atomic
from engine.data.teacher_cache import CacheError, TeacherCache
from engine.data.teacher_cache_job import CacheJob
from tests.cache_assets import SEQ_LEN, make_cache_assets

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_cache_assets(tmp_path_factory.mktemp("cli-assets"))


def cli_args(assets, out, *kind):
    return ["--teacher", str(assets["teacher"]), "--data", str(assets["data"]), "--out",
            str(out), "--seq-len", str(SEQ_LEN), "--dtype", "fp32", "--device", "cpu",
            "--batch", "8", *kind]


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def killed_build(assets, out: Path, kind: list[str], after_batches: int) -> None:
    """The build in a child process that kills itself after `after_batches` batches (their
    records written, not yet checkpointed), checkpointing after every batch until then."""
    options = dict(top_k=None, samples=None, mode="packed")
    options.update({kind[i].strip("-").replace("-", "_"): kind[i + 1]
                    for i in range(0, len(kind), 2)})
    code = (
        "from engine.teacher_cache import build_teacher_cache\n"
        f"build_teacher_cache({str(assets['teacher'])!r}, {str(assets['data'])!r}, "
        f"{str(out)!r}, top_k={options['top_k']}, samples={options['samples']}, "
        f"mode={options['mode']!r}, seq_len={SEQ_LEN}, dtype='fp32', device='cpu', batch=8, "
        "show_progress=False, checkpoint_seconds=0)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           **failpoints.arm("teacher_cache.batches", after_batches)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr  # SIGKILL


@pytest.mark.parametrize(("kind", "after_batches"), [
    (["--top-k", "8"], 12),  # the first shard finished, the second begun
    (["--samples", "16", "--mode", "padded"], 7),  # inside the first shard
], ids=["topk-packed", "sampled-padded"])
def test_a_killed_build_resumes_byte_identical(assets, tmp_path, kind, after_batches):
    straight = tmp_path / "straight"
    assert main(cli_args(assets, straight, *kind)) == 0
    resumed = tmp_path / "resumed"
    killed_build(assets, resumed, kind, after_batches)
    leftovers = sorted(p.name for p in resumed.iterdir())
    assert ".progress.json" in leftovers and "manifest.json" not in leftovers
    assert any(name.endswith(".tmp") for name in leftovers)
    with pytest.raises(CacheError, match=r"unfinished neox-distill cache-teacher job"):
        TeacherCache(resumed)
    assert main(cli_args(assets, resumed, *kind)) == 0
    assert folder_bytes(resumed) == folder_bytes(straight)


def test_help_explains_both_kinds(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for phrase in ("--top-k K", "--samples S", "tail", "unbiased", "4K + 8 bytes",
                   "byte-identical", "teacher.cache=CACHE"):
        assert phrase in text


def test_reruns_and_refusals_leave_files_alone(assets, tmp_path, capsys):
    out = tmp_path / "cache"
    assert main(cli_args(assets, out, "--top-k", "4")) == 0
    before = folder_bytes(out)
    assert main(cli_args(assets, out, "--top-k", "4")) == 0  # already built: returned as is
    assert folder_bytes(out) == before
    capsys.readouterr()
    assert main(cli_args(assets, out, "--top-k", "5")) == 1
    assert "built with --top-k 4 (this command: --top-k 5)" in capsys.readouterr().err
    assert folder_bytes(out) == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    assert main(cli_args(assets, foreign, "--samples", "4")) == 1
    err = capsys.readouterr().err
    assert "not empty and not a teacher cache folder" in err and "notes.txt" in err
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]

    for kind, message in ((["--top-k", "0"], "--top-k 0 must be >= 1"),
                          (["--top-k", "8", "--seq-len", "65"],
                           "--seq-len 65 exceeds the teacher's max_positions 64"),
                          (["--samples", "8", "--temperature", "0"], "--temperature 0.0 must be")):
        args = [*cli_args(assets, tmp_path / "x"), *kind]  # the last --seq-len wins
        assert main(args) == 1
        assert message in capsys.readouterr().err
    missing = cli_args(assets, tmp_path / "y", "--top-k", "4")
    missing[1] = str(tmp_path / "no-teacher")
    assert main(missing) == 1
    assert "no-teacher" in capsys.readouterr().err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["width"] == 4 and manifest["record"]["bytes"] == 24


def test_a_record_left_beside_a_complete_cache_is_dropped_only_if_it_is_the_builds(
        assets, tmp_path, capsys, monkeypatch):
    """A build killed between writing its manifest and removing its record leaves the record:
    the rerun deletes it after checking it is this build's; a foreign file by that name stays."""
    out = tmp_path / "cache"
    with monkeypatch.context() as patch:  # the manifest lands, the kill comes before the rest
        patch.setattr(CacheJob, "complete", lambda self, manifest: write_json_atomic(
            self.folder / "manifest.json", manifest, indent=1, sort_keys=True))
        assert main(cli_args(assets, out, "--top-k", "4")) == 0
    record = out / ".progress.json"
    assert record.is_file()
    assert main(cli_args(assets, out, "--top-k", "4")) == 0
    assert not record.exists()
    record.write_text('{"settings": "not this build\'s"}')
    capsys.readouterr()
    assert main(cli_args(assets, out, "--top-k", "4")) == 1
    err = capsys.readouterr().err
    assert "not its own build record" in err and "nothing was deleted" in err
    assert record.read_text() == '{"settings": "not this build\'s"}'


def test_a_record_naming_a_foreign_pending_file_is_refused_and_the_file_kept(assets, tmp_path,
                                                                             capsys):
    """A damaged or foreign job record cannot make a resume rename, truncate or append to a
    file the build did not create: the pending file's name must be the build's own."""
    out = tmp_path / "cache"
    killed_build(assets, out, ["--top-k", "8"], 7)
    record = json.loads((out / ".progress.json").read_text())
    assert record["state"]["pending"] is not None
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    record["state"]["pending"]["temporary"] = str(victim)
    (out / ".progress.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(cli_args(assets, out, "--top-k", "8")) == 1
    assert "is not one this tool writes" in capsys.readouterr().err
    assert victim.read_text() == "precious"


def test_a_record_whose_pending_name_leaves_the_folder_is_refused_and_the_file_kept(
        assets, tmp_path, capsys):
    """A pending file named as the build names them, but through another folder
    ("../victim.cache.<8 hex>.tmp"), is not the build's: nothing outside --out is touched,
    by a resume or by discarding a build that made nothing durable."""
    out = tmp_path / "cache"
    killed_build(assets, out, ["--top-k", "8"], 7)
    record = json.loads((out / ".progress.json").read_text())
    victim = tmp_path / "victim.cache.0123abcd.tmp"
    victim.write_text("precious")
    record["state"]["pending"].update(name="../victim", temporary="../victim.cache.0123abcd.tmp",
                                      rows=0)
    record["state"]["shards"] = []
    record["settings"]["width"] = 5  # other settings: a nothing-durable record is discarded
    (out / ".progress.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(cli_args(assets, out, "--top-k", "8")) == 1
    assert "is not one this tool writes" in capsys.readouterr().err
    assert victim.read_text() == "precious"


def test_an_unreadable_record_still_names_the_folder_unfinished(tmp_path):
    (tmp_path / ".progress.json").write_text("{torn")
    with pytest.raises(CacheError, match=r"unfinished neox-distill cache-teacher job"):
        TeacherCache(tmp_path)

