"""engine.train.config: presets, overrides, typed parsing, and errors that name the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from engine.train.__main__ import main as train_main
from engine.train.config import (
    Config,
    ConfigError,
    config_from_dict,
    load_config,
    parse_overrides,
    valid_keys,
    write_resolved,
)

REPO = Path(__file__).resolve().parents[2]
SEED_PRESET = REPO / "configs" / "distilpythia.toml"


def test_seed_preset_is_the_seed_recipe():
    config = load_config(SEED_PRESET)
    assert config.loss.alpha == 0.5 and config.loss.temperature == 2.0
    assert (config.batch.micro_batch, config.batch.accum_steps, config.batch.seq_len) == (
        2,
        2048,
        2048,
    )
    assert config.optim.lr == 1e-4 and config.optim.schedule == "constant"
    assert config.optim.warmup_steps == 0 and config.optim.grad_clip == 0.0
    assert config.run.steps == 64
    assert config.student.init == "pretrained"
    assert "160m" in config.teacher.path and "70m" in config.student.path
    assert config.teacher.dtype == "bf16" and config.precision == "bf16-pure"
    assert config.data.valid_vocab == 50277
    for mode in ("packed", "padded"):
        assert load_config(SEED_PRESET, [f"--data.mode={mode}"]).data.mode == mode


def test_overrides_both_spellings_and_types():
    config = load_config(
        SEED_PRESET,
        [
            "--run.steps=7",
            "--optim.lr",
            "3e-4",
            "--optim.betas=0.8,0.95",
            "--runtime.activation_checkpointing=true",
            "--runtime.compile",
            "no",
            "--precision=fp32",
            "--teacher.path=",
        ],
    )
    assert config.run.steps == 7
    assert config.optim.lr == pytest.approx(3e-4)
    assert config.optim.betas == (0.8, 0.95)
    assert config.runtime.activation_checkpointing is True
    assert config.runtime.compile is False
    assert config.precision == "fp32"
    assert config.teacher.path == ""


def test_parse_overrides_splits_pairs():
    assert parse_overrides(["--a.b=1", "--c.d", "x=y", "--e.f=g=h"]) == [
        ("a.b", "1"),
        ("c.d", "x=y"),
        ("e.f", "g=h"),
    ]


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("--run.stpes=3", "run.stpes: unknown key (did you mean run.steps?)"),
        ("--nosuch.key=3", "nosuch.key: unknown key (neox-distill train --help lists"),
        ("--run=3", "run: unknown key"),
        ("--run.steps=three", "run.steps: cannot use 'three' as an integer"),
        ("--run.steps=2.5", "run.steps: cannot use '2.5' as an integer"),
        ("--optim.lr=fast", "optim.lr: cannot use 'fast' as a number"),
        ("--optim.lr=nan", "optim.lr: cannot use 'nan' as a number"),
        ("--optim.betas=0.9", "optim.betas"),
        ("--runtime.compile=maybe",
         "runtime.compile: cannot use 'maybe' as true, false or \"auto\""),
        ("--runtime.activation_checkpointing=auto",
         "runtime.activation_checkpointing: cannot use 'auto' as a boolean"),
        ("--loss.divergence=kl", "loss.divergence: 'kl' is not one of forward_kl, reverse_kl"),
        ("--loss.beta=1.5", "loss.beta: must be in [0, 1], got 1.5 (read by jsd)"),
        ("--loss.skew=-0.1", "loss.skew: must be in [0, 1], got -0.1"),
        ("--loss.t2_scale=sometimes", "loss.t2_scale: cannot use 'sometimes' as a boolean"),
        ("--loss.fused_head=2", "loss.fused_head: cannot use '2' as a boolean"),
        ("--batch.memory_budget=lots", "batch.memory_budget: cannot parse memory size 'lots'"),
        ("--data.mode=zigzag", "data.mode: 'zigzag' is not one of packed, padded"),
        ("--precision=fp8", "precision: 'fp8' is not one of"),
        ("--loss.alpha=1.5", "loss.alpha: must be in [0, 1]"),
        ("--batch.accum_steps=0", "batch.accum_steps: must be > 0"),
        ("run.steps=3", "expected --section.key=value"),
    ],
)
def test_bad_overrides_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_config(SEED_PRESET, [override])
    assert fragment in str(info.value)
    assert len(str(info.value)) < 200  # one key named, not the list of all of them


def test_missing_value_is_an_error():
    with pytest.raises(ConfigError, match=r"--run\.steps: needs a value"):
        load_config(SEED_PRESET, ["--run.steps"])


@pytest.mark.parametrize(
    "name, text, pattern",
    [
        ("a.toml", '[rnu]\nsteps = 3\n', r"a\.toml: rnu: unknown key \(did you mean run\?\)"),
        ("b.toml", '[data]\npath = "x"\nmoed = "packed"\n',
         r"b\.toml: data\.moed: unknown key \(did you mean data\.mode\?\)"),
        (
            "c.toml",
            '[data]\npath = "x"\n[batch]\nmicro_batch = "2"\n',
            r"c\.toml: batch\.micro_batch: cannot use '2'",
        ),
        ("d.toml", "[run\nsteps = \n", r"d\.toml: not valid TOML"),
    ],
)
def test_bad_toml_files_name_the_file(tmp_path, name, text, pattern):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path)


def test_missing_config_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.toml")


def test_required_paths_are_checked():
    with pytest.raises(ConfigError, match=r"data\.path: required"):
        load_config(None, ["--student.init=scratch"])
    with pytest.raises(ConfigError, match=r"student\.path: required"):
        load_config(None, ["--data.path=x"])
    # Tools that only read shapes may skip the cross-field checks.
    assert isinstance(load_config(None, [], check=False), Config)


def test_resolved_config_round_trips(tmp_path):
    config = load_config(SEED_PRESET, ["--optim.betas=0.85,0.9", "--run.tokenizer=tok \"x\".json"])
    write_resolved(config, tmp_path)
    assert load_config(tmp_path / "config.toml") == config
    saved = json.loads((tmp_path / "config.json").read_text())
    assert config_from_dict(saved) == config
    assert not list(tmp_path.glob(".*tmp*"))


def test_valid_keys_cover_the_issue_list():
    keys = set(valid_keys())
    for key in (
        "run.out_dir", "run.steps", "run.seed", "run.resume", "teacher.path", "student.path",
        "student.init", "data.path", "data.mode", "batch.micro_batch", "batch.accum_steps",
        "batch.seq_len", "loss.alpha", "loss.temperature", "optim.lr", "precision",
    ):
        assert key in keys


def test_cli_reports_config_errors(capsys):
    code = train_main(["--config", str(SEED_PRESET), "--batch.micro_btch=4"])
    assert code == 2
    err = capsys.readouterr().err
    assert err == ("error: batch.micro_btch: unknown key (did you mean batch.micro_batch?)"
                   "\n")


def test_new_loss_and_runtime_keys_and_their_defaults(tmp_path):
    config = load_config(None, ["--data.path=x", "--student.init=scratch"])
    loss = config.loss
    assert (loss.divergence, loss.beta, loss.skew, loss.t2_scale, loss.fused_head) == (
        "forward_kl", 0.5, 0.1, True, True)
    assert config.runtime.compile == "auto" and config.batch.memory_budget == "auto"
    changed = load_config(None, [
        "--data.path=x", "--student.init=scratch", "--loss.divergence=skew_reverse_kl",
        "--loss.skew=0.3", "--loss.t2_scale=false", "--loss.fused_head=off",
        "--runtime.compile=yes", "--batch.memory_budget=12GiB"])
    assert changed.loss.divergence == "skew_reverse_kl" and changed.loss.skew == 0.3
    assert changed.loss.t2_scale is False and changed.loss.fused_head is False
    assert changed.runtime.compile is True and changed.batch.memory_budget == "12GiB"
    assert load_config(None, ["--data.path=x", "--student.init=scratch",
                              "--runtime.compile=AUTO"]).runtime.compile == "auto"
    # Both forms survive the resolved config.toml / config.json round trip.
    for config_ in (config, changed):
        write_resolved(config_, tmp_path)
        assert load_config(tmp_path / "config.toml") == config_
        assert config_from_dict(json.loads((tmp_path / "config.json").read_text())) == config_
    (tmp_path / "bad.toml").write_text('[runtime]\ncompile = "sometimes"\n')
    with pytest.raises(ConfigError, match=r"bad\.toml: runtime\.compile: cannot use "
                                          r"'sometimes' as true, false or \"auto\""):
        load_config(tmp_path / "bad.toml", check=False)


def test_memory_budget_bytes():
    from engine.train.config import memory_budget_bytes

    config = load_config(None, ["--data.path=x", "--student.init=scratch"])
    assert memory_budget_bytes(config, 80 * 2**30) == 80 * 2**30  # auto: the device's memory
    assert memory_budget_bytes(config, None) is None  # auto on a CPU: no budget
    for text in ("", "none", "None"):
        config.batch.memory_budget = text
        assert memory_budget_bytes(config, 80 * 2**30) is None
    config.batch.memory_budget = "12GiB"
    assert memory_budget_bytes(config, 80 * 2**30) == 12 * 2**30  # the user's cap wins
