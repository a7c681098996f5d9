"""benchmarks.sampling at smoke size: both engines run on the same weights and prompts, agree
greedily, and the comparison is printed and written in one call."""

from __future__ import annotations

import json

from benchmarks import sampling


def test_smoke_compares_ours_with_transformers_generate(tmp_path, capsys):
    path = tmp_path / "sampling.json"
    assert sampling.main(["--smoke", "--json", str(path)]) == 0
    saved = json.loads(path.read_text())
    assert saved["shapes"] == sampling.SMOKE and saved["repeats"] == 1
    assert set(saved["median_tokens_per_s"]) == {"ours", "transformers"}
    assert all(rate > 0 for rate in saved["median_tokens_per_s"].values())
    assert saved["ratio_of_medians"] > 0 and len(saved["per_round_ratio"]) == 1
    assert saved["cpu_ratio_of_medians"] > 0 and saved["device"].startswith("cpu")
    assert all(len(times) == 1 for times in saved["cpu_seconds"].values())
    assert saved["greedy_token_agreement"] == 1.0  # same weights, same greedy tokens
    assert "load_average_before" in saved and saved["threads"] == 1
    assert "ours / transformers: x" in capsys.readouterr().out
