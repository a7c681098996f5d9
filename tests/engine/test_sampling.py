"""engine.sampling: greedy parity with transformers' generate, sampled frequencies against the
softmax (chi-square), top-k / top-p truncation, stop-token masking, valid_vocab, the generator
state round trip, argument checks, no gradient and the model's mode restored."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine.model import load_pretrained
from engine.sampling import (
    generator_state,
    new_generator,
    next_tokens,
    restore_generator_state,
    sample,
)
from tests.engine.test_generate import VOCAB, prompts, random_model
from tests.hf_models import random_pythia

# Upper 0.1% points of the chi-square distribution by degrees of freedom (scipy's
# chi2.ppf(0.999, df)): a correct sampler stays below them with probability 0.999, and the
# seeds below are fixed, so the tests are deterministic.
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
            8: 26.124, 9: 27.877, 10: 29.588, 11: 31.264}
DRAWS = 20_000


def chi_square(drawn: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of the drawn ids against the expected probabilities (categories of
    probability 0 must never be drawn: they are checked, and left out of the sum)."""
    counts = torch.bincount(drawn, minlength=probs.numel()).double()
    possible = probs > 0
    assert counts[~possible].sum() == 0, "drew an id of probability 0"
    expected = probs.double()[possible] * drawn.numel()
    return float(((counts[possible] - expected) ** 2 / expected).sum())


def draws(logits: torch.Tensor, seed: int = 0, **kwargs) -> torch.Tensor:
    """DRAWS tokens from one row of logits (the row repeated: one decoding step, many rows)."""
    batch = logits.expand(DRAWS, -1)
    return next_tokens(batch, generator=new_generator(seed), **kwargs)


def fixed_logits(vocab: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, generator=torch.Generator().manual_seed(seed)) * 1.5


# ----------------------------------------------------------------------------- greedy parity


def test_greedy_equals_transformers_generate_token_for_token(tmp_path):
    from transformers import GenerationConfig

    theirs = random_pythia("tiny", seed=12, vocab_size=VOCAB, max_positions=64)
    with torch.no_grad():  # matrices 7x the 0.02 init: varied continuations, decisive argmaxes
        for param in theirs.parameters():
            if param.dim() == 2:
                param.mul_(7)
    theirs.save_pretrained(tmp_path / "tiny")
    ours = load_pretrained(tmp_path / "tiny", dtype=torch.float32)
    batch = prompts(batch=4, length=9, seed=3)
    config = GenerationConfig(max_new_tokens=24, do_sample=False, use_cache=True,
                              eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        expected = theirs.generate(batch, attention_mask=torch.ones_like(batch),
                                   generation_config=config)[:, batch.shape[1]:]
    out = sample(ours, batch, 24, temperature=0.0)
    assert out.tokens.shape == (4, 24) and out.mask.all() and out.lengths.tolist() == [24] * 4
    assert torch.equal(out.tokens, expected)
    assert all(len(set(row.tolist())) > 5 for row in expected)  # real continuations


# ----------------------------------------------------------------------------- frequencies


def test_sampled_frequencies_match_the_softmax():
    logits = fixed_logits(10)
    drawn = draws(logits, temperature=0.7)
    statistic = chi_square(drawn, torch.softmax(logits / 0.7, dim=-1))
    assert statistic < CHI2_999[9], statistic
    # The test has power: the same draws are far from the temperature-1 softmax.
    assert chi_square(drawn, torch.softmax(logits, dim=-1)) > 10 * CHI2_999[9]


def test_top_k_draws_only_the_k_largest_in_their_softmax_proportions():
    logits = fixed_logits(20, seed=1)
    top = logits.topk(5).indices
    drawn = draws(logits, seed=2, temperature=1.0, top_k=5)
    assert set(drawn.unique().tolist()) == set(top.tolist())  # all five, nothing else
    kept = torch.full_like(logits, float("-inf"))
    kept[top] = logits[top]
    assert chi_square(drawn, torch.softmax(kept, dim=-1)) < CHI2_999[4]


def test_top_p_draws_only_the_nucleus_in_its_softmax_proportions():
    logits = fixed_logits(20, seed=4)
    probs = torch.softmax(logits / 1.3, dim=-1)
    order = probs.argsort(descending=True)
    mass_before = probs[order].cumsum(0) - probs[order]
    nucleus = order[mass_before < 0.6]  # the smallest set whose probability reaches 0.6
    assert 2 < nucleus.numel() < 20 and probs[nucleus].sum() >= 0.6
    drawn = draws(logits, seed=5, temperature=1.3, top_p=0.6)
    assert set(drawn.unique().tolist()) == set(nucleus.tolist())
    kept = torch.zeros_like(probs)
    kept[nucleus] = probs[nucleus] / probs[nucleus].sum()
    assert chi_square(drawn, kept) < CHI2_999[nucleus.numel() - 1]
    # top-k then top-p: the nucleus of the top 2 is cut from them, never beyond them.
    both = draws(logits, seed=6, temperature=1.3, top_k=2, top_p=0.999)
    assert set(both.unique().tolist()) == set(order[:2].tolist())
    # A tiny top_p keeps only the most likely token: greedy.
    assert (draws(logits, temperature=1.3, top_p=1e-6) == order[0]).all()


# ----------------------------------------------------------------------------- stop, vocab


def test_a_stopped_row_is_masked_after_its_stop_token_and_not_dropped():
    model = random_model(seed=3)
    batch = prompts(batch=3, length=6, seed=7)
    free = sample(model, batch, 16, temperature=0.0).tokens
    # A stop token that row 0 writes at some step and row 2 never writes.
    stop = next(t for t in free[0].tolist() if t not in free[2].tolist())
    out = sample(model, batch, 16, temperature=0.0, stop_token=stop)
    assert out.tokens.shape == (3, 16) and torch.equal(out.lengths, out.mask.sum(1))
    for row in range(3):
        hits = (free[row] == stop).nonzero()
        length = int(hits[0]) + 1 if hits.numel() else 16  # the stop token counts
        assert out.lengths[row] == length
        assert out.mask[row].tolist() == [True] * length + [False] * (16 - length)
        assert torch.equal(out.tokens[row, :length], free[row, :length])
        assert (out.tokens[row, length:] == stop).all()
    assert out.lengths[0] < 16 and out.lengths[2] == 16

    # One stop id per row; and a batch whose rows all stop at once keeps its width.
    per_row = sample(model, batch, 16, temperature=0.0,
                     stop_token=torch.tensor([stop, free[1, 0].item(), free[2, 4].item()]))
    assert per_row.lengths.tolist() == [out.lengths[0].item(), 1, 5]
    first = sample(model, batch, 16, temperature=0.0, stop_token=free[:, 0].clone())
    assert first.tokens.shape == (3, 16) and first.lengths.tolist() == [1, 1, 1]


def test_ids_at_or_past_valid_vocab_are_never_sampled():
    model = random_model(seed=4)
    batch = prompts(batch=2, length=6, seed=2)
    with torch.no_grad():  # rows 300.. point along the last hidden state: their logits dominate
        model.embed_out.weight[300:] = 10.0 * model.hidden_states(batch)[:, -1].mean(0)
    assert (sample(model, batch, 1, temperature=0.0).tokens >= 300).all()  # they would win...
    for kwargs in (dict(temperature=0.0), dict(temperature=1.0), dict(temperature=2.0, top_k=50),
                   dict(temperature=1.0, top_p=0.95)):
        out = sample(model, batch, 12, valid_vocab=300, generator=new_generator(1), **kwargs)
        assert (out.tokens < 300).all(), kwargs  # ...unless excluded


# ----------------------------------------------------------------------------- determinism


def test_sampling_is_seeded_and_the_cache_changes_nothing():
    model = random_model(seed=5)
    batch = prompts(batch=3, length=5, seed=1)

    def run(seed, **kwargs):
        return sample(model, batch, 20, temperature=1.1, top_p=0.9,
                      generator=new_generator(seed), **kwargs).tokens

    assert torch.equal(run(0), run(0))
    assert torch.equal(run(0), run(0, use_kv_cache=False))
    assert not torch.equal(run(0), run(1))


def test_a_restored_generator_state_samples_the_same_tokens(tmp_path):
    model = random_model(seed=6)
    batch = prompts(batch=2, length=4, seed=9)
    generator = new_generator(123)
    kwargs = dict(temperature=1.0, top_k=40)
    first = sample(model, batch, 5, generator=generator, **kwargs).tokens
    state = generator_state(generator)
    save_file({"sampler_rng": state}, tmp_path / "rng.safetensors")  # a plain tensor, no pickle
    prefix = torch.cat((batch, first), dim=1)
    uninterrupted = sample(model, prefix, 5, generator=generator, **kwargs).tokens

    resumed = new_generator(999)  # another seed: only the restored state can make it agree
    restore_generator_state(resumed, load_file(tmp_path / "rng.safetensors")["sampler_rng"])
    assert torch.equal(sample(model, prefix, 5, generator=resumed, **kwargs).tokens,
                       uninterrupted)
    fresh = sample(model, prefix, 5, generator=new_generator(999), **kwargs).tokens
    assert not torch.equal(fresh, uninterrupted)

    with pytest.raises(ValueError, match="generator state: expected a uint8 tensor"):
        restore_generator_state(resumed, state.float())
    with pytest.raises(ValueError, match="generator state"):
        restore_generator_state(resumed, state[:10])


# ----------------------------------------------------------------------------- arguments, mode


@pytest.mark.parametrize("kwargs, name", [
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(top_p=-0.1), "top_p"),
    (dict(top_p=math.nan), "top_p"), (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"),
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(new_tokens=0), "new_tokens"), (dict(new_tokens=120), "new_tokens"),
    (dict(valid_vocab=0), "valid_vocab"), (dict(valid_vocab=VOCAB + 1), "valid_vocab"),
    (dict(stop_token=VOCAB), "stop_token"), (dict(stop_token=5, valid_vocab=5), "stop_token"),
    (dict(stop_token=torch.tensor([1, 2, 3])), "stop_token"), (dict(stop_token=1.0), "stop_token"),
    (dict(prompts=prompts()[0]), "prompts"), (dict(prompts=prompts().float()), "prompts"),
    (dict(prompts=torch.tensor([[1, VOCAB]])), "prompts"),
])
def test_bad_arguments_are_value_errors_naming_the_argument(kwargs, name):
    model = random_model()
    call = dict(prompts=prompts(batch=2, length=11), new_tokens=4, temperature=1.0)
    call.update(kwargs)
    with pytest.raises(ValueError, match=f"^{name}"):
        sample(model, call.pop("prompts"), call.pop("new_tokens"), **call)


def test_too_long_a_request_names_the_position_table():
    with pytest.raises(ValueError, match=r"11 tokens\) \+ new_tokens \(118\) = 129 exceeds the "
                                         r"model's position table \(max_positions=128\)"):
        sample(random_model(), prompts(length=11), 118)


def test_runs_without_gradient_and_restores_the_mode():
    model = random_model(seed=8)
    batch = prompts(batch=2, length=5)
    for training in (True, False):
        model.train(training)
        out = sample(model, batch, 6, generator=new_generator(0))
        assert model.training is training and torch.is_grad_enabled()
        assert not out.tokens.requires_grad and not out.tokens.is_inference()
    # The samples feed a differentiated forward (what on-policy training does with them).
    model(torch.cat((batch, out.tokens), dim=1)).logsumexp(-1).mean().backward()
    assert model.embed_out.weight.grad is not None
