"""The sampler: KV-cache decoding agrees with recomputation and with our own full forward."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from engine.generate import generate, main
from engine.model import GPTNeoX, GPTNeoXConfig, save_pretrained
from tests.engine.test_model import perturbed

REPO_ROOT = Path(__file__).resolve().parents[2]
VOCAB = 307


def random_model(seed=0, vocab_size=VOCAB, **overrides) -> GPTNeoX:
    fields = dict(vocab_size=vocab_size, hidden_size=64, num_layers=2, num_heads=4,
                  intermediate_size=192, max_positions=128)
    fields.update(overrides)
    # Sharper logits than the 0.02 init, so greedy is decisive.
    return perturbed(GPTNeoXConfig(**fields), seed=seed, scale=0.15)


def prompts(batch=2, length=11, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_cached_and_uncached_greedy_decoding_agree():
    model = random_model(seed=3)
    prompt = prompts()
    cached = generate(model, prompt, 40, use_kv_cache=True)
    recomputed = generate(model, prompt, 40, use_kv_cache=False)
    assert cached.shape == (2, 40)
    assert torch.equal(cached, recomputed)
    for row in cached:  # real continuations, not one id repeated (that would prove little)
        assert len(set(row.tolist())) > 5


def test_greedy_equals_argmax_of_the_full_forward():
    model = random_model(seed=2)
    prompt = prompts(batch=3, length=7, seed=5)
    new = generate(model, prompt, 25)
    sequence = torch.cat((prompt, new), dim=1)
    with torch.no_grad():
        predictions = model(sequence).argmax(dim=-1)
    # The token at position p+1 is the argmax of the logits at position p.
    assert torch.equal(predictions[:, prompt.shape[1] - 1 : -1], new)


def test_sampling_is_seeded_and_top_k_restricts_the_choice():
    model = random_model(seed=3)
    prompt = prompts(batch=2, length=5, seed=1)

    def sample(seed, use_kv_cache=True, top_k=None):
        generator = torch.Generator().manual_seed(seed)
        return generate(model, prompt, 30, temperature=1.3, top_k=top_k, generator=generator,
                        use_kv_cache=use_kv_cache)

    assert torch.equal(sample(0), sample(0))
    assert torch.equal(sample(0), sample(0, use_kv_cache=False))
    assert not torch.equal(sample(0), sample(1))

    top3 = sample(7, top_k=3)
    sequence = torch.cat((prompt, top3), dim=1)
    with torch.no_grad():
        allowed = model(sequence)[:, prompt.shape[1] - 1 : -1].topk(3, dim=-1).indices
    assert (allowed == top3[..., None]).any(dim=-1).all()
    assert torch.equal(sample(9, top_k=1), generate(model, prompt, 30))  # top-1 is greedy


def test_stop_token_and_valid_vocab():
    model = random_model(seed=4)
    prompt = prompts(batch=1, length=6, seed=2)
    first = generate(model, prompt, 1)[0, 0].item()
    stopped = generate(model, prompt, 20, stop_token=first)
    assert stopped.tolist() == [[first]]

    with torch.no_grad():
        # Rows 300.. point along the last hidden state, so their logits dominate.
        model.embed_out.weight[300:] = 10.0 * model.hidden_states(prompt)[0, -1]
    assert generate(model, prompt, 1)[0, 0].item() >= 300  # padded rows would win...
    assert (generate(model, prompt, 15, valid_vocab=300) < 300).all()  # ...unless excluded


def test_generate_rejects_bad_requests():
    model = random_model()
    with pytest.raises(ValueError, match="max_positions=128"):
        generate(model, prompts(length=100), 29)
    with pytest.raises(ValueError, match="temperature"):
        generate(model, prompts(), 3, temperature=-1.0)
    with pytest.raises(ValueError, match="top_k"):
        generate(model, prompts(), 3, temperature=1.0, top_k=0)
    assert generate(model, prompts()[0], 0).shape == (0,)


def test_cli_prints_the_prompt_and_its_continuation(tmp_path, neox_tokenizer_path, capsys):
    folder = save_pretrained(
        random_model(seed=6, vocab_size=50304, max_positions=2048), tmp_path / "student"
    )
    common = ["--model", str(folder), "--tokenizer", str(neox_tokenizer_path),
              "--prompt", "Hello world, this is the Pile.", "--max-new-tokens", "12"]
    assert main(common) == 0
    cached = capsys.readouterr().out
    assert main([*common, "--no-kv-cache"]) == 0
    assert capsys.readouterr().out == cached
    assert cached.startswith("Hello world, this is the Pile.") and len(cached) > 32
    assert main([*common, "--temperature", "0.8", "--top-k", "20", "--seed", "3"]) == 0
    assert capsys.readouterr().out.startswith("Hello world")


def test_cli_exits_non_zero_with_the_missing_folder_named(tmp_path, neox_tokenizer_path):
    missing = tmp_path / "no-such-model"
    result = subprocess.run(
        [sys.executable, "-m", "engine.generate", "--model", str(missing),
         "--tokenizer", str(neox_tokenizer_path), "--prompt", "x"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert "no-such-model" in result.stderr
