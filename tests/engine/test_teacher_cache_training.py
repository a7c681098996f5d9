"""Training from a teacher cache (teacher.cache): k = V equals online distillation, packed and
padded data with accumulation, bit-exact resume, two gloo ranks, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.data.loader import build_dataset
from engine.data.teacher_cache import CachedTargets, TeacherCache
from engine.kernels.loss_spec import LossSpec
from engine.model import load_pretrained
from engine.teacher_cache import build_teacher_cache
from engine.train.__main__ import main as train_main
from engine.train.config import load_config
from engine.train.loop import run
from engine.train.step import distill_micro_step
from engine.train.teacher_signal import CachedTeacher, LiveTeacher
from tests.cache_assets import SEQ_LEN, VALID_VOCAB, make_cache_assets
from tests.engine.test_ddp import free_port
from tests.engine.test_train import assert_weights_close, final_weights, train_records

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache-train")
    assets = make_cache_assets(root)
    common = dict(seq_len=SEQ_LEN, dtype="fp32", device="cpu", show_progress=False)
    for name, kind in (("full", dict(top_k=VALID_VOCAB)), ("top8", dict(top_k=8)),
                       ("sampled", dict(samples=8, mode="padded"))):
        assets[name] = root / name
        build_teacher_cache(str(assets["teacher"]), str(assets["data"]), str(assets[name]),
                            **common, **kind)
    return assets


def overrides(assets, out_dir, **extra) -> list[str]:
    values = {"run.out_dir": out_dir, "run.steps": 3, "run.seed": 3, "run.val_batches": 2,
              "teacher.dtype": "fp32", "student.path": assets["student"],
              "data.path": assets["data"], "data.mode": "packed", "data.val_fraction": 0.05,
              "data.valid_vocab": VALID_VOCAB, "batch.micro_batch": 2, "batch.accum_steps": 2,
              "batch.seq_len": SEQ_LEN, "optim.lr": 3e-3, "precision": "fp32",
              "device": "cpu"}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--{k}={v}" for k, v in values.items()]


def config(assets, out_dir, **extra):
    return load_config(None, overrides(assets, out_dir, **extra))


def test_whole_vocabulary_cache_equals_online_distillation(assets, tmp_path):
    """k = V: the same losses step by step and the same held-out numbers as the live teacher
    (to float16 storage precision), and the same gradient of one micro-step."""
    online = run(config(assets, tmp_path / "online", teacher__path=assets["teacher"]))
    cached = run(config(assets, tmp_path / "cached", teacher__cache=assets["full"]))
    for o, c in zip(train_records(online["out_dir"]), train_records(cached["out_dir"]),
                    strict=True):
        assert c["valid_tokens"] == o["valid_tokens"] and c["ce"] == pytest.approx(o["ce"], 1e-5)
        # float16 log-probabilities: the KD term to ~1e-3, the loss (mostly CE) to 1e-5.
        assert c["kd"] == pytest.approx(o["kd"], rel=2e-3)
        assert c["loss"] == pytest.approx(o["loss"], rel=2e-5)
    assert cached["val"]["val_ce"] == pytest.approx(online["val"]["val_ce"], rel=1e-5)
    assert cached["val"]["val_kd"] == pytest.approx(online["val"]["val_kd"], rel=2e-3)

    dataset = build_dataset(assets["data"], "packed", SEQ_LEN)
    batch = CachedTargets(dataset, TeacherCache(assets["full"])).get_batch(np.arange(5))
    teacher = load_pretrained(assets["teacher"]).eval()
    grads = []
    for source in (LiveTeacher(teacher), CachedTeacher(TeacherCache(assets["full"]))):
        student = load_pretrained(assets["student"])
        spec = LossSpec(alpha=0.5, temperature=2.0, valid_vocab=VALID_VOCAB)
        distill_micro_step(student, source, batch, spec, normalizer=None)
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
    assert (grads[1] - grads[0]).norm() <= 1e-3 * grads[0].norm()


@pytest.mark.parametrize(("mode", "cache"), [("packed", "top8"), ("padded", "sampled")])
def test_accumulation_equals_one_big_batch(assets, tmp_path, mode, cache):
    # lr 3e-4: Adam turns the key bias's round-off gradient (exactly 0 in exact arithmetic)
    # into steps of +-lr whose signs depend on summation order (test_train.assert_weights_close)
    common = dict(data__mode=mode, teacher__cache=assets[cache], optim__lr=3e-4)
    big = run(config(assets, tmp_path / "big", batch__micro_batch=4, batch__accum_steps=1,
                     **common))
    small = run(config(assets, tmp_path / "small", batch__micro_batch=1, batch__accum_steps=4,
                       **common))
    for b, s in zip(train_records(big["out_dir"]), train_records(small["out_dir"]),
                    strict=True):
        assert b["valid_tokens"] == s["valid_tokens"] and b["kd"] > 0
        assert s["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert s["kd"] == pytest.approx(b["kd"], rel=1e-5)
    assert_weights_close(final_weights(small), final_weights(big))


def test_resume_from_a_cache_is_bit_exact(assets, tmp_path):
    straight = run(config(assets, tmp_path / "straight", teacher__cache=assets["top8"],
                          run__steps=4, run__save_every=2))
    out = tmp_path / "resumed"
    run(config(assets, out, teacher__cache=assets["top8"], run__steps=2))
    resumed = run(config(assets, out, teacher__cache=assets["top8"], run__steps=4))
    assert [r["step"] for r in train_records(out)] == [1, 2, 3, 4]
    for mine, ref in zip(train_records(out), train_records(straight["out_dir"]), strict=True):
        for key in ("loss", "ce", "kd", "grad_norm"):
            assert mine[key] == ref[key], (mine["step"], key)
    for name, ref in final_weights(straight).items():
        assert final_weights(resumed)[name].equal(ref), name


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_gloo_ranks_match_one_process(assets, tmp_path, strategy):
    """Rank splits of the cached targets; under FSDP the sparse head loss runs inside the
    sharded student's forward (engine.train.fsdp.head_loss)."""
    common = dict(data__mode="padded", teacher__cache=assets["sampled"], optim__lr=3e-4)
    single = run(config(assets, tmp_path / "single", batch__accum_steps=4, **common))
    out = tmp_path / strategy
    common["dist__strategy"] = strategy
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "NEOX_DIST_TIMEOUT_S": "120"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "engine.train",
         *overrides(assets, out, **common)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for d, s in zip(train_records(out), train_records(single["out_dir"]), strict=True):
        assert d["valid_tokens"] == s["valid_tokens"]
        assert d["loss"] == pytest.approx(s["loss"], rel=1e-5)
        assert d["kd"] == pytest.approx(s["kd"], rel=1e-5)
    assert_weights_close(final_weights({"export_dir": out / "final"}), final_weights(single))


def test_mismatched_cache_is_a_config_error(assets, tmp_path, capsys):
    cases = [
        (dict(data__mode="padded", teacher__cache=assets["top8"]),
         r"other data: mode 'packed' (training: 'padded')"),
        (dict(batch__seq_len=16, teacher__cache=assets["top8"]), "seq_len 32 (training: 16)"),
        (dict(loss__temperature=1.0, teacher__cache=assets["top8"]),
         "temperature 2.0, but loss.temperature is 1.0"),
        (dict(teacher__cache=assets["top8"], teacher__path=assets["student"]),
         "another teacher than teacher.path"),
        (dict(teacher__cache=tmp_path / "nothing"), "nothing is not a folder"),
    ]
    for number, (extra, message) in enumerate(cases):
        code = train_main(overrides(assets, tmp_path / f"run{number}", **extra))
        err = capsys.readouterr().err
        assert code == 2 and message in err and "Traceback" not in err, err


def test_metrics_say_the_kd_comes_from_the_cache(assets, tmp_path):
    result = run(config(assets, tmp_path / "run", teacher__cache=assets["top8"]))
    log = (Path(result["out_dir"]) / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in log]
    assert all(r["kd"] > 0 for r in records if r["kind"] == "train")
    val = [r for r in records if r["kind"] == "val"][-1]
    assert val["val_kd_source"] == "cache" and val["val_kd"] > 0


def test_model_card_of_a_cache_run_names_the_teacher_and_the_cache(assets, tmp_path):
    result = run(config(assets, tmp_path / "run", teacher__cache=assets["top8"]))
    card = (Path(result["export_dir"]) / "README.md").read_text()
    assert "distilled from a GPT-NeoX teacher" in card and "cross-entropy only" not in card
    assert f"read from its cache `{assets['top8']}`" in card
    assert "top-8 per position" in card and "KD to the teacher cache" in card
    assert "--teacher " not in card  # no teacher folder to score against
