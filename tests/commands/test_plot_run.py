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


def test_a_damaged_metrics_file_is_drawn_from_what_is_readable(tmp_path, capsys):
    """Issue 22, C.15: a null val_ppl (TypeError), a non-UTF-8 line (UnicodeDecodeError) and
    a train record at step 0 (ZeroDivisionError) each stopped the plot; now every readable
    point is drawn and what is skipped is named with its file and line numbers."""
    pytest.importorskip("matplotlib")
    run = write_run(tmp_path / "run", steps=4, kd=True)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().splitlines()  # 1 t1, 2 t2, 3 v2, 4 t3, 5 t4, 6 v4
    lines[1] = lines[1][:20] + b"\xff\xfe" + lines[1][22:]  # step 2's train record
    lines[5] = json.dumps({"kind": "val", "step": 4, "val_ce": 4.0, "val_ppl": None}).encode()
    lines.insert(0, json.dumps({"kind": "train", "step": 0, "loss": 9.0, "tokens_seen": 0,
                                "lr": 0.0}).encode())
    lines.insert(4, b"{broken")
    metrics.write_bytes(b"\n".join(lines) + b"\n")
    out = tmp_path / "c.png"
    assert plot_main([str(run), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err and png_title(out) == curves.CURVES_TITLE
    assert f"plot_run: warning: {metrics}: lines 3 and 5 are not a JSON record" in err
    assert f"plot_run: warning: {metrics}: line 8: val val_ppl is not a number" in err
    with pytest.warns(curves.SkippedValues, match="line 8: val val_ppl"):
        runs = curves.load_runs([run])
    assert runs[0].tokens_per_step == 256.0
    assert runs[0].series("train", "loss", by_tokens=False)[0] == [0.0, 1.0, 3.0, 4.0]
    assert runs[0].series("val", "val_ppl", by_tokens=False) == ([2.0], [25.0])


def test_a_metrics_file_with_no_readable_record_is_an_error(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"\xff\xff\n{not json\n")
    assert plot_main([str(run), "--out", str(tmp_path / "c.png")]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl: holds no readable records (lines 1 and 2 damaged)" in err
    assert "Traceback" not in err and not (tmp_path / "c.png").exists()
