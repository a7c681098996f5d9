"""The GPT-NeoX (Pythia) model: configuration, network, and Hugging Face folder I/O.

    config.py   GPTNeoXConfig, its config.json form, and the Pythia shape table
    network.py  the network (nn.Modules), readable top to bottom
    hf_io.py    load_pretrained / save_pretrained (safetensors + config.json)
"""

from engine.model.config import (
    PYTHIA_SHAPES,
    CheckpointError,
    GPTNeoXConfig,
    pythia_config,
)
from engine.model.hf_io import load_pretrained, save_pretrained
from engine.model.network import GPTNeoX, KVCache, apply_rotary, model_device

__all__ = [
    "PYTHIA_SHAPES",
    "CheckpointError",
    "GPTNeoX",
    "GPTNeoXConfig",
    "KVCache",
    "apply_rotary",
    "load_pretrained",
    "model_device",
    "pythia_config",
    "save_pretrained",
]
