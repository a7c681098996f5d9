"""The GPT-NeoX model configuration, its Hugging Face config.json form, and Pythia's shapes.

The configuration sits apart from the network so that everything that only needs shapes (the
memory plan, neox-distill memplan, the benchmarks) reads them here, and apart from the safetensors
I/O so that a config.json can be read without touching weights.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class CheckpointError(ValueError):
    """A model folder, config or weights file that cannot be used; the message names it."""


@dataclass
class GPTNeoXConfig:
    """Everything the forward pass needs; defaults are Pythia's shared values (PYTHIA_COMMON)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_positions: int = 2048
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    layer_norm_eps: float = 1e-5
    use_parallel_residual: bool = True
    bos_token_id: int = 0
    eos_token_id: int = 0

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_positions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"GPTNeoXConfig.{name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"GPTNeoXConfig.hidden_size={self.hidden_size} is not divisible by "
                f"num_heads={self.num_heads}"
            )
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ValueError(f"GPTNeoXConfig.rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dims % 2:
            raise ValueError(
                f"GPTNeoXConfig: rotary dims int(head_dim * rotary_pct) = {self.rotary_dims} "
                "must be even for the half-split rotary form"
            )
        if not self.rotary_base > 0 or not self.layer_norm_eps > 0:
            raise ValueError("GPTNeoXConfig.rotary_base and layer_norm_eps must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def rotary_dims(self) -> int:
        return int(self.head_dim * self.rotary_pct)

    @classmethod
    def from_hf_dict(cls, d: dict, *, source: str = "config") -> GPTNeoXConfig:
        """Read a Hugging Face GPT-NeoX config dict (classic Pythia keys or transformers-5 keys).

        `source` names the file in error messages. Fields that would change the maths in ways
        this forward does not implement (another activation, tied head, rope scaling, dropout)
        are refused rather than silently ignored.
        """
        if not isinstance(d, dict):
            raise CheckpointError(f"{source}: expected a JSON object, got {type(d).__name__}")
        model_type = d.get("model_type")
        if model_type != "gpt_neox":
            raise CheckpointError(f"{source}: model_type must be 'gpt_neox', got {model_type!r}")
        _refuse_unsupported(d, source)
        rotary_pct, rotary_base = _rotary_fields(d, source)

        def need(key):
            if key not in d or d[key] is None:
                raise CheckpointError(f"{source}: missing required field {key!r}")
            return d[key]

        try:
            return cls(
                vocab_size=need("vocab_size"),
                hidden_size=need("hidden_size"),
                num_layers=need("num_hidden_layers"),
                num_heads=need("num_attention_heads"),
                intermediate_size=need("intermediate_size"),
                max_positions=need("max_position_embeddings"),
                rotary_pct=float(rotary_pct),
                rotary_base=float(rotary_base),
                layer_norm_eps=float(need("layer_norm_eps")),
                use_parallel_residual=bool(need("use_parallel_residual")),
                bos_token_id=_first_id(d.get("bos_token_id"), 0),
                eos_token_id=_first_id(d.get("eos_token_id"), 0),
            )
        except (TypeError, ValueError) as error:
            if isinstance(error, CheckpointError):
                raise
            raise CheckpointError(f"{source}: {error}") from error

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> GPTNeoXConfig:
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"{path}: config file not found")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: not valid JSON ({error})") from error
        return cls.from_hf_dict(data, source=str(path))

    def to_hf_dict(self, dtype: torch.dtype | None = None) -> dict:
        """A config.json that transformers 4.x (lm-evaluation-harness) and 5.x both load.

        The classic keys (rotary_pct, rotary_emb_base) serve older readers; rope_parameters
        is what transformers 5 reads first. Both state the same numbers.
        """
        d = {
            "architectures": ["GPTNeoXForCausalLM"],
            "model_type": "gpt_neox",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_positions,
            "rotary_pct": self.rotary_pct,
            "rotary_emb_base": self.rotary_base,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": float(self.rotary_base),
                "partial_rotary_factor": self.rotary_pct,
            },
            "layer_norm_eps": self.layer_norm_eps,
            "use_parallel_residual": self.use_parallel_residual,
            "hidden_act": "gelu",
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_dropout": 0.0,
            "tie_word_embeddings": False,
            "initializer_range": 0.02,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_cache": True,
        }
        if dtype is not None:
            name = str(dtype).removeprefix("torch.")
            d["torch_dtype"] = name  # transformers 4.x
            d["dtype"] = name  # transformers 5.x
        return d


def _first_id(value, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, list):
        return int(value[0]) if value else default
    return int(value)


def _refuse_unsupported(d: dict, source: str) -> None:
    """Refuse config fields whose maths this forward does not implement."""

    def refuse(key, supported, found):
        raise CheckpointError(
            f"{source}: unsupported {key}={found!r} (this implementation supports {supported})"
        )

    act = d.get("hidden_act", "gelu")
    if act != "gelu":
        refuse("hidden_act", "'gelu' (exact erf GELU)", act)
    if d.get("tie_word_embeddings", False):
        refuse("tie_word_embeddings", "false", d["tie_word_embeddings"])
    if not d.get("attention_bias", True):
        refuse("attention_bias", "true", d["attention_bias"])
    if d.get("rope_scaling") is not None:
        refuse("rope_scaling", "null", d["rope_scaling"])
    for key in ("attention_dropout", "hidden_dropout"):
        if d.get(key) not in (None, 0, 0.0):
            refuse(key, "0 (no dropout)", d[key])
    rope = d.get("rope_parameters")
    if rope is not None:
        if not isinstance(rope, dict):
            refuse("rope_parameters", "a JSON object", rope)
        if rope.get("rope_type", "default") != "default":
            refuse("rope_parameters.rope_type", "'default'", rope.get("rope_type"))


def _rotary_fields(d: dict, source: str) -> tuple[float, float]:
    """(rotary_pct, rotary_base) from transformers-5 rope_parameters or the classic keys."""
    rope = d.get("rope_parameters") or {}
    rotary_pct = rope.get("partial_rotary_factor", d.get("rotary_pct"))
    rotary_base = rope.get("rope_theta", d.get("rotary_emb_base"))
    if rotary_pct is None:
        raise CheckpointError(
            f"{source}: missing required field 'rotary_pct' "
            "(or rope_parameters.partial_rotary_factor)"
        )
    if rotary_base is None:
        raise CheckpointError(
            f"{source}: missing required field 'rotary_emb_base' "
            "(or rope_parameters.rope_theta)"
        )
    return rotary_pct, rotary_base


# --------------------------------------------------------------------------------------
# Pythia
# --------------------------------------------------------------------------------------

# The Pythia suite's shapes (docs/architecture.md); the other fields are shared by every size.
PYTHIA_SHAPES: dict[str, dict[str, int]] = {
    "pythia-70m": dict(hidden_size=512, num_layers=6, num_heads=8, intermediate_size=2048),
    "pythia-160m": dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072),
    "pythia-410m": dict(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096),
    "pythia-1b": dict(hidden_size=2048, num_layers=16, num_heads=8, intermediate_size=8192),
    "pythia-1.4b": dict(hidden_size=2048, num_layers=24, num_heads=16, intermediate_size=8192),
    "pythia-2.8b": dict(hidden_size=2560, num_layers=32, num_heads=32, intermediate_size=10240),
    # The two largest pad their head to more rows (same 50277 real tokens).
    "pythia-6.9b": dict(hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=16384,
                        vocab_size=50432),
    "pythia-12b": dict(hidden_size=5120, num_layers=36, num_heads=40, intermediate_size=20480,
                       vocab_size=50688),
}
PYTHIA_COMMON = dict(
    vocab_size=50304,
    max_positions=2048,
    rotary_pct=0.25,
    rotary_base=10000.0,
    layer_norm_eps=1e-5,
    use_parallel_residual=True,
)


def pythia_config(name: str) -> GPTNeoXConfig:
    """The GPTNeoXConfig of a Pythia size by name ("pythia-70m", "70m", ...)."""
    key = name if name.startswith("pythia-") else f"pythia-{name}"
    if key not in PYTHIA_SHAPES:
        raise ValueError(f"unknown Pythia size {name!r}: known {sorted(PYTHIA_SHAPES)}")
    return GPTNeoXConfig(**{**PYTHIA_COMMON, **PYTHIA_SHAPES[key]})


__all__ = ["PYTHIA_COMMON", "PYTHIA_SHAPES", "CheckpointError", "GPTNeoXConfig", "pythia_config"]
