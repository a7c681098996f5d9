"""engine.eval: held-out metrics and lm-evaluation-harness scoring against transformers.

Every expected number here is computed independently inside the test from the logits of a
transformers GPTNeoXForCausalLM, one unpadded sequence at a time, in float64; our code batches,
pads, sorts, chunks and (for our own GPTNeoX) projects only the scored rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from engine.eval import heldout_metrics, score_batch
from tests.hf_models import random_pythia

TINY_VOCAB = 96


@pytest.fixture(scope="module")
def tiny_pair():
    student = random_pythia("tiny", seed=1, vocab_size=TINY_VOCAB, max_positions=64)
    teacher = random_pythia("tiny", seed=2, vocab_size=TINY_VOCAB, max_positions=64)
    return student, teacher


def _random_batches(seed: int, shapes, vocab: int, ignore_fraction: float = 0.3):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for batch, length in shapes:
        input_ids = torch.randint(0, vocab, (batch, length), generator=generator)
        labels = torch.randint(0, vocab, (batch, length), generator=generator)
        ignored = torch.rand(batch, length, generator=generator) < ignore_fraction
        labels[ignored] = -100
        batches.append({"input_ids": input_ids, "labels": labels})
    return batches


def _direct_metrics(student, teacher, batches, temperature, valid_vocab):
    """Float64 CE / KD / teacher CE straight from transformers' full logits."""
    ce = kd = teacher_ce = 0.0
    tokens = 0
    with torch.no_grad():
        for batch in batches:
            keep = batch["labels"] != -100
            targets = batch["labels"][keep]
            s = student(batch["input_ids"]).logits.double()[keep][:, :valid_vocab]
            t = teacher(batch["input_ids"]).logits.double()[keep][:, :valid_vocab]
            ce += -s.log_softmax(-1).gather(1, targets[:, None]).sum().item()
            teacher_ce += -t.log_softmax(-1).gather(1, targets[:, None]).sum().item()
            pt = (t / temperature).softmax(-1)
            kl = pt * ((t / temperature).log_softmax(-1) - (s / temperature).log_softmax(-1))
            kd += temperature**2 * kl.sum().item()
            tokens += int(keep.sum())
    return {
        "ce": ce / tokens,
        "kd": kd / tokens,
        "teacher_ce": teacher_ce / tokens,
        "tokens": tokens,
    }


@pytest.mark.parametrize("valid_vocab", [None, 83])
def test_heldout_metrics_equal_direct_computation(tiny_pair, valid_vocab):
    student, teacher = tiny_pair
    vocab_for_labels = valid_vocab or TINY_VOCAB
    batches = _random_batches(0, [(3, 17), (1, 5), (2, 31)], vocab_for_labels)
    expected = _direct_metrics(student, teacher, batches, 1.7, valid_vocab or TINY_VOCAB)
    got = heldout_metrics(
        student, batches, teacher=teacher, temperature=1.7, valid_vocab=valid_vocab, chunk_rows=7
    )
    assert got["tokens"] == expected["tokens"]
    for key in ("ce", "kd", "teacher_ce"):
        assert got[key] == pytest.approx(expected[key], rel=1e-5, abs=1e-6), key
    assert got["ppl"] == pytest.approx(math.exp(expected["ce"]), rel=1e-5)
    assert got["kd"] > 0


def test_heldout_metrics_without_teacher_and_mode_restored(tiny_pair):
    student, teacher = tiny_pair
    batches = _random_batches(1, [(2, 9), (3, 4)], TINY_VOCAB)
    student.train()
    got = heldout_metrics(student, iter(batches))
    assert student.training, "the student's train mode must be restored"
    student.eval()
    assert set(got) == {"ce", "ppl", "tokens"}
    expected = _direct_metrics(student, teacher, batches, 2.0, TINY_VOCAB)
    assert got["ce"] == pytest.approx(expected["ce"], rel=1e-5)
    assert torch.is_grad_enabled(), "no_grad must not leak out of heldout_metrics"


def test_heldout_metrics_rejects_empty_and_out_of_vocab(tiny_pair):
    student, _ = tiny_pair
    batch = _random_batches(2, [(2, 6)], TINY_VOCAB)[0]
    with pytest.raises(ValueError, match="no labelled token"):
        heldout_metrics(
            student,
            [{"input_ids": batch["input_ids"], "labels": torch.full_like(batch["labels"], -100)}],
        )
    bad = dict(batch, labels=batch["labels"].clamp(min=0).fill_(90))
    with pytest.raises(ValueError, match=r"\[0, 80\)"):
        heldout_metrics(student, [bad], valid_vocab=80)
    with pytest.raises(ValueError, match="batch 0"):
        heldout_metrics(student, [{"input_ids": batch["input_ids"]}])


def test_score_batch_rows(tiny_pair):
    student, _ = tiny_pair
    batch = _random_batches(3, [(4, 11)], TINY_VOCAB, ignore_fraction=0.6)[0]
    batch["labels"][2] = -100  # a row with nothing scored
    with torch.no_grad():
        loglik, greedy, counts = score_batch(
            student, batch["input_ids"], batch["labels"], chunk_rows=5
        )
        logits = student(batch["input_ids"]).logits.double()
    for row in range(4):
        keep = batch["labels"][row] != -100
        logp = logits[row][keep].log_softmax(-1)
        targets = batch["labels"][row][keep]
        assert loglik[row].item() == pytest.approx(
            logp.gather(1, targets[:, None]).sum().item(), abs=1e-5
        )
        assert bool(greedy[row]) == bool((logp.argmax(-1) == targets).all())
        assert counts[row].item() == int(keep.sum())
    assert bool(greedy[2]) and counts[2].item() == 0
