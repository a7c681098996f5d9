"""`neox-distill plot`: one line per run in each panel, clear errors, no overwriting."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from engine import curves
from engine.commands.plot_run import main as plot_main
from engine.quickstart import pipeline as quickstart


def write_run(folder: Path, *, steps: int, kd: bool, tokens: bool = True) -> Path:
    """A metrics.jsonl like engine.train writes: train records, a val record every 2 steps."""
    folder.mkdir(parents=True)
    lines = []
    for step in range(1, steps + 1):
        record = {"kind": "train", "step": step, "loss": 3.0 / step, "ce": 4.0 / step,
                  "kd": 0.5 / step if kd else None, "lr": 1e-3 * step, "skipped": False}
        if tokens:
            record["tokens_seen"] = 256 * step
        lines.append(record)
        if step % 2 == 0:
            lines.append({"kind": "val", "step": step, "val_ce": 4.0, "val_ppl": 50.0 / step})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


def png_title(path: Path) -> str | None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (1500, 850)
        return image.text.get("Title")


def test_one_line_per_run_in_every_panel(tmp_path):
    pytest.importorskip("matplotlib")
    distill = write_run(tmp_path / "runs" / "distill", steps=6, kd=True)
    control = write_run(tmp_path / "runs" / "control", steps=6, kd=False)
    out = tmp_path / "curves.png"
    drawn = curves.plot_runs([distill, control], out)
    assert png_title(out) == curves.CURVES_TITLE
    assert len(drawn) == 5
    for (title, _, key), labels in zip(curves.PANELS, drawn.values(), strict=True):
        assert labels == (["distill"] if key == "kd" else ["distill", "control"]), title
    runs = curves.load_runs([distill])
    assert runs[0].series("val", "val_ppl", by_tokens=True) == ([512.0, 1024.0, 1536.0],
                                                                [25.0, 12.5, 50.0 / 6])


def test_runs_without_tokens_seen_are_drawn_against_steps(tmp_path):
    pytest.importorskip("matplotlib")
    old = write_run(tmp_path / "old", steps=3, kd=False, tokens=False)
    runs = curves.load_runs([old])
    assert runs[0].tokens_per_step is None
    assert runs[0].series("train", "loss", by_tokens=False)[0] == [1.0, 2.0, 3.0]
    assert curves.plot_runs([old], tmp_path / "old.png")["learning rate"] == ["old"]


def test_command_line_errors_and_output_safety(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", steps=2, kd=True)
    (tmp_path / "empty").mkdir()
    assert plot_main([str(run), str(tmp_path / "empty"), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "empty: has no metrics.jsonl" in err and "Traceback" not in err
    assert not (tmp_path / "c.png").exists()
    mine = tmp_path / "mine.png"
    mine.write_bytes(b"a user's picture")
    assert plot_main([str(run), "--out", str(mine)]) == 2
    assert "not written by plot_run" in capsys.readouterr().err
    assert mine.read_bytes() == b"a user's picture"
    ours = tmp_path / "ours.png"
    assert plot_main([str(run), "--out", str(ours)]) == 0
    assert plot_main([str(run), "--out", str(ours)]) == 0  # our own picture is replaced
    assert "wrote" in capsys.readouterr().out and png_title(ours) == curves.CURVES_TITLE


def test_without_matplotlib_the_error_says_how_to_install(tmp_path, monkeypatch, capsys):
    run = write_run(tmp_path / "run", steps=2, kd=True)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(curves.CurvesError, match=r"pip install '\.\[plot\]'"):
        curves.plot_runs([run], tmp_path / "c.png")
    assert plot_main([str(run), "--out", str(tmp_path / "c.png")]) == 2
    assert "needs matplotlib" in capsys.readouterr().err


def test_quickstart_draws_distill_against_control(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    runs = {stage: {"out_dir": str(write_run(tmp_path / stage, steps=4, kd=stage == "distill"))}
            for stage in ("teacher_pretrain", "distill", "control")}
    path = quickstart.draw_curves(runs, tmp_path)
    assert path == str(tmp_path / "curves.png") and png_title(Path(path)) == curves.CURVES_TITLE
    monkeypatch.setattr(quickstart.importlib.util, "find_spec", lambda name: None)
    assert quickstart.draw_curves(runs, tmp_path / "elsewhere") is None
