"""benchmarks.divergences at the quickstart's test size: the base built once, then reused from a
finished quickstart; one row per divergence plus the CE-only control, same held-out tokens."""

from __future__ import annotations

import json

import pytest

from benchmarks import divergences as study


@pytest.mark.slow
def test_tiny_study_builds_then_reuses_the_base(tmp_path, capsys):
    out = tmp_path / "study"
    results = tmp_path / "results"
    paths = ["--json", str(results / "d.json"), "--md", str(results / "d.md"), "--png",
             str(results / "d.png")]
    assert study.main(["--tiny", "--quickstart", str(tmp_path / "none"), "--out", str(out),
                       "--divergences", "forward_kl", "tvd", *paths]) == 0
    saved = json.loads((results / "d.json").read_text())
    assert saved["base"]["source"] == "built here"
    rows = saved["rows"]
    assert [r["divergence"] for r in rows] == ["forward_kl", "tvd", study.CONTROL]
    assert len({r["tokens"] for r in rows}) == 1 and rows[0]["tokens"] > 0
    assert all(r["ppl"] > 1 and r["kd_forward_kl"] > 0 and r["step_time_s"] > 0 for r in rows)
    table = (results / "d.md").read_text()
    assert "| tvd |" in table and "KD to the teacher (forward KL)" in table

    # A finished quickstart (its summary file) is reused instead of building anything.
    quickstart = tmp_path / "quickstart"
    quickstart.mkdir()
    base = saved["base"]
    (quickstart / "quickstart.json").write_text(json.dumps({
        "runs": {"teacher_pretrain": {"export_dir": base["teacher"]},
                 "student_base": {"export_dir": base["base"]}},
        "data_dir": base["data_dir"], "tokenizer": {"vocab": base["vocab"]}}))
    assert study.main(["--tiny", "--quickstart", str(quickstart), "--out",
                       str(tmp_path / "again"), "--divergences", "forward_kl", "--no-control",
                       *paths]) == 0
    again = json.loads((results / "d.json").read_text())
    assert again["base"]["source"] == str(quickstart)
    assert again["rows"][0]["ppl"] == pytest.approx(rows[0]["ppl"], rel=1e-6)  # same run


def test_refuses_an_out_folder_it_did_not_write(tmp_path):
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match="was not written by this benchmark"):
        study.main(["--tiny", "--out", str(foreign)])
    assert (foreign / "notes.txt").read_text() == "keep me"
