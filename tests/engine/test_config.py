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


# A value other than the default for every key, as command-line text; strings carry what a
# TOML writer must escape (quotes, backslash, tab, newline, DEL) or may write raw (non-ASCII,
# an emoji outside the BMP).
EVERY_KEY = {
    "run.out_dir": 'runs/ü "q" \\ 😀\x7f\t\nend', "run.steps": "1_000", "run.seed": "-3",
    "run.resume": "none", "run.save_every": "5", "run.keep_last": "4", "run.log_every": "7",
    "run.val_every": "9", "run.val_batches": "0", "run.max_bad_steps": "11",
    "run.export_dir": "exp/ört", "run.tokenizer": 'tok "x".json', "run.overwrite": "yes",
    "teacher.path": "/t/p", "teacher.dtype": "fp16", "teacher.cache": "c",
    "student.path": "s", "student.init": "scratch", "student.num_layers": "2",
    "student.hidden_size": "64", "student.num_heads": "4", "student.intermediate_size": "256",
    "student.vocab_size": "512", "student.max_positions": "128",
    "data.path": "d", "data.mode": "padded", "data.val_fraction": "0.25", "data.pad_id": "0",
    "data.valid_vocab": "500",
    "batch.micro_batch": "3", "batch.accum_steps": "4", "batch.seq_len": "64",
    "batch.memory_budget": "12GiB",
    "loss.alpha": "0.1", "loss.temperature": "3.5", "loss.backend": "torch",
    "loss.divergence": "jsd", "loss.beta": "0.3", "loss.skew": "0.2", "loss.t2_scale": "off",
    "loss.fused_head": "false",
    "optim.lr": "3e-4", "optim.betas": "0.8,0.95", "optim.weight_decay": "0.1",
    "optim.eps": "1e-12", "optim.grad_clip": "1", "optim.schedule": "cosine",
    "optim.warmup_steps": "10", "optim.min_lr": "1e-6", "optim.fused": "no",
    "runtime.activation_checkpointing": "true", "runtime.compile": "false",
    "log.tensorboard": "on", "log.wandb": "1", "log.wandb_project": "p",
    "eval.tasks": '["lambada=a.jsonl", "ppl=b c.jsonl"]', "eval.every": "5", "eval.limit": "3",
    "eval.batch_size": "2", "eval.alarm": "0.5", "eval.alarm_action": "stop",
    "eval.lost_updates": "false",
    "dist.strategy": "fsdp", "dist.reshard_after_forward": "false", "dist.teacher": "shard",
    "dist.cpu_offload": "true",
    "onpolicy.fraction": "0.5", "onpolicy.prompt_tokens": "8", "onpolicy.new_tokens": "16",
    "onpolicy.temperature": "0.7", "onpolicy.top_p": "0.9", "onpolicy.top_k": "40",
    "onpolicy.stop_token": "-1",
    "precision": "fp32", "device": "cpu",
}


def _round_trip(config: Config, folder: Path) -> None:
    write_resolved(config, folder)
    assert load_config(folder / "config.toml", check=False) == config
    assert config_from_dict(json.loads((folder / "config.json").read_text())) == config


def test_every_key_round_trips_through_the_resolved_files(tmp_path):
    assert list(EVERY_KEY) == valid_keys()  # a new key needs a line here
    for key, text in EVERY_KEY.items():
        config = load_config(None, [f"--{key}={text}"], check=False)
        assert config != Config(), key  # the override took effect
        _round_trip(config, tmp_path / key)
    # All of them at once make a valid configuration (on-policy off: it refuses a teacher
    # cache), which round-trips too.
    config = load_config(None, [f"--{key}={text}" for key, text in EVERY_KEY.items()]
                         + ["--onpolicy.fraction=0"])
    assert config.run.out_dir == 'runs/ü "q" \\ 😀\x7f\t\nend'
    assert (config.optim.betas, config.eval.tasks) == ((0.8, 0.95), ["lambada=a.jsonl",
                                                                      "ppl=b c.jsonl"])
    _round_trip(config, tmp_path / "all")
    text = (tmp_path / "all" / "config.toml").read_text(encoding="utf-8")
    assert text.startswith("# neox-distill: the resolved configuration of the run in this "
                           "folder\n")
    assert "😀" in text and "\x7f" not in text  # UTF-8 as is; DEL escaped, as TOML requires


def test_switch_words_and_tables_from_files(tmp_path):
    path = tmp_path / "a.toml"
    path.write_text('device = "cpu"\n[runtime]\ncompile = "AUTO"\n[optim]\nbetas = [1, 0.5]\n')
    config = load_config(path, check=False)
    assert (config.device, config.runtime.compile, config.optim.betas) == ("cpu", "auto",
                                                                          (1.0, 0.5))
    for text, pattern in (
        ("run = 3\n", r"a\.toml: \[run\] must be a table of keys"),
        ("precison = 'fp32'\n", r"a\.toml: precison: unknown key \(did you mean precision\?\)"),
        ("[data]\nsteps = 3\n", r"a\.toml: data\.steps: unknown key \(did you mean run\.steps"),
        ("[run.sub]\nx = 1\n", r"a\.toml: run\.sub: unknown key"),
        ("[run]\nsteps = true\n", r"a\.toml: run\.steps: cannot use True as an integer"),
        ("[optim]\nbetas = [1, true]\n", r"a\.toml: optim\.betas: cannot use True as a number"),
        ("[data]\nmode = 3\n", r"a\.toml: data\.mode: 3 is not one of packed, padded"),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError, match=pattern):
            load_config(path, check=False)


def test_range_problems_are_all_named_at_once():
    with pytest.raises(ConfigError) as info:
        load_config(SEED_PRESET, ["--data.path=x", "--run.steps=0", "--optim.lr=0",
                                  "--eval.every=-1", "--batch.memory_budget=lots"])
    message = str(info.value)
    for fragment in ("run.steps: must be > 0, got 0", "optim.lr: must be > 0, got 0.0",
                     "eval.every: must be >= 0, got -1",
                     "batch.memory_budget: cannot parse memory size 'lots'"):
        assert fragment in message
