"""GPT-NeoX (Pythia) in plain PyTorch, reading and writing Hugging Face safetensors folders.

The module tree mirrors transformers' GPTNeoXForCausalLM (`gpt_neox.embed_in`,
`gpt_neox.layers.{i}.attention.query_key_value`, ..., `embed_out`), so our state_dict names
*are* the checkpoint names and loading needs no renaming table that could drift.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data.atomic import (
    current_umask,
    fsync_dir,
    fsync_file,
    replace_folder,
    write_json_atomic,
)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"

# Buffers older GPT-NeoX checkpoints carry: a uint8 causal mask, a masking constant and a
# stored inv_freq. We rebuild all three from the config, so they are read past, not loaded.
_LEGACY_BUFFER = re.compile(
    r"^gpt_neox\.(layers\.\d+\.attention\.(bias|masked_bias|rotary_emb\.inv_freq)"
    r"|rotary_emb\.inv_freq)$"
)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_FLOAT_HEADER_DTYPES = ("F16", "BF16", "F32", "F64")


class CheckpointError(ValueError):
    """A model folder, config or weights file that cannot be used; the message names it."""


# --------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------


@dataclass
class GPTNeoXConfig:
    """Everything the forward pass needs; defaults are Pythia's shared values (REFERENCE.md)."""

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

        def need(key):
            if key not in d or d[key] is None:
                raise CheckpointError(f"{source}: missing required field {key!r}")
            return d[key]

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
            rotary_pct = rope.get("partial_rotary_factor", d.get("rotary_pct"))
            rotary_base = rope.get("rope_theta", d.get("rotary_emb_base"))
        else:
            rotary_pct = d.get("rotary_pct")
            rotary_base = d.get("rotary_emb_base")
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


# --------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------


class RotaryCache(nn.Module):
    """cos/sin tables for the rotated head dims, always fp32 whatever the model dtype.

    They are non-persistent buffers so checkpoints never carry them, and `_apply` rebuilds
    them after every `.to()`/`.half()`/`.to_empty()`: a bf16 cos table would lose the
    positional precision that long contexts depend on.
    """

    def __init__(self, rotary_dims: int, max_positions: int, base: float):
        super().__init__()
        self.rotary_dims = rotary_dims
        self.max_positions = max_positions
        self.base = base
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self.rebuild(self.cos.device)

    def rebuild(self, device) -> None:
        device = torch.device(device)
        if device.type == "meta":  # shapes only; arange on meta would import torch._dynamo
            shape = (self.max_positions, self.rotary_dims)
            self.cos = torch.empty(shape, device=device)
            self.sin = torch.empty(shape, device=device)
            return
        exponent = torch.arange(0, self.rotary_dims, 2, device=device, dtype=torch.float32)
        inv_freq = 1.0 / (self.base ** (exponent / self.rotary_dims))
        positions = torch.arange(self.max_positions, device=device, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)
        angles = torch.cat((freqs, freqs), dim=-1)  # NeoX half-split layout
        self.cos = angles.cos()
        self.sin = angles.sin()

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.rebuild(self.cos.device)
        return self


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] dims of x [B, heads, T, hd] in fp32; pass the rest."""
    rot = cos.shape[-1]
    x_rot = x[..., :rot].float()
    rotated = x_rot * cos + _rotate_half(x_rot) * sin
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)


class KVCache:
    """Preallocated keys/values per layer for incremental decoding.

    Only the sampler uses it; training and evaluation run the plain full-sequence forward.
    """

    def __init__(self, config: GPTNeoXConfig, batch_size: int, max_len: int, *, dtype, device):
        if max_len > config.max_positions:
            raise ValueError(
                f"KVCache max_len={max_len} exceeds max_positions={config.max_positions}"
            )
        shape = (batch_size, config.num_heads, max_len, config.head_dim)
        layers = range(config.num_layers)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in layers]
        self.max_len = max_len

    def update(self, layer: int, start_pos: int, k: torch.Tensor, v: torch.Tensor):
        end = start_pos + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KVCache overflow: positions up to {end} > max_len {self.max_len}")
        self.keys[layer][:, :, start_pos:end] = k
        self.values[layer][:, :, start_pos:end] = v
        return self.keys[layer][:, :, :end], self.values[layer][:, :, :end]


class Attention(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_index: int):
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.layer_index = layer_index
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0):
        batch, seq, hidden = x.shape
        # The fused projection is interleaved per head: (heads, [q k v], head_dim).
        qkv = self.query_key_value(x).view(batch, seq, self.num_heads, 3, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(dim=3))  # each [B, heads, T, hd]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if kv_cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            k, v = kv_cache.update(self.layer_index, start_pos, k, v)
            if start_pos == 0:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            elif seq == 1:
                out = F.scaled_dot_product_attention(q, k, v)  # one new token sees everything
            else:
                # New chunk after a prefix: is_causal would align the mask top-left, so say it.
                keys_at = torch.arange(k.shape[2], device=x.device)
                queries_at = torch.arange(start_pos, start_pos + seq, device=x.device)
                mask = keys_at[None, :] <= queries_at[:, None]
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.dense(out.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x):
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact erf GELU, as HF


class Block(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_index: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_index)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0):
        attn = self.attention(self.input_layernorm(x), cos, sin, kv_cache, start_pos)
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x))
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Embedding, blocks and final LayerNorm: HF's `gpt_neox` submodule."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        # Handing nn.Embedding its (uninitialised) weight skips its own normal_() init:
        # GPTNeoX.reset_parameters initialises it anyway, and on the meta device (from_pretrained)
        # that normal_() would pull in torch._dynamo, seconds of import on a first load.
        self.embed_in = nn.Embedding(
            config.vocab_size,
            config.hidden_size,
            _weight=torch.empty(config.vocab_size, config.hidden_size),
        )
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


class GPTNeoX(nn.Module):
    """Pythia-compatible causal LM. `model(input_ids) -> logits [B, T, V]`."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.config = config
        self.gpt_neox = Backbone(config)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryCache(config.rotary_dims, config.max_positions, config.rotary_base)
        self.activation_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Fresh weights to train from scratch: N(0, 0.02) matrices, LayerNorm 1/0, zero biases."""
        if self.embed_out.weight.is_meta:
            return  # shapes only (from_pretrained fills every tensor); nothing to initialise
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def set_activation_checkpointing(self, enabled: bool) -> None:
        """Recompute each block in backward instead of storing its activations (training only)."""
        self.activation_checkpointing = bool(enabled)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def hidden_states(
        self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        """Final-LayerNorm output [B, T, H]: what a fused head+loss consumes instead of logits."""
        if input_ids.dim() != 2 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(
                f"input_ids must be an int64/int32 tensor [B, T], got {input_ids.dtype} "
                f"{tuple(input_ids.shape)}"
            )
        seq = input_ids.shape[1]
        if start_pos < 0 or start_pos + seq > self.config.max_positions:
            raise ValueError(
                f"positions {start_pos}..{start_pos + seq - 1} exceed max_positions="
                f"{self.config.max_positions}"
            )
        cos = self.rotary.cos[start_pos : start_pos + seq]
        sin = self.rotary.sin[start_pos : start_pos + seq]
        x = self.gpt_neox.embed_in(input_ids)
        recompute = (
            self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        )
        for block in self.gpt_neox.layers:
            if recompute:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache, start_pos)
        return self.gpt_neox.final_layer_norm(x)

    def forward(
        self, input_ids: torch.Tensor, kv_cache: KVCache | None = None, start_pos: int = 0
    ) -> torch.Tensor:
        return self.embed_out(self.hidden_states(input_ids, kv_cache, start_pos))

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.embed_out.weight
        return KVCache(
            self.config,
            batch_size,
            max_len or self.config.max_positions,
            dtype=weight.dtype,
            device=weight.device,
        )

    # ----------------------------------------------------------------------------------
    # Hugging Face folders
    # ----------------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls, path: str | os.PathLike, dtype: torch.dtype = torch.float32, device="cpu"
    ) -> GPTNeoX:
        """Load a HF GPT-NeoX folder (config.json + single or sharded safetensors).

        Every header is checked (names, shapes, dtypes) before any tensor data is read, so a
        bad checkpoint fails fast and names the tensor. The module is built on the meta device
        and each tensor is then read, cast and moved on its own straight into its parameter:
        at no point do two full copies of the weights exist. A few threads overlap the casts
        (torch releases the GIL), as transformers does. Returned in eval mode.
        """
        from concurrent.futures import ThreadPoolExecutor

        path = Path(path)
        if dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        if not path.is_dir():
            raise CheckpointError(f"{path}: model folder not found")
        config = GPTNeoXConfig.from_json_file(path / CONFIG_NAME)
        files = _weight_files(path)

        with torch.device("meta"):
            model = cls(config)
        expected = {name: tuple(p.shape) for name, p in model.named_parameters()}
        with contextlib.ExitStack() as stack:
            where: dict[str, tuple[Path, object]] = {}
            for file in files:
                handle = stack.enter_context(_open_safetensors(file))
                for name in _checked_names(file, handle, expected):
                    if name in where:
                        raise CheckpointError(
                            f"{file}: tensor {name!r} also appears in {where[name][0]}"
                        )
                    where[name] = (file, handle)
            missing = [name for name in expected if name not in where]
            if missing:
                shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
                raise CheckpointError(
                    f"{path}: missing tensor(s) {shown} ({len(missing)} in all)"
                )

            def materialize(name: str) -> torch.Tensor:
                file, handle = where[name]
                try:
                    tensor = handle.get_tensor(name)
                except Exception as error:  # safetensors raises its own error types
                    message = f"{file}: cannot read tensor {name!r} ({error})"
                    raise CheckpointError(message) from error
                if tensor.dtype not in _FLOAT_DTYPES:
                    raise CheckpointError(
                        f"{file}: tensor {name!r} has dtype {tensor.dtype}, expected a float dtype"
                    )
                # copy=True: never alias the file's memory map, even when no cast is needed.
                return tensor.to(device=device, dtype=dtype, copy=True)

            workers = max(1, min(4, os.cpu_count() or 1))
            with ThreadPoolExecutor(max_workers=workers) as pool:
                for name, value in zip(expected, pool.map(materialize, expected), strict=True):
                    module_path, _, attr = name.rpartition(".")
                    module = model.get_submodule(module_path)
                    setattr(module, attr, nn.Parameter(value, requires_grad=True))
        model.rotary.rebuild(torch.device(device))
        return model.eval()

    def save_pretrained(self, path: str | os.PathLike, dtype: torch.dtype | None = None) -> Path:
        """Write config.json + model.safetensors (HF names) atomically; replaces an old folder.

        The folder is assembled under a temporary name beside the target, fsynced, and only
        then renamed into place, so a crash leaves either the old checkpoint or the new one.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists() and not _is_replaceable_model_folder(path):
            raise CheckpointError(
                f"{path}: exists and is not a model folder (no config.json); refusing to replace it"
            )
        if dtype is not None and dtype not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be a floating dtype, got {dtype}")
        parent = path.parent
        parent.mkdir(parents=True, exist_ok=True)
        save_dtype = dtype or self.embed_out.weight.dtype
        tensors = {
            name: p.detach().to(device="cpu", dtype=save_dtype).contiguous()
            for name, p in self.named_parameters()
        }
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=parent))
        try:
            os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes it 0700; a folder is public
            write_json_atomic(tmp / CONFIG_NAME, self.config.to_hf_dict(save_dtype))
            weights_path = tmp / WEIGHTS_NAME
            save_file(tensors, str(weights_path), metadata={"format": "pt"})
            fsync_file(weights_path)
            fsync_dir(tmp)
            replace_folder(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return path


# --------------------------------------------------------------------------------------
# Safetensors helpers
# --------------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards an index names, or model.safetensors."""
    index_path = folder / WEIGHTS_INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
            weight_map = index["weight_map"]
            shard_names = list(dict.fromkeys(weight_map.values()))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index_path}: not a valid safetensors index ({e!r})") from e
        files = []
        for name in shard_names:
            shard = folder / name
            if not shard.is_file():
                raise CheckpointError(f"{index_path}: references missing shard file {shard}")
            files.append(shard)
        return files
    single = folder / WEIGHTS_NAME
    if single.is_file():
        return [single]
    raise CheckpointError(
        f"{folder}: no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME} (only safetensors are supported)"
    )


def _open_safetensors(file: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as error:  # SafetensorError, OSError, ...: all mean "cannot use this file"
        raise CheckpointError(f"{file}: not a readable safetensors file ({error})") from error


def _checked_names(file: Path, handle, expected: dict[str, tuple]) -> list[str]:
    """The model tensors a file holds, with names, shapes and dtypes checked from its header
    alone; legacy buffers are skipped."""
    names = []
    for name in handle.keys():  # noqa: SIM118 (safe_open is not a Mapping)
        if _LEGACY_BUFFER.match(name):
            continue
        if name not in expected:
            raise CheckpointError(f"{file}: unexpected tensor {name!r}")
        info = handle.get_slice(name)
        found = tuple(info.get_shape())
        if found != expected[name]:
            raise CheckpointError(
                f"{file}: shape mismatch for {name!r}: expected {list(expected[name])}, "
                f"found {list(found)}"
            )
        # get_dtype is missing from some older safetensors; materialize() checks again.
        stored = info.get_dtype() if hasattr(info, "get_dtype") else "F32"
        if stored not in _FLOAT_HEADER_DTYPES:
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {stored}, expected a float dtype"
            )
        names.append(name)
    return names


def _is_replaceable_model_folder(path: Path) -> bool:
    return path.is_dir() and (not any(path.iterdir()) or (path / CONFIG_NAME).is_file())


__all__ = ["CheckpointError", "GPTNeoX", "GPTNeoXConfig", "KVCache", "apply_rotary"]
