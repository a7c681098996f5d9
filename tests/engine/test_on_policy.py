"""engine.on_policy and the on-policy signal: relabelling, the student's batches, the teacher's
NLL of them, GKD's schedule of on-policy micro-batches, and the onpolicy.* start-up errors."""

from __future__ import annotations

import math
import re
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from engine.kernels.constants import IGNORE_INDEX
from engine.on_policy import SamplingSettings, relabel, student_batch, teacher_nll_sum
from engine.sampling import new_generator
from engine.train.config import ConfigError, load_config
from engine.train.on_policy_signal import is_on_policy
from tests.engine.test_generate import VOCAB, random_model


def test_relabel_labels_the_completion_only_and_masks_after_the_stop():
    prompts = torch.tensor([[5, 6, 7], [8, 9, 10]])
    tokens = torch.tensor([[11, 12], [0, 0]])  # row 1 drew its stop token 0 at once
    mask = torch.tensor([[True, True], [True, False]])
    batch = relabel(prompts, tokens, mask)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 11], [8, 9, 10, 0]]
    ignore = IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore, ignore, 11, 12], [ignore, ignore, 0, ignore]]


def test_student_batch_continues_the_prompt_of_every_row():
    model = random_model(seed=3)
    windows = torch.randint(2, VOCAB, (3, 12), generator=torch.Generator().manual_seed(0))
    settings = SamplingSettings(prompt_tokens=4, new_tokens=5, temperature=1.0)
    batch = student_batch(model, windows, settings, generator=new_generator(1))
    assert batch["input_ids"].shape == (3, 8)
    assert torch.equal(batch["input_ids"][:, :4], windows[:, :4])
    assert batch["generated"].tolist() == [5, 5, 5]
    assert (batch["labels"][:, :3] == IGNORE_INDEX).all()
    # the labels are the next inputs: what the student wrote
    assert torch.equal(batch["labels"][:, 3:-1], batch["input_ids"][:, 4:])
    again = student_batch(model, windows, settings, generator=new_generator(1))
    assert torch.equal(again["labels"], batch["labels"])


def test_student_batch_refuses_a_prompt_longer_than_the_window():
    settings = SamplingSettings(prompt_tokens=20, new_tokens=2)
    with pytest.raises(ValueError, match="prompt_tokens: 20 is longer"):
        student_batch(random_model(), torch.zeros(2, 8, dtype=torch.long), settings)


def test_teacher_nll_sum_matches_a_float64_reference_from_logits_and_from_hidden_states():
    torch.manual_seed(0)
    hidden, head = torch.randn(2, 5, 8), torch.randn(30, 8)
    labels = torch.tensor([[IGNORE_INDEX, 3, 4, IGNORE_INDEX, 7], [1, 2, IGNORE_INDEX, 0, 29]])
    logits = hidden.double() @ head.double().t()
    keep = labels != IGNORE_INDEX
    reference = -torch.log_softmax(logits[keep], -1).gather(1, labels[keep][:, None]).sum()
    assert math.isclose(float(teacher_nll_sum(hidden, labels, head)), float(reference),
                        rel_tol=1e-5)
    assert math.isclose(float(teacher_nll_sum(logits.float(), labels)), float(reference),
                        rel_tol=1e-5)
    assert float(F.cross_entropy(logits[keep], labels[keep], reduction="sum")) == pytest.approx(
        float(reference))


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1 / 3, 0.7, 1.0])
def test_the_schedule_makes_exactly_the_share_of_micro_batches_on_policy(fraction):
    chosen = [is_on_policy(k, fraction) for k in range(300)]
    assert sum(chosen) == math.floor(300 * fraction)
    # spread evenly: every run of 10 holds floor or ceil of its share
    for start in range(0, 300, 10):
        assert abs(sum(chosen[start:start + 10]) - 10 * fraction) <= 1


def test_sampling_settings_from_the_config_section():
    config = load_config(None, ["--data.path=d", "--student.path=s", "--teacher.path=t",
                                "--onpolicy.top_k=0", "--onpolicy.top_p=1.0",
                                "--onpolicy.stop_token=-1", "--onpolicy.fraction=0.5",
                                "--batch.seq_len=256"])
    settings = SamplingSettings.of(config.onpolicy, valid_vocab=None)
    assert (settings.top_k, settings.top_p, settings.stop_token) == (None, None, None)
    assert settings.length == 128


@pytest.mark.parametrize("overrides, message", [
    (["--onpolicy.fraction=1.5"], "onpolicy.fraction: must be in [0, 1]"),
    (["--onpolicy.fraction=-0.1"], "onpolicy.fraction: must be in [0, 1]"),
    (["--onpolicy.new_tokens=0"], "onpolicy.new_tokens: must be > 0"),
    (["--onpolicy.top_p=0"], "onpolicy.top_p: must be in (0, 1]"),
    (["--onpolicy.top_p=1.5"], "onpolicy.top_p: must be in (0, 1]"),
    (["--onpolicy.temperature=-1"], "onpolicy.temperature: must be a finite number >= 0"),
    (["--onpolicy.fraction=0.5", "--onpolicy.prompt_tokens=100"],
     "onpolicy.prompt_tokens (100) + onpolicy.new_tokens (64) exceeds batch.seq_len"),
    (["--onpolicy.fraction=0.5", "--teacher.path=", "--teacher.cache=c"],
     "cannot train from teacher.cache: a cache holds the teacher's distribution over the "
     "corpus"),
    (["--onpolicy.fraction=0.5", "--teacher.path="], "onpolicy.fraction=0.5 needs teacher.path"),
])
def test_onpolicy_keys_out_of_range_are_errors_naming_the_key(overrides, message):
    base = ["--data.path=d", "--student.path=s", "--teacher.path=t", "--batch.seq_len=128"]
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, base + overrides)


def test_every_decode_step_runs_even_when_every_row_has_stopped(monkeypatch):
    """Ranks of a sharded student must run the same forwards: student_batch never stops
    early, even when every row draws its stop token at once (here: the greedy first token)."""
    model = random_model(seed=3)
    windows = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    greedy = SamplingSettings(prompt_tokens=4, new_tokens=5, temperature=0.0)
    first = student_batch(model, windows, greedy)["input_ids"][:, 4]
    if first[0] != first[1]:
        windows[1] = windows[0]  # one stop id for both rows
    stop = int(student_batch(model, windows, greedy)["input_ids"][0, 4])
    calls = []
    original = type(model).hidden_states
    monkeypatch.setattr(type(model), "hidden_states",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    batch = student_batch(model, windows, replace(greedy, stop_token=stop))
    assert batch["generated"].tolist() == [1, 1]
    assert (batch["labels"][:, 4:] == IGNORE_INDEX).all()
    assert len(calls) == 5  # the prefill and four decode steps


def test_a_row_whose_prompt_holds_padding_is_masked_whole():
    model = random_model(seed=3)
    windows = torch.randint(2, VOCAB, (2, 8), generator=torch.Generator().manual_seed(2))
    labels = windows.roll(-1, dims=1)
    labels[1, 2:] = IGNORE_INDEX  # row 1: a document of 3 tokens, then padding
    settings = SamplingSettings(prompt_tokens=4, new_tokens=3)
    batch = student_batch(model, windows, settings, generator=new_generator(0), labels=labels)
    assert batch["generated"].tolist() == [3, 0]
    assert (batch["labels"][1] == IGNORE_INDEX).all()
    assert (batch["labels"][0, 3:] != IGNORE_INDEX).all()
