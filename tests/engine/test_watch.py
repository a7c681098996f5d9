"""Task scores during training (eval.tasks), the regression alarm, and the lost-update records.

Tiny models and shards from test_train.py, a 300-id BPE tokenizer and small lambada / mc
files made here. Every number a run logs is checked against an independent path:
`python -m engine.eval` on the run's own checkpoints and exports.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from engine.eval.__main__ import main as eval_main
from engine.eval.requests import EvalInputError
from engine.quickstart.corpus import train_bpe_tokenizer
from engine.train import checkpoint as ckpt
from engine.train.__main__ import main as train_main
from engine.train.config import ConfigError, load_config, parse_task_spec
from engine.train.loop import run
from engine.train.watch import TaskRegression, read_task_history
from tests.engine.test_train import base_overrides, make_assets, make_config, train_records

WORDS = ["the", "a", "cat", "dog", "house", "river", "mountain", "quickly", "slowly", "ran",
         "jumped", "over", "under", "big", "small", "red", "blue", "green", "happy", "sad"]
HUGE_LR = 0.3  # wrecks the tiny student within a step or two
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """test_train's tiny teacher, student and shards, plus a tokenizer and two task files."""
    root = tmp_path_factory.mktemp("watch-assets")
    found = make_assets(root)
    rng = random.Random(0)
    sentences = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 20)))
                 for _ in range(200)]
    found["tokenizer"] = root / "tokenizer.json"
    train_bpe_tokenizer(sentences, found["tokenizer"], vocab_size=300)  # model rows: 320
    found["lambada"] = root / "lambada.jsonl"
    found["lambada"].write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences[:12]))
    found["mc"] = root / "piqa.jsonl"
    found["mc"].write_text("".join(
        json.dumps({"context": s, "choices": rng.sample(WORDS, 3), "gold": i % 3}) + "\n"
        for i, s in enumerate(sentences[12:18])
    ))
    return found


def watch_config(assets, out_dir, **extra):
    values = {"run.tokenizer": assets["tokenizer"],
              "eval.tasks": f"lambada={assets['lambada']},mc={assets['mc']}"}
    values.update({k.replace("__", "."): v for k, v in extra.items()})
    return make_config(assets, out_dir, **values)


def records(out_dir: Path, kind: str) -> list[dict]:
    lines = (Path(out_dir) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def engine_eval(assets, model_dir: Path, tmp_path: Path) -> dict[str, dict]:
    """{"lambada": ..., "mc": ...} from `python -m engine.eval` on a model folder."""
    out = tmp_path / f"eval-{model_dir.parent.name}-{model_dir.name}.json"
    code = eval_main(["--model", str(model_dir), "--tokenizer", str(assets["tokenizer"]),
                      "--task", "lambada", "mc", "--data", str(assets["lambada"]),
                      str(assets["mc"]), "--json", str(out), "--no-progress"])
    assert code == 0
    return {row["task"]: row for row in json.loads(out.read_text())["results"]}


def assert_same_scores(record: dict, expected: dict) -> None:
    for key in ("ppl", "acc", "acc_norm", "documents"):
        if key in expected:
            assert record[key] == pytest.approx(expected[key], rel=1e-6, abs=1e-6), key


@pytest.fixture(scope="module")
def watched_run(assets, tmp_path_factory):
    """4 fp32 steps at a normal lr, tasks scored at 0, 2 and 4, checkpoints at 2 and 4."""
    out = tmp_path_factory.mktemp("watched")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(watch_config(assets, out, optim__lr=1e-3, eval__every=2,
                                  run__save_every=2))
    return {"result": result, "out": out, "warnings": [str(w.message) for w in caught]}


# --------------------------------------------------------------------------------------
# Task records
# --------------------------------------------------------------------------------------


def test_task_records_equal_engine_eval_on_the_same_weights(assets, watched_run, tmp_path):
    out = watched_run["out"]
    tasks = records(out, "task")
    assert [(r["step"], r["task"], r["name"]) for r in tasks] == [
        (step, task, name) for step in (0, 2, 4) for task, name in
        (("lambada", "lambada"), ("mc", "piqa"))
    ]
    checkpoints = dict(ckpt.complete_checkpoints(out))
    weights = {0: assets["student"], 2: checkpoints[2] / "student",
               4: Path(watched_run["result"]["export_dir"])}
    for step, folder in weights.items():  # step 0: the untouched student's own scores
        expected = engine_eval(assets, folder, tmp_path)
        for record in (r for r in tasks if r["step"] == step):
            assert_same_scores(record, expected[record["task"]])


def test_a_normal_run_stays_silent(watched_run):
    assert not records(watched_run["out"], "alarm")
    assert not [w for w in watched_run["warnings"] if "regression alarm" in w]
    lambada = [r["ppl"] for r in records(watched_run["out"], "task") if r["task"] == "lambada"]
    assert lambada[-1] != lambada[0]  # the student did change


def test_lost_updates_are_zero_by_definition_in_fp32(watched_run):
    for record in train_records(watched_run["out"]):
        assert record["update_lost_frac"] == 0.0 and record["update_lost_weighted"] == 0.0


def test_tasks_need_a_tokenizer_and_well_formed_entries(assets, tmp_path):
    def config(*extra):
        return load_config(None, base_overrides(assets, tmp_path / "x") + list(extra))

    with pytest.raises(ConfigError, match=r"eval\.tasks needs run\.tokenizer"):
        config(f"--eval.tasks=lambada={assets['lambada']}")
    with pytest.raises(ConfigError, match="not KIND=PATH"):
        config("--run.tokenizer=t.json", "--eval.tasks=hellaswag=h.jsonl")
    with pytest.raises(ConfigError, match="two tasks are named 'piqa'"):
        config("--run.tokenizer=t.json", "--eval.tasks=mc=a/piqa.jsonl,mc=b/piqa.jsonl.zst")
    with pytest.raises(ConfigError, match=r"eval\.alarm_action"):
        config("--eval.alarm_action=panic")
    with pytest.raises(ConfigError, match=r"eval\.every: must be >= 0"):
        config("--eval.every=-1")
    parsed = config("--run.tokenizer=t.json", '--eval.tasks=["lambada=x/lambada_openai.jsonl"]')
    assert parsed.eval.tasks == ["lambada=x/lambada_openai.jsonl"]
    assert parse_task_spec(parsed.eval.tasks[0]) == ("lambada", "lambada_openai",
                                                    "x/lambada_openai.jsonl")


def test_missing_task_file_fails_before_training(assets, tmp_path, capsys):
    missing = tmp_path / "nowhere.jsonl"
    with pytest.raises(EvalInputError, match=r"nowhere\.jsonl: data file not found"):
        run(watch_config(assets, tmp_path / "a", eval__tasks=f"lambada={missing}"))
    assert ckpt.latest_checkpoint(tmp_path / "a") is None
    overrides = base_overrides(assets, tmp_path / "b", run__tokenizer=assets["tokenizer"],
                               eval__tasks=f"lambada={missing}")
    assert train_main(overrides) == 1
    err = capsys.readouterr().err
    assert "nowhere.jsonl: data file not found" in err and "Traceback" not in err


# --------------------------------------------------------------------------------------
# The regression alarm
# --------------------------------------------------------------------------------------


def test_alarm_warns_on_a_regressing_run(assets, tmp_path):
    out = tmp_path / "regress"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = run(watch_config(assets, out, optim__lr=HUGE_LR, optim__warmup_steps=0,
                                  eval__every=1, run__steps=2))
    assert result["status"] == "completed"
    messages = [str(w.message) for w in caught if "regression alarm" in str(w.message)]
    assert [m.split(": ppl")[0] for m in messages] == [
        "regression alarm: task lambada at step 1", "regression alarm: task lambada at step 2"]
    base = records(out, "task")[0]
    alarms = records(out, "alarm")
    assert [a["step"] for a in alarms] == [1, 2] and {a["name"] for a in alarms} == {"lambada"}
    for alarm in alarms:
        assert alarm["baseline_step"] == 0 and alarm["baseline_ppl"] == base["ppl"]
        assert alarm["ppl"] > 1.1 * base["ppl"]


def test_alarm_stop_saves_and_exits_non_zero(assets, tmp_path, capsys):
    out = tmp_path / "stop"
    settings = dict(optim__lr=HUGE_LR, optim__warmup_steps=0, eval__every=1, run__steps=4,
                    eval__alarm_action="stop", eval__limit=5)
    with pytest.warns(RuntimeWarning), pytest.raises(TaskRegression) as stopped:
        run(watch_config(assets, out, **settings))
    assert {r["documents"] for r in records(out, "task")} == {5}  # eval.limit
    message = str(stopped.value)
    base = records(out, "task")[0]["ppl"]
    assert "task lambada at step 1" in message and f"ppl {base:.2f}" in message
    assert "checkpoint saved at step 1" in message
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [1]
    assert not (out / "final").exists()  # nothing exported from a stopped run

    overrides = base_overrides(assets, tmp_path / "cli", run__tokenizer=assets["tokenizer"],
                               eval__tasks=f"lambada={assets['lambada']}",
                               **{k: v for k, v in settings.items()})
    with pytest.warns(RuntimeWarning):
        assert train_main(overrides) == 1
    err = capsys.readouterr().err
    assert "regression alarm: task lambada at step 1" in err and "Traceback" not in err


def test_resume_keeps_the_step0_baseline(assets, tmp_path):
    out = tmp_path / "resumed"
    settings = dict(optim__lr=HUGE_LR, optim__warmup_steps=0, eval__every=1,
                    eval__tasks=f"lambada={assets['lambada']}")
    run(watch_config(assets, out, run__steps=4, run__save_every=2, eval__alarm=0,
                     **settings))  # alarm off
    step0 = records(out, "task")[0]
    assert step0["step"] == 0 and not records(out, "alarm")
    # Killed after step 4's records were written, before its checkpoint was complete:
    shutil.rmtree(dict(ckpt.complete_checkpoints(out))[4])
    with pytest.warns(RuntimeWarning, match=f"step 0: ppl {step0['ppl']:.2f}"):
        run(watch_config(assets, out, run__steps=4, **settings))
    tasks = records(out, "task")
    assert [r["step"] for r in tasks] == [0, 1, 2, 3, 4]  # 3 and 4 redone, 2 not
    alarms = records(out, "alarm")
    assert [a["step"] for a in alarms] == [3, 4]
    assert all(a["baseline_step"] == 0 and a["baseline_ppl"] == step0["ppl"] for a in alarms)
    first, last = read_task_history(out / "metrics.jsonl", 4)
    assert first["lambada"] == step0 and last == 4


def test_a_resume_with_another_eval_limit_is_refused(assets, tmp_path, capsys):
    """Issue 22, B.11: the step-0 baseline scored 5 documents; a resume with eval.limit=3
    compared 3 documents against it ("-83.2% against step 0"). Refused at start-up, before
    anything is written, naming both limits and the file."""
    out = tmp_path / "limit"
    settings = dict(eval__every=1, eval__tasks=f"lambada={assets['lambada']}",
                    run__save_every=1, eval__alarm=0)
    run(watch_config(assets, out, run__steps=1, eval__limit=5, **settings))
    assert records(out, "task")[0]["limit"] == 5
    before = (out / "metrics.jsonl").read_bytes()
    overrides = base_overrides(assets, out, run__steps=2, eval__limit=3,
                               run__tokenizer=assets["tokenizer"],
                               **{k: v for k, v in settings.items()})
    assert train_main(overrides) == 2
    err = capsys.readouterr().err
    assert (f"eval.limit=3: the watched task lambada's step-0 baseline in {out / 'metrics.jsonl'}"
            " was scored with eval.limit=5" in err and "Traceback" not in err)
    assert (out / "metrics.jsonl").read_bytes() == before
    # The same limit resumes (and an older baseline without "limit" is judged by its count).
    lines = [json.loads(line) for line in before.decode().splitlines()]
    for record in lines:
        record.pop("limit", None)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    with pytest.raises(ConfigError, match=r"eval.limit=3: .* eval.limit=0 \(5 documents\)"):
        run(watch_config(assets, out, run__steps=2, eval__limit=3, **settings))
    assert run(watch_config(assets, out, run__steps=2, eval__limit=5, **settings))["step"] == 2


def test_a_task_file_changed_on_resume_is_not_compared(assets, tmp_path):
    """The same name, other documents: no alarm from comparing them, a warning instead."""
    out = tmp_path / "changed"
    task = tmp_path / "lambada.jsonl"
    task.write_bytes(assets["lambada"].read_bytes())
    settings = dict(optim__lr=HUGE_LR, optim__warmup_steps=0, eval__every=1,
                    eval__tasks=f"lambada={task}", run__save_every=1)
    run(watch_config(assets, out, run__steps=1, eval__alarm=0, **settings))
    task.write_text("".join(task.read_text().splitlines(keepends=True)[:4]))
    with pytest.warns(RuntimeWarning, match="scored other documents than its step-0 baseline "
                                            "\\(documents 4 against 12\\)"):
        run(watch_config(assets, out, run__steps=2, **settings))
    assert not records(out, "alarm")


def test_history_skips_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "task", "step": 2, "name": "x", "ppl": 5.0}\n'
                    '{"kind": "task", "step": 0, "name": "x", "ppl": 4.0}\n'
                    '{"kind": "train", "step": 3}\n{"kind": "ta')
    first, last = read_task_history(path, 10)
    assert first["x"]["ppl"] == 4.0 and last == 2
    assert read_task_history(path, 1) == ({"x": {"kind": "task", "step": 0, "name": "x",
                                                 "ppl": 4.0}}, 0)
    assert read_task_history(tmp_path / "none.jsonl", 10) == ({}, None)


# --------------------------------------------------------------------------------------
# update_lost_frac in the other precisions
# --------------------------------------------------------------------------------------


def lost_fractions(assets, out, **extra) -> list[float]:
    result = run(make_config(assets, out, run__steps=2, optim__warmup_steps=0,
                             optim__weight_decay=0, **extra))
    return [r["update_lost_frac"] for r in train_records(result["out_dir"])]


def test_lost_updates_zero_in_bf16_autocast(assets, tmp_path):
    assert lost_fractions(assets, tmp_path / "auto", precision="bf16-autocast") == [0.0, 0.0]


def test_bf16_pure_loses_more_updates_at_a_small_lr(assets, tmp_path):
    with pytest.warns(RuntimeWarning, match="rounded away") as caught:
        small = lost_fractions(assets, tmp_path / "small", precision="bf16-pure",
                               optim__lr=1e-5)
    assert any("bf16-autocast" in str(w.message) for w in caught)  # says what to change
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning at a large lr
        large = lost_fractions(assets, tmp_path / "large", precision="bf16-pure",
                               optim__lr=1e-2)
    assert min(small) > 0.5 > max(large)
    off = lost_fractions(assets, tmp_path / "off", precision="bf16-pure", optim__lr=1e-2,
                         eval__lost_updates="false")
    assert off == [None, None]


@pytest.mark.distributed
def test_two_ranks_stop_together_on_rank0s_alarm(assets, tmp_path):
    """Rank 0 scores; the stop decision reaches rank 1 too (else it would wait in the next
    step's all-reduce until the timeout)."""
    out = tmp_path / "ddp"
    overrides = base_overrides(assets, out, run__tokenizer=assets["tokenizer"],
                               eval__tasks=f"lambada={assets['lambada']}", eval__every=1,
                               eval__alarm_action="stop", optim__lr=HUGE_LR,
                               optim__warmup_steps=0, batch__accum_steps=1, run__steps=4)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "NEOX_DIST_TIMEOUT_S": "120"}
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
         "--master_addr=127.0.0.1", f"--master_port={port}", "-m", "engine.train",
         *overrides],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=400,
    )
    assert proc.returncode != 0, proc.stdout[-3000:]
    assert proc.stderr.count("error: regression alarm: task lambada at step 1") == 2  # 2 ranks
    assert [s for s, _ in ckpt.complete_checkpoints(out)] == [1]
    assert [r["step"] for r in records(out, "task")] == [0, 1]  # rank 0 alone writes


def test_task_records_are_separate_curves_in_the_sinks(watched_run):
    """TensorBoard / W&B tags (engine.metrics.record_scalars): one curve per task file."""
    from engine.metrics import record_scalars

    lambada, piqa = (r for r in records(watched_run["out"], "task") if r["step"] == 4)
    assert record_scalars(lambada)["task/lambada/ppl"] == lambada["ppl"]
    tags = record_scalars(piqa)
    assert tags["task/piqa/acc"] == piqa["acc"] and tags["task/piqa/acc_norm"] == piqa["acc_norm"]
    alarm = {"kind": "alarm", "step": 3, "task": "lambada", "name": "lambada", "ppl": 9.0,
             "baseline_ppl": 5.0, "baseline_step": 0, "alarm": 0.1}
    assert record_scalars(alarm)["alarm/lambada/baseline_ppl"] == 5.0
