"""On-policy distillation end to end on tiny models: the onpolicy_* records, the divergence
over the completion alone (no CE on the student's samples), bit-exact resume of the sampler,
and one sharded rank equal to one process."""

from __future__ import annotations

import math

import pytest
import torch

from engine.metrics import format_step_line
from engine.train.loop import run
from tests.engine.test_train import (
    assert_same_run,
    final_weights,
    make_config,
    train_records,
)

ON_POLICY = dict(onpolicy__fraction=0.5, onpolicy__prompt_tokens=4, onpolicy__new_tokens=6,
                 onpolicy__stop_token=-1, onpolicy__top_k=50)


def on_policy_config(assets, out, **extra):
    return make_config(assets, out, **{**ON_POLICY, **extra})


@pytest.fixture(scope="module")
def straight_on_policy(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("on-policy")
    result = run(on_policy_config(assets, out, run__save_every=2))
    return {"result": result, "records": train_records(out), "weights": final_weights(result)}


def test_records_carry_the_onpolicy_fields(straight_on_policy):
    records = straight_on_policy["records"]
    line = format_step_line(records[0], 4)
    assert "on-policy " in line and "teacher nll " in line and "sampling " in line
    assert straight_on_policy["result"]["status"] == "completed"
    for record in records:
        # accumulation 2 at share 0.5: one micro-batch of two per step, 2 rows x 6 new tokens
        assert 0 < record["onpolicy_token_share"] < 1
        assert record["onpolicy_mean_new_tokens"] == 6
        assert 0 < record["onpolicy_generation_share"] < 1
        assert math.isfinite(record["onpolicy_teacher_nll"]) and record["onpolicy_teacher_nll"] > 0
        assert not record["skipped"]


def test_resume_samples_what_the_uninterrupted_run_sampled(assets, tmp_path, straight_on_policy):
    out = tmp_path / "resumed"
    assert run(on_policy_config(assets, out, run__steps=2))["step"] == 2
    second = run(on_policy_config(assets, out, run__steps=4))
    assert_same_run(second, straight_on_policy)
    resumed = train_records(out)
    for mine, ref in zip(resumed, straight_on_policy["records"], strict=True):
        assert mine["onpolicy_teacher_nll"] == ref["onpolicy_teacher_nll"]


def test_fully_on_policy_steps_see_only_the_completion_and_no_cross_entropy(assets, tmp_path):
    """fraction 1: every label is a sampled token (2 rows x 6 tokens x 2 micro-batches), and
    alpha, the CE weight, changes nothing, since on-policy micro-batches take the divergence
    alone."""
    runs = [run(on_policy_config(assets, tmp_path / f"alpha{alpha}", onpolicy__fraction=1.0,
                                 loss__alpha=alpha, run__steps=2)) for alpha in (0.2, 0.9)]
    low, high = (train_records(r["out_dir"]) for r in runs)
    assert [r["valid_tokens"] for r in low] == [24, 24]
    assert all(r["onpolicy_token_share"] == 1.0 for r in low)
    assert [r["loss"] for r in low] == [r["loss"] for r in high]
    for name, value in final_weights(runs[0]).items():
        assert torch.equal(value, final_weights(runs[1])[name]), name


def test_fraction_zero_is_todays_engine(assets, tmp_path, straight_run):
    """The default section: no onpolicy_* field, the same numbers as a run without it."""
    result = run(make_config(assets, tmp_path / "zero", onpolicy__fraction=0.0,
                             run__save_every=2))
    assert_same_run(result, straight_run)
    assert not any(key.startswith("onpolicy_") for key in train_records(result["out_dir"])[0])


def test_one_sharded_rank_samples_and_trains_like_one_process(assets, tmp_path):
    settings = dict(onpolicy__fraction=1.0, onpolicy__temperature=0.0, run__steps=2)
    plain = run(on_policy_config(assets, tmp_path / "plain", **settings))
    sharded = run(on_policy_config(assets, tmp_path / "fsdp", dist__strategy="fsdp", **settings))
    for mine, ref in zip(train_records(sharded["out_dir"]), train_records(plain["out_dir"]),
                         strict=True):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert mine["onpolicy_teacher_nll"] == pytest.approx(ref["onpolicy_teacher_nll"],
                                                             rel=1e-5)
