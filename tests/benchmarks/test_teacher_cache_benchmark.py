"""benchmarks.teacher_cache --smoke: every section runs and reports, on tiny assets laid out
like a quickstart folder (the real study reuses runs/quickstart)."""

from __future__ import annotations

import json

from benchmarks import teacher_cache
from engine.quickstart.pipeline import MARKER
from tests.cache_assets import VALID_VOCAB, make_cache_assets


def test_smoke_reports_every_row_and_ratio(tmp_path):
    assets = make_cache_assets(tmp_path / "assets")
    base = tmp_path / "quickstart"
    base.mkdir()
    (base / MARKER).write_text(json.dumps({
        "runs": {"teacher_pretrain": {"export_dir": str(assets["teacher"])},
                 "student_base": {"export_dir": str(assets["student"])}},
        "data_dir": str(assets["data"]),
        "tokenizer": {"path": str(assets["tokenizer"]), "vocab": VALID_VOCAB}}))
    out = tmp_path / "report.json"
    assert teacher_cache.main(["--smoke", "--base", str(base), "--json", str(out),
                               "--steps", "1"]) == 0
    report = json.loads(out.read_text())
    assert list(report["rows"]) == list(teacher_cache.ROWS)
    for row in report["rows"].values():
        assert row["val_ppl"] > 1 and row["step_time_s"] > 0
    for name, build in report["cache_build"]["builds"].items():
        assert build["bytes_per_token"] == build["target_bytes_per_token"], name
        assert build["vs_teacher_forward"] > 0
    for shape in ("quickstart", "seed"):
        assert report["step_ratio"][shape]["speedup_cpu"] > 0
    assert "| top-64 |" in report["table"]
