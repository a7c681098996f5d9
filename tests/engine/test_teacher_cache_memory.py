"""The memory plan of a run trained from a teacher cache: no teacher forward in the step."""

from __future__ import annotations

import json

from engine.commands.memplan import main as memplan_main
from engine.memory import plan_memory, training_flops_per_token
from engine.model.config import pythia_config
from engine.train.config import load_config
from engine.train.setup import memory_plan_args

TEACHER, STUDENT = pythia_config("pythia-160m"), pythia_config("pythia-70m")


def test_a_cache_removes_the_teacher_forward_and_adds_its_targets():
    for fused_head in (True, False):
        common = dict(micro_batch=2, seq_len=2048, fused_head=fused_head)
        online = plan_memory(TEACHER, STUDENT, **common)
        cached = plan_memory(None, STUDENT, teacher_cache_width=64, **common)
        both = plan_memory(TEACHER, STUDENT, teacher_cache_width=64, **common)
        assert not any("teacher" in name for name in cached.components
                       if "cache" not in name)
        targets = [b for n, b in cached.components.items() if n.startswith("teacher cache")]
        assert targets == [2 * 2048 * (8 * 64 + 12)]
        # teacher.path beside the cache (for the held-out KD): its weights, not its forward
        teacher_parts = [n for n in both.components if n.startswith("teacher")]
        assert sorted(teacher_parts) == sorted(
            [n for n in cached.components if n.startswith("teacher")]
            + [n for n in online.components if n.startswith("teacher weights")])
        assert cached.allocated_peak < both.allocated_peak < online.allocated_peak
        assert cached.flops_per_token == both.flops_per_token == \
            training_flops_per_token(STUDENT, None, 2048)


def test_memplan_and_the_engine_plan_a_cache_run_alike(tmp_path, capsys):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "manifest.json").write_text(json.dumps(
        {"format": "neox-distill-teacher-cache", "format_version": 1, "kind": "top_k",
         "width": 8}))
    config_path = tmp_path / "run.toml"
    config_path.write_text('precision = "bf16-pure"\n[teacher]\npath = ""\ncache = "'
                           f'{cache}"\n[student]\npath = "/models/pythia-70m"\n'
                           '[batch]\nmicro_batch = 2\nseq_len = 2048\n')
    config = load_config(config_path, check=False)
    assert memory_plan_args(config)["teacher_cache_width"] == 8
    assert memplan_main(["--config", str(config_path), "--budget", "12GiB"]) == 0
    out = capsys.readouterr().out
    assert "teacher cache targets [B,T,8]" in out and "teacher weights" not in out
