"""The hand-written GPT-NeoX forward against transformers, on random weights.

Parity metric everywhere: max |ours - reference| / max |reference logit|, the reference
being transformers in fp32. fp32 must agree to 1e-4, both models in bf16 to 2e-2.
"""

from __future__ import annotations

import copy

import pytest
import torch

from engine.model import CheckpointError, GPTNeoX, GPTNeoXConfig, KVCache
from engine.model.network import PackedLinears, autocast_context
from tests.hf_models import random_pythia

FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2

# The config.json EleutherAI ships with pythia-70m (transformers 4.24 era keys).
CLASSIC_PYTHIA_70M = {
    "architectures": ["GPTNeoXForCausalLM"],
    "bos_token_id": 0,
    "eos_token_id": 0,
    "hidden_act": "gelu",
    "hidden_size": 512,
    "initializer_range": 0.02,
    "intermediate_size": 2048,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 2048,
    "model_type": "gpt_neox",
    "num_attention_heads": 8,
    "num_hidden_layers": 6,
    "rotary_emb_base": 10000,
    "rotary_pct": 0.25,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "transformers_version": "4.24.0",
    "use_cache": True,
    "use_parallel_residual": True,
    "vocab_size": 50304,
}


def hf_state_dict_as_ours(hf_model) -> dict[str, torch.Tensor]:
    """transformers 5 calls the head `lm_head` in memory (it saves it as `embed_out`)."""
    return {
        ("embed_out." + k[len("lm_head."):] if k.startswith("lm_head.") else k): v
        for k, v in hf_model.state_dict().items()
    }


def ours_from_hf(hf_model) -> GPTNeoX:
    model = GPTNeoX(GPTNeoXConfig.from_hf_dict(hf_model.config.to_dict()))
    model.load_state_dict(hf_state_dict_as_ours(hf_model), strict=True)
    return model.to(hf_model.dtype).eval()


def relative_max_diff(ours: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.float()
    return ((ours.float() - reference).abs().max() / reference.abs().max()).item()


@torch.no_grad()
def hf_logits(hf_model, input_ids):
    return hf_model(input_ids).logits


# ------------------------------------------------------------------------------ parity


@pytest.mark.parametrize("size", ["70m", "160m"])
def test_parity_with_transformers_exact_pythia_shapes(size):
    hf = random_pythia(size, seed=11)
    ours = ours_from_hf(hf)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 50277, (2, 67), generator=generator)

    reference = hf_logits(hf, input_ids)
    with torch.no_grad():
        logits = ours(input_ids)
    assert logits.shape == (2, 67, 50304) and logits.dtype == torch.float32
    assert relative_max_diff(logits, reference) <= FP32_TOLERANCE

    hf.to(torch.bfloat16)
    ours.to(torch.bfloat16)
    hf_bf16 = hf_logits(hf, input_ids)
    with torch.no_grad():
        ours_bf16 = ours(input_ids)
    assert ours_bf16.dtype == torch.bfloat16
    scale = reference.abs().max()
    assert ((ours_bf16.float() - hf_bf16.float()).abs().max() / scale).item() <= BF16_TOLERANCE
    assert relative_max_diff(ours_bf16, reference) <= BF16_TOLERANCE


def test_parity_at_full_2048_context():
    hf = random_pythia("70m", seed=5)
    ours = ours_from_hf(hf)
    input_ids = torch.randint(0, 50277, (1, 2048), generator=torch.Generator().manual_seed(9))
    reference = hf_logits(hf, input_ids)
    with torch.no_grad():
        logits = ours(input_ids)
    assert relative_max_diff(logits, reference) <= FP32_TOLERANCE


@pytest.mark.parametrize("parallel", [False, True])
def test_parity_residual_variants_small_vocab(parallel):
    hf = random_pythia("tiny", seed=2, vocab_size=503, use_parallel_residual=parallel)
    ours = ours_from_hf(hf)
    assert ours.config.use_parallel_residual is parallel
    input_ids = torch.randint(0, 503, (3, 45), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert relative_max_diff(ours(input_ids), hf_logits(hf, input_ids)) <= FP32_TOLERANCE


def test_sequential_and_parallel_residual_really_differ():
    hf = random_pythia("tiny", seed=2, vocab_size=97)
    parallel = ours_from_hf(hf)
    sequential = copy.deepcopy(parallel)
    for block in sequential.gpt_neox.layers:
        block.use_parallel_residual = False
    input_ids = torch.randint(0, 97, (1, 13))
    with torch.no_grad():
        assert relative_max_diff(sequential(input_ids), parallel(input_ids)) > 1e-3


# ------------------------------------------------------------------------------ model API


def tiny_config(**overrides) -> GPTNeoXConfig:
    fields = dict(vocab_size=211, hidden_size=64, num_layers=3, num_heads=4, intermediate_size=176)
    fields.update(overrides)
    return GPTNeoXConfig(**fields)


def perturbed(config: GPTNeoXConfig, *, seed: int = 0, scale: float = 0.05) -> GPTNeoX:
    """Our model in eval mode, every parameter (LayerNorm and biases included) moved off its
    init by scale * N(0, 1); seeds the global RNG first, so the weights depend on `seed` only."""
    torch.manual_seed(seed)
    model = GPTNeoX(config)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model.eval()


def test_hidden_states_feed_the_head():
    torch.manual_seed(0)
    model = GPTNeoX(tiny_config()).eval()
    input_ids = torch.randint(0, 211, (2, 19))
    with torch.no_grad():
        hidden = model.hidden_states(input_ids)
        assert hidden.shape == (2, 19, 64)
        torch.testing.assert_close(model.embed_out(hidden), model(input_ids))
    assert isinstance(model.embed_out, torch.nn.Linear) and model.embed_out.bias is None


def test_fresh_initialisation_is_trainable_from_scratch():
    torch.manual_seed(0)
    model = GPTNeoX(tiny_config(vocab_size=4001, hidden_size=128, num_heads=4))
    embed = model.gpt_neox.embed_in.weight
    assert abs(embed.std().item() - 0.02) < 1e-3 and abs(embed.mean().item()) < 1e-3
    qkv = model.gpt_neox.layers[0].attention.query_key_value
    assert abs(qkv.weight.std().item() - 0.02) < 2e-3
    assert torch.count_nonzero(qkv.bias) == 0
    layer_norm = model.gpt_neox.layers[1].input_layernorm
    assert torch.all(layer_norm.weight == 1) and torch.all(layer_norm.bias == 0)
    input_ids = torch.randint(0, 4001, (2, 33))
    loss = torch.nn.functional.cross_entropy(model(input_ids).flatten(0, 1), input_ids.flatten())
    loss.backward()
    # Untrained: close to a uniform guess over the vocabulary.
    assert abs(loss.item() - torch.log(torch.tensor(4001.0)).item()) < 0.5
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_num_parameters_matches_hf_counts_for_pythia():
    with torch.device("meta"):
        small = GPTNeoX(GPTNeoXConfig.from_hf_dict(CLASSIC_PYTHIA_70M))
        medium = GPTNeoX(GPTNeoXConfig(50304, 768, 12, 12, 3072))
    assert small.num_parameters() == 70_426_624
    assert medium.num_parameters() == 162_322_944


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(4)
    model = GPTNeoX(tiny_config(use_parallel_residual=False)).train()
    input_ids = torch.randint(0, 211, (2, 23))

    def gradients():
        model.zero_grad(set_to_none=True)
        logits = model(input_ids)
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), input_ids.flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = gradients()
    model.set_activation_checkpointing(True)
    recomputed = gradients()
    for name, grad in plain.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_rotary_tables_stay_fp32_when_the_model_is_cast():
    model = GPTNeoX(tiny_config()).to(torch.bfloat16)
    assert model.embed_out.weight.dtype == torch.bfloat16
    assert model.rotary.cos.dtype == torch.float32 and model.rotary.sin.dtype == torch.float32
    fresh = GPTNeoX(tiny_config())
    torch.testing.assert_close(model.rotary.cos, fresh.rotary.cos, rtol=0, atol=0)
    model.half()
    assert model.rotary.sin.dtype == torch.float32
    assert model(torch.randint(0, 211, (1, 7))).dtype == torch.float16


def test_rotary_touches_only_the_first_rotary_dims():
    config = tiny_config(rotary_pct=0.25)  # head_dim 16 -> 4 rotated dims
    model = GPTNeoX(config)
    x = torch.randn(1, 4, 9, config.head_dim)
    from engine.model import apply_rotary

    rotated = apply_rotary(x, model.rotary.cos[:9], model.rotary.sin[:9])
    torch.testing.assert_close(rotated[..., 4:], x[..., 4:], rtol=0, atol=0)
    torch.testing.assert_close(rotated[:, :, 0], x[:, :, 0])  # position 0: identity
    assert not torch.allclose(rotated[:, :, 1:, :4], x[:, :, 1:, :4])


def test_kv_cache_chunks_match_the_full_forward():
    model = perturbed(tiny_config(), seed=7)
    input_ids = torch.randint(0, 211, (2, 21))
    cache = model.new_kv_cache(batch_size=2, max_len=21)
    with torch.no_grad():
        full = model(input_ids)
        pieces = [model(input_ids[:, :10], kv_cache=cache, start_pos=0)]
        # A multi-token chunk after a prefix, then one token at a time.
        pieces.append(model(input_ids[:, 10:15], kv_cache=cache, start_pos=10))
        for pos in range(15, 21):
            pieces.append(model(input_ids[:, pos : pos + 1], kv_cache=cache, start_pos=pos))
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="overflow"):
        model(input_ids[:, :1], kv_cache=cache, start_pos=21)


@pytest.mark.parametrize("parallel", [True, False])
def test_packed_decode_and_last_only_prefill_match_the_full_forward(parallel):
    model = perturbed(tiny_config(use_parallel_residual=parallel), seed=11)
    input_ids = torch.randint(0, 211, (2, 21), generator=torch.Generator().manual_seed(3))
    assert PackedLinears.usable(model)
    packed = PackedLinears(model, head_rows=200, batch_hint=2)
    cache = model.new_kv_cache(batch_size=2, max_len=21)
    cache.linears = packed
    with torch.no_grad():
        full = model.hidden_states(input_ids)
        prefill = model.hidden_states(input_ids[:, :10], cache, 0, last_only=True)
        steps = [model.hidden_states(input_ids[:, pos : pos + 1], cache, pos)
                 for pos in range(10, 21)]
        logits = packed.head(steps[-1][:, 0])
    assert prefill.shape == (2, 1, 64)  # the last position alone
    torch.testing.assert_close(prefill[:, 0], full[:, 9], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.cat(steps, dim=1), full[:, 10:], rtol=1e-5, atol=1e-5)
    reference = full[:, 20] @ model.embed_out.weight[:200].t()
    assert logits.shape == (2, 200)
    torch.testing.assert_close(logits, reference, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="last_only needs a kv_cache"):
        model.hidden_states(input_ids, last_only=True)


def test_packed_linears_apply_only_to_plain_fp32_cpu_weights_without_autocast():
    model = perturbed(tiny_config(), seed=1)
    assert PackedLinears.usable(model)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # its bf16 product must not be skipped
        assert not PackedLinears.usable(model)
    assert not PackedLinears.usable(copy.deepcopy(model).to(torch.bfloat16))


def test_forward_rejects_bad_input():
    model = GPTNeoX(tiny_config(max_positions=16))
    with pytest.raises(ValueError, match="max_positions=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.rand(1, 5))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="max_len"):
        KVCache(model.config, 1, 17, dtype=torch.float32, device="cpu")


# ------------------------------------------------------------------------------ config


def test_config_reads_classic_pythia_keys():
    config = GPTNeoXConfig.from_hf_dict(CLASSIC_PYTHIA_70M)
    assert (config.vocab_size, config.hidden_size, config.num_layers) == (50304, 512, 6)
    assert (config.num_heads, config.intermediate_size, config.max_positions) == (8, 2048, 2048)
    assert config.rotary_pct == 0.25 and config.rotary_base == 10000.0
    assert config.head_dim == 64 and config.rotary_dims == 16
    assert config.layer_norm_eps == 1e-5 and config.use_parallel_residual is True


def test_config_reads_transformers5_rope_parameters_and_round_trips():
    hf_dict = random_pythia("tiny", vocab_size=50).config.to_dict()
    hf_dict.pop("rotary_pct", None)
    hf_dict.pop("rotary_emb_base", None)
    hf_dict["rope_parameters"] = {
        "rope_type": "default", "rope_theta": 500.0, "partial_rotary_factor": 0.5
    }
    config = GPTNeoXConfig.from_hf_dict(hf_dict)
    assert config.rotary_base == 500.0 and config.rotary_pct == 0.5 and config.rotary_dims == 8
    written = config.to_hf_dict(torch.float16)
    assert written["rotary_emb_base"] == 500.0 and written["rope_parameters"]["rope_theta"] == 500.0
    assert written["torch_dtype"] == "float16"
    assert GPTNeoXConfig.from_hf_dict(written) == config


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "llama"}, "model_type"),
        ({"hidden_act": "gelu_new"}, "hidden_act"),
        ({"tie_word_embeddings": True}, "tie_word_embeddings"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "linear", "factor": 2.0}}, "rope_type"),
        ({"hidden_dropout": 0.1}, "hidden_dropout"),
        ({"attention_bias": False}, "attention_bias"),
        ({"num_attention_heads": 7}, "not divisible"),
        ({"rotary_pct": 0.3}, "even"),
        ({"vocab_size": "50304"}, "vocab_size"),
    ],
)
def test_config_refuses_unsupported_fields(change, message):
    bad = {**CLASSIC_PYTHIA_70M, **change}
    with pytest.raises(CheckpointError, match=message):
        GPTNeoXConfig.from_hf_dict(bad, source="some/config.json")


@pytest.mark.parametrize(
    "key",
    ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
     "max_position_embeddings", "layer_norm_eps", "use_parallel_residual", "rotary_pct",
     "rotary_emb_base", "model_type"],
)
def test_config_names_a_missing_field(key):
    bad = {k: v for k, v in CLASSIC_PYTHIA_70M.items() if k != key}
    with pytest.raises(CheckpointError, match=key) as info:
        GPTNeoXConfig.from_hf_dict(bad, source="some/config.json")
    assert "some/config.json" in str(info.value)


def test_autocast_context_runs_matmuls_in_the_given_dtype():
    a = torch.randn(4, 4)
    with autocast_context("cpu", torch.bfloat16):
        assert (a @ a).dtype is torch.bfloat16
    with autocast_context("cpu", None):
        assert (a @ a).dtype is torch.float32
