"""Random-weight Pythia checkpoints built through transformers, the parity reference.

Hugging Face downloads are impossible here, so tests make checkpoints with the exact
Pythia shapes and perturb every parameter: LayerNorm weights of exactly one and biases
of exactly zero would let a missing term go unnoticed.
"""

from __future__ import annotations

from pathlib import Path

import torch

# Pythia's shapes (docs/architecture.md); vocab 50304 with 50277 real tokens.
PYTHIA_SHAPES = {
    "70m": dict(
        num_hidden_layers=6, hidden_size=512, num_attention_heads=8, intermediate_size=2048
    ),
    "160m": dict(
        num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072
    ),
    # Small but structurally complete (partial rotary, several heads and layers), for fast tests.
    "tiny": dict(num_hidden_layers=2, hidden_size=64, num_attention_heads=4, intermediate_size=256),
}


def pythia_config(
    size: str = "70m", *, vocab_size: int = 50304, max_positions: int = 2048, **overrides
):
    """A transformers GPTNeoXConfig with Pythia's fields (rotary 0.25, base 10000, parallel
    residual)."""
    from transformers import GPTNeoXConfig

    fields = dict(
        vocab_size=vocab_size,
        max_position_embeddings=max_positions,
        rotary_pct=0.25,
        rotary_emb_base=10000,
        layer_norm_eps=1e-5,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        hidden_act="gelu",
        bos_token_id=0,
        eos_token_id=0,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        initializer_range=0.02,
    )
    fields.update(PYTHIA_SHAPES[size])
    fields.update(overrides)
    config = GPTNeoXConfig(**fields)
    # transformers 5 folds the rotary fields into rope_parameters; state them there too.
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        rope["partial_rotary_factor"] = fields["rotary_pct"]
        rope["rope_theta"] = float(fields["rotary_emb_base"])
    return config


def random_pythia(size: str = "70m", *, seed: int = 0, **config_overrides):
    """A GPTNeoXForCausalLM in fp32 and eval mode with every parameter perturbed."""
    from transformers import GPTNeoXForCausalLM

    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(pythia_config(size, **config_overrides)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("final_layer_norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.02 * torch.randn_like(param))
            else:
                param.copy_(0.02 * torch.randn_like(param))
    return model


def save_random_pythia(path: Path, size: str = "70m", *, seed: int = 0, **save_kwargs) -> Path:
    """Write a random Pythia-shaped checkpoint folder (config.json + safetensors) and return it."""
    model = random_pythia(size, seed=seed)
    model.save_pretrained(path, **save_kwargs)
    return Path(path)
