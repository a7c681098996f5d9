"""engine.train.run end to end on tiny models and shards: resume, accumulation, errors.

The helpers at the top (tiny checkpoints, tiny shards, a base configuration) are shared with
test_checkpoint.py and test_ddp.py.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from engine.data.loader import build_dataset
from engine.data.shards import ShardWriter
from engine.model import GPTNeoX, GPTNeoXConfig, load_pretrained, save_pretrained
from engine.train import checkpoint as ckpt
from engine.train import step as step_module
from engine.train.__main__ import main as train_main
from engine.train.config import ConfigError, load_config
from engine.train.loop import TrainingDiverged, run

VOCAB = 320  # not a power of two
VALID_VOCAB = 300
SEQ_LEN = 16


def make_assets(root: Path) -> dict[str, Path]:
    """A tiny teacher and student checkpoint and one shard of random documents."""
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    shapes = {
        "teacher": dict(hidden_size=64, num_heads=4, intermediate_size=136),
        "student": dict(hidden_size=32, num_heads=2, intermediate_size=72),
    }
    for name, shape in shapes.items():
        model = GPTNeoX(GPTNeoXConfig(vocab_size=VOCAB, num_layers=2, max_positions=64, **shape))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))
        save_pretrained(model, root / name)
    rng = np.random.default_rng(0)
    data = root / "data"
    data.mkdir(exist_ok=True)
    sizes = rng.integers(3, 40, size=160)
    docs = []
    for n in sizes:
        doc = rng.integers(2, VALID_VOCAB, size=n)
        doc[-1] = 0  # EOS ends every document
        docs.append(doc)
    writer = ShardWriter(data / "shard-00000", np.uint16)
    writer.add_documents(np.concatenate(docs), sizes)
    writer.finish()
    return {"teacher": root / "teacher", "student": root / "student", "data": data}


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    return make_assets(tmp_path_factory.mktemp("train-assets"))


def base_overrides(assets: dict[str, Path], out_dir: Path, **extra) -> list[str]:
    values = {
        "run.out_dir": out_dir,
        "run.steps": 4,
        "run.seed": 3,
        "run.val_batches": 2,
        "teacher.path": assets["teacher"],
        "teacher.dtype": "fp32",
        "student.path": assets["student"],
        "data.path": assets["data"],
        "data.mode": "packed",
        "data.val_fraction": 0.05,
        "data.valid_vocab": VALID_VOCAB,
        "batch.micro_batch": 2,
        "batch.accum_steps": 2,
        "batch.seq_len": SEQ_LEN,
        "optim.lr": 3e-3,
        "optim.warmup_steps": 2,
        "optim.weight_decay": 0.01,
        "precision": "fp32",
        "device": "cpu",
    }
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return [f"--{k}={v}" for k, v in values.items()]


def make_config(assets, out_dir, **extra):
    return load_config(None, base_overrides(assets, out_dir, **extra))


def train_records(out_dir: Path) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def final_weights(result: dict) -> dict[str, torch.Tensor]:
    model = load_pretrained(result["export_dir"])
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def do_straight_run(assets, out: Path) -> dict:
    """4 steps without interruption: the reference for every resume test."""
    result = run(make_config(assets, out, run__save_every=2))
    return {"result": result, "records": train_records(out), "weights": final_weights(result)}


@pytest.fixture(scope="session")
def straight_run(assets, tmp_path_factory):
    return do_straight_run(assets, tmp_path_factory.mktemp("straight"))


def assert_same_run(result, straight):
    records = train_records(result["out_dir"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    for mine, ref in zip(records, straight["records"], strict=True):
        for key in ("loss", "ce", "kd", "grad_norm", "lr", "valid_tokens"):
            assert mine[key] == ref[key], (mine["step"], key)
    weights = final_weights(result)
    for name, ref in straight["weights"].items():
        assert torch.equal(weights[name], ref), name


def test_run_writes_everything(straight_run):
    result = straight_run["result"]
    out = Path(result["out_dir"])
    assert result["status"] == "completed" and result["step"] == 4
    assert (out / "config.toml").is_file() and (out / "config.json").is_file()
    assert [p.name for _, p in ckpt.complete_checkpoints(out)] == ["step-00000002",
                                                                   "step-00000004"]
    records = straight_run["records"]
    for key in ("step", "loss", "ce", "kd", "lr", "grad_norm", "tokens_per_s", "mfu",
                "peak_memory_bytes", "eta_s"):
        assert key in records[-1]
    assert records[0]["lr"] == pytest.approx(1.5e-3) and records[1]["lr"] == pytest.approx(3e-3)
    assert all(np.isfinite(r["loss"]) and not r["skipped"] for r in records)
    val = result["val"]
    assert val["val_tokens"] > 0 and np.isfinite(val["val_ce"]) and "val_kd" in val
    assert val["val_divergence"] == "forward_kl"
    assert load_pretrained(result["export_dir"]).config.vocab_size == VOCAB


def test_resume_is_bit_exact(assets, tmp_path, straight_run):
    out = tmp_path / "resumed"
    first = run(make_config(assets, out, run__steps=2))
    assert first["step"] == 2
    second = run(make_config(assets, out, run__steps=4))  # resume=auto is the default
    assert second["step"] == 4
    assert_same_run(second, straight_run)


@pytest.mark.parametrize("mode", ["packed", "padded"])
def test_accumulation_equals_one_big_batch(assets, tmp_path, mode):
    """4 x 1 sequences accumulated == 1 x 4 sequences, with uneven valid-token counts."""
    big = run(make_config(assets, tmp_path / "big", data__mode=mode, batch__micro_batch=4,
                          batch__accum_steps=1, run__steps=3))
    small = run(make_config(assets, tmp_path / "small", data__mode=mode, batch__micro_batch=1,
                            batch__accum_steps=4, run__steps=3))
    big_records, small_records = train_records(big["out_dir"]), train_records(small["out_dir"])
    if mode == "padded":
        assert len({r["valid_tokens"] for r in big_records}) > 1  # documents of unequal length
    for b, s in zip(big_records, small_records, strict=True):
        assert b["valid_tokens"] == s["valid_tokens"]
        assert s["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert s["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    assert_weights_close(final_weights(small), final_weights(big))


def assert_weights_close(weights, reference, rtol=1e-4, atol=1e-6):
    """Close everywhere except the attention *key* bias, which is only near-equal.

    Softmax is invariant to a key bias, so its exact gradient is zero and what autograd
    returns is round-off; Adam divides that by its own square root and turns it into steps of
    about +-lr whose signs depend on summation order. Those rows change nothing downstream.
    """
    for name, ref in reference.items():
        got = weights[name]
        if name.endswith("query_key_value.bias"):
            heads = 2 if got.numel() == 3 * 32 else 4
            got, ref = got.view(heads, 3, -1), ref.view(heads, 3, -1)
            torch.testing.assert_close(got[:, 1], ref[:, 1], rtol=0, atol=1e-3, msg=name)
            got, ref = got[:, 0::2], ref[:, 0::2]
        torch.testing.assert_close(got, ref, rtol=rtol, atol=atol, msg=name)


def poison_steps(monkeypatch, bad_steps: set[int], accum: int = 2):
    """Make the gradient of the given (1-based) optimizer steps non-finite."""
    real = step_module.distill_micro_step
    calls = {"n": 0}

    def poisoned(student, *args, **kwargs):
        stats = real(student, *args, **kwargs)
        calls["n"] += 1
        step = (calls["n"] - 1) // accum + 1
        if step in bad_steps:
            next(iter(student.parameters())).grad.fill_(float("nan"))
        return stats

    monkeypatch.setattr(step_module, "distill_micro_step", poisoned)


def test_non_finite_step_is_skipped(assets, tmp_path, monkeypatch):
    poison_steps(monkeypatch, {2})
    with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
        result = run(make_config(assets, tmp_path / "skip", run__steps=3))
    assert result["status"] == "completed"
    records = train_records(result["out_dir"])
    assert [r["skipped"] for r in records] == [False, True, False]
    steps = load_file(Path(result["checkpoint"]) / "optimizer.safetensors")
    counts = [int(t) for name, t in steps.items() if name.endswith(".step")]
    assert counts and all(c == 2 for c in counts)  # 3 steps, 1 skipped


def test_repeated_non_finite_steps_stop_with_good_checkpoint(assets, tmp_path, monkeypatch,
                                                             capsys):
    poison_steps(monkeypatch, {3, 4, 5, 6})
    out = tmp_path / "diverge"
    overrides = base_overrides(assets, out, run__steps=6, run__save_every=2,
                               run__max_bad_steps=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with pytest.raises(TrainingDiverged, match="2 non-finite steps in a row"):
            run(load_config(None, overrides))
        assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
        before = (ckpt.latest_checkpoint(out) / "student" / "model.safetensors").read_bytes()
        # The command line turns it into a non-zero exit with the message.
        code = train_main(overrides)
    assert code == 1
    assert "non-finite steps in a row" in capsys.readouterr().err
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [2]
    after = (ckpt.latest_checkpoint(out) / "student" / "model.safetensors").read_bytes()
    assert before == after


def test_scratch_student_without_teacher_trains_on_ce(assets, tmp_path):
    result = run(make_config(
        assets, tmp_path / "scratch", teacher__path="", student__init="scratch",
        student__path="", student__num_layers=1, student__hidden_size=32, student__num_heads=2,
        student__intermediate_size=64, student__vocab_size=VOCAB, student__max_positions=32,
        optim__schedule="cosine", optim__min_lr=1e-4, optim__warmup_steps=1, run__steps=3,
    ))
    records = train_records(result["out_dir"])
    assert all(r["kd"] is None and np.isfinite(r["ce"]) for r in records)
    # warmup step at 3e-3, the cosine's start, then its end at min_lr on the last step
    assert [r["lr"] for r in records] == pytest.approx([3e-3, 3e-3, 1e-4])
    assert "val_kd" not in result["val"] and np.isfinite(result["val"]["val_ce"])


def test_memory_budget_keeps_tokens_per_step(assets, tmp_path):
    result = run(make_config(assets, tmp_path / "budget", batch__memory_budget="64GiB",
                             batch__micro_batch=1, batch__accum_steps=6, run__steps=1))
    assert result["micro_batch"] * result["accum_steps"] == 6
    assert result["micro_batch"] == 6  # everything fits in 64 GiB
    with pytest.raises(ConfigError, match="not even one sequence"):
        run(make_config(assets, tmp_path / "tiny-budget", batch__memory_budget="1KiB"))


def test_run_level_configuration_errors(assets, tmp_path, straight_run):
    with pytest.raises(ConfigError, match="max_positions"):
        run(make_config(assets, tmp_path / "a", batch__seq_len=128))
    with pytest.raises(ConfigError, match=r"data\.valid_vocab=999 exceeds"):
        run(make_config(assets, tmp_path / "b", data__valid_vocab=999))
    with pytest.raises(ConfigError, match="must share a vocabulary"):
        run(make_config(assets, tmp_path / "c", student__init="scratch",
                        student__vocab_size=VOCAB + 2, student__num_layers=1,
                        student__hidden_size=32, student__num_heads=2, student__max_positions=32))
    with pytest.raises(ConfigError, match=r"run\.resume=none: .* holds checkpoints"):
        run(make_config(assets, straight_run["result"]["out_dir"], run__resume="none"))
    with pytest.raises(ckpt.CheckpointLoadError, match="not a complete checkpoint"):
        run(make_config(assets, tmp_path / "d", run__resume=tmp_path))


def test_metrics_helpers():
    from engine import memory, metrics

    assert metrics.PEAK_BF16_FLOPS["RTX 3060"] == 25e12
    assert metrics.PEAK_BF16_FLOPS["H100"] == metrics.PEAK_BF16_FLOPS["H200"] == 989e12
    assert metrics.peak_flops(torch.device("cpu")) is None
    assert metrics.mfu(1000.0, 1e9, None) is None
    assert metrics.mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    student = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=72)
    teacher = GPTNeoXConfig(vocab_size=VOCAB, hidden_size=64, num_layers=2, num_heads=4,
                            intermediate_size=136)
    model = GPTNeoX(student)
    matmul_params = model.num_parameters() - model.gpt_neox.embed_in.weight.numel()
    no_teacher = memory.training_flops_per_token(student, None, SEQ_LEN)
    # nanoGPT: 6N + 12 L H T, with N the parameters outside the embedding lookup (up to the
    # LayerNorm vectors, which the estimate leaves out).
    assert no_teacher == pytest.approx(6 * matmul_params + 12 * 2 * 32 * SEQ_LEN, rel=0.02)
    assert memory.training_flops_per_token(student, teacher, SEQ_LEN) > no_teacher
    record = {"step": 3, "loss": 1.5, "ce": 2.0, "kd": None, "lr": 1e-4, "grad_norm": 0.5,
              "tokens_per_s": 1234.0, "mfu": None, "peak_memory_bytes": 2**30, "eta_s": 75.0,
              "skipped": True}
    line = metrics.format_step_line(record, 10)
    assert line.startswith("step 3/10 | loss 1.5000")
    assert "kd -" in line and "eta 1m15s" in line and "SKIPPED" in line
    assert "lost" not in line
    assert "lost" not in metrics.format_step_line({**record, "update_lost_frac": 0.0}, 10)
    line = metrics.format_step_line({**record, "update_lost_frac": 0.8034}, 10)
    assert "| lost 80.3% |" in line
    assert metrics.format_duration(3725) == "1h02m05s"


def test_divergence_and_runtime_choices_reach_the_run(assets, tmp_path, capsys):
    """loss.divergence trains and validates with that divergence, named in the val record;
    the log says in one line what the engine chose on this device and why."""
    from engine.eval.heldout import heldout_batches, heldout_loader
    from engine.eval.scoring import heldout_metrics

    out = tmp_path / "jsd"
    result = run(make_config(assets, out, run__steps=1, loss__divergence="jsd",
                             loss__beta=0.3, loss__t2_scale=False))
    val = result["val"]
    assert val["val_divergence"] == "jsd(beta=0.3, no T^2)"
    config = make_config(assets, out)
    loader = heldout_loader(build_dataset(config.data.path, "packed", SEQ_LEN),
                            result["micro_batch"], val_fraction=0.05)
    expected = heldout_metrics(load_pretrained(result["export_dir"]),
                               heldout_batches(loader, max_batches=2),
                               teacher=load_pretrained(assets["teacher"]), valid_vocab=VALID_VOCAB,
                               divergence="jsd", beta=0.3, t2_scale=False)
    assert val["val_kd"] == pytest.approx(expected["kd"], rel=1e-5)
    log = capsys.readouterr().out
    assert ("runtime on cpu: torch.compile off (auto: off on the CPU); fused AdamW; fused head "
            "+ loss (loss.fused_head); no memory budget (auto): micro_batch 2 as set") in log
