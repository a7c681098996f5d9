"""The commands that write where the user says never replace what they did not write, and say
what is wrong in one line (issue 22, items A.2, A.3, C.16, C.24; each failed before the fix).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine.commands.consolidate_checkpoint import main as consolidate_main
from engine.commands.memplan import main as memplan_main
from engine.model import load_pretrained
from engine.train import checkpoint as ckpt
from engine.train.__main__ import main as train_main
from tests.engine.test_train import base_overrides, make_assets

SEED_TOML = ('[teacher]\npath = "EleutherAI/pythia-160m"\n'
             '[student]\npath = "EleutherAI/pythia-70m"\n')


def every_file(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


def one_line_error(capsys, prefix: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(prefix) and err.count("\n") == 1 and "Traceback" not in err, err
    return err


# --------------------------------------------------------------------------------------
# memplan --json (A.3) and --budget (C.16)
# --------------------------------------------------------------------------------------


def test_memplan_json_never_overwrites_a_file_it_did_not_write(tmp_path, capsys):
    config = tmp_path / "seed.toml"
    config.write_text(SEED_TOML)
    assert memplan_main(["--config", str(config), "--json", str(config)]) == 2
    assert "was not written by memplan" in one_line_error(capsys, "memplan: error: --json")
    assert config.read_text() == SEED_TOML  # its own --config, untouched
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "plan"}\n')
    for args in (["--config", str(config)], ["--ladder", "--seq-len", "64"]):
        assert memplan_main([*args, "--json", str(mine)]) == 2
        one_line_error(capsys, "memplan: error: --json")
    assert mine.read_text() == '{"my": "plan"}\n'
    # Its own earlier output is replaced, atomically (no temporary left beside it).
    plan = tmp_path / "plan.json"
    assert memplan_main(["--config", str(config), "--json", str(plan)]) == 0
    assert memplan_main(["--config", str(config), "--json", str(plan),
                         "--batch.micro_batch=3"]) == 0
    assert json.loads(plan.read_text())["plan"]["micro_batch"] == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.json", "plan.json",
                                                          "seed.toml"]


def test_memplan_refuses_an_absurd_budget_in_one_line(tmp_path, capsys):
    config = tmp_path / "seed.toml"
    config.write_text(SEED_TOML)
    assert memplan_main(["--config", str(config), "--budget", "1e30GiB"]) == 2
    assert "--budget 1e30GiB" in one_line_error(capsys, "memplan: error:")
    assert memplan_main(["--ladder", "--budget", "1e30GiB", "--seq-len", "64"]) == 2
    assert "implausibly large" in one_line_error(capsys, "memplan: error:")


# --------------------------------------------------------------------------------------
# consolidate (A.2, C.24)
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> dict[str, Path]:
    """A 1-rank FSDP run: its sharded checkpoint, a DDP run's checkpoint, the tiny assets."""
    root = tmp_path_factory.mktemp("consolidate")
    assets = make_assets(root / "assets")
    assert train_main(base_overrides(assets, root / "fsdp", run__steps=1,
                                     dist__strategy="fsdp")) == 0
    assert train_main(base_overrides(assets, root / "ddp", run__steps=1)) == 0
    return {"checkpoint": ckpt.latest_checkpoint(root / "fsdp"),
            "ddp_checkpoint": ckpt.latest_checkpoint(root / "ddp"), **assets}


def test_consolidate_never_replaces_a_model_folder_it_did_not_write(sharded, tmp_path, capsys):
    folder = sharded["checkpoint"]
    student_base = tmp_path / "student-base"
    shutil.copytree(sharded["student"], student_base, ignore=shutil.ignore_patterns(
        "neox_distill_export.json"))  # as downloaded: config.json + model.safetensors only
    own_student = sharded["ddp_checkpoint"] / "student"  # a checkpoint's own student/
    for target in (student_base, own_student):
        before = every_file(target)
        assert consolidate_main([str(folder), str(target)]) == 2
        assert "was not exported by neox-distill" in one_line_error(
            capsys, "consolidate_checkpoint: error:")
        assert every_file(target) == before
    ckpt.verify_checkpoint(sharded["ddp_checkpoint"])  # still intact
    # Its own output is replaced on a rerun, unless a file in it was edited since.
    out = tmp_path / "out"
    assert consolidate_main([str(folder), str(out)]) == 0
    assert consolidate_main([str(folder), str(out)]) == 0
    assert load_pretrained(out).config.vocab_size > 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "note": "mine"}))
    assert consolidate_main([str(folder), str(out)]) == 2
    assert "config.json (edited)" in one_line_error(capsys, "consolidate_checkpoint: error:")
    assert json.loads((out / "config.json").read_text())["note"] == "mine"


def test_consolidate_names_a_missing_checkpoint_and_a_file_as_output(sharded, tmp_path,
                                                                     capsys):
    missing = tmp_path / "checkpoints" / "step-00000009"
    assert consolidate_main([str(missing), str(tmp_path / "out")]) == 2
    err = one_line_error(capsys, "consolidate_checkpoint: error:")
    assert f"{missing}: no such checkpoint folder" in err and "DONE" not in err
    assert consolidate_main([str(tmp_path), str(tmp_path / "out")]) == 2
    assert "not a checkpoint" in one_line_error(capsys, "consolidate_checkpoint: error:")
    a_file = tmp_path / "model.txt"
    a_file.write_text("mine")
    assert consolidate_main([str(sharded["checkpoint"]), str(a_file)]) == 2
    err = one_line_error(capsys, "consolidate_checkpoint: error:")
    assert "exists and is not a folder (a file)" in err and "holds more than" not in err
    assert a_file.read_text() == "mine"


# --------------------------------------------------------------------------------------
# neox-distill eval --json / --png: the same rule (A, another instance)
# --------------------------------------------------------------------------------------


def test_eval_never_overwrites_a_file_it_did_not_write(sharded, tmp_path, capsys):
    from engine.eval.__main__ import main as eval_main

    model = tmp_path / "model"
    shutil.copytree(sharded["student"], model)
    config_json = model / "config.json"
    before = every_file(model)
    picture = tmp_path / "holiday.png"
    picture.write_bytes(b"\x89PNG not a chart of ours")
    common = ["--model", str(model), "--task", "ppl", "--data", str(sharded["data"]),
              "--heldout", "packed", "--val-fraction", "0.05", "--max-length", "16",
              "--limit", "2", "--no-progress"]
    for extra in (["--json", str(config_json)], ["--json", str(picture)],
                  ["--compare", str(model), "--png", str(picture)]):
        assert eval_main([*common, *extra]) == 2
        assert "was not written by engine.eval" in one_line_error(capsys, "error: --")
    assert every_file(model) == before
    assert picture.read_bytes() == b"\x89PNG not a chart of ours"
    results = tmp_path / "results.json"  # its own output is replaced on a rerun
    for _ in range(2):
        assert eval_main([*common, "--json", str(results)]) == 0
    assert json.loads(results.read_text())["results"][0]["task"].startswith("ppl")
