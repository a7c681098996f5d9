"""benchmarks.train_step at smoke size: the three variants run and are compared in one call."""

from __future__ import annotations

import json

from benchmarks import train_step


def test_smoke_compares_fused_head_full_logits_and_transformers(tmp_path, capsys):
    path = tmp_path / "train_step.json"
    assert train_step.main(["--smoke", "--json", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert set(saved["results"]) == {"ours", "ours_logits", "transformers"}
    fused, logits = (saved["results"][name]["losses"] for name in ("ours", "ours_logits"))
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(fused, logits, strict=True))
    assert saved["fused_vs_logits_tokens_per_s"] > 0 and "fused_saves_peak_bytes" in saved
    assert "fused head / full logits" in capsys.readouterr().out
