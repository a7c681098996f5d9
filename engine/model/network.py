"""GPT-NeoX (Pythia) in plain PyTorch: the network, readable top to bottom, and at the end the
three helpers every caller runs it with (model_device, unwrap_model, autocast_context).

The module tree mirrors transformers' GPTNeoXForCausalLM (`gpt_neox.embed_in`,
`gpt_neox.layers.{i}.attention.query_key_value`, ..., `embed_out`), so our state_dict names
*are* the checkpoint names and loading (engine/model/hf_io.py) needs no renaming table that
could drift.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from engine.model.config import GPTNeoXConfig


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


def _onednn_linear_available() -> bool:
    """Whether this torch build has oneDNN's prepacked CPU linear (mkldnn._linear_pointwise)."""
    try:
        return torch.backends.mkldnn.is_available() and (
            torch.ops.mkldnn._linear_pointwise is not None
            and torch.ops.mkldnn._reorder_linear_weight is not None
        )
    except (AttributeError, RuntimeError):
        return False


class PackedLinears:
    """Inference copies of a model's Linear weights in oneDNN's blocked layout (CPU, fp32).

    Decoding multiplies small batches of rows by fixed weights many times; oneDNN runs that
    product faster from a weight it has reordered once than MKL runs F.linear (the same fp32
    product, rounded differently in the last bits). The copies are taken once per sampling call
    (the weights may change between calls), cost one more copy of the weights in memory while
    they live, and carry no gradient. `usable(model)` says when they apply: plain fp32 CPU
    parameters (not FSDP's sharded DTensors), a torch built with oneDNN, no autocast (whose
    lower-precision product they would silently skip).
    """

    def __init__(self, model: nn.Module, head_rows: int, batch_hint: int):
        reorder = torch.ops.mkldnn._reorder_linear_weight
        self._packed = {
            module: reorder(module.weight.detach(), batch_hint)
            for module in model.gpt_neox.layers.modules()
            if isinstance(module, nn.Linear)
        }
        self._head = reorder(model.embed_out.weight.detach()[:head_rows], batch_hint)

    @staticmethod
    def usable(model: nn.Module) -> bool:
        params = list(model.parameters())
        return (
            _onednn_linear_available()
            and not torch.is_autocast_enabled("cpu")
            and all(type(p) is nn.Parameter and p.device.type == "cpu" for p in params)
            and all(p.dtype == torch.float32 for p in params)
        )

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """module(x) through the packed weight."""
        return torch.ops.mkldnn._linear_pointwise(
            x, self._packed[module], module.bias, "none", [], ""
        )

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits [N, head_rows] of hidden [N, H]: the first head_rows rows of the head."""
        return torch.ops.mkldnn._linear_pointwise(hidden, self._head, None, "none", [], "")


class KVCache:
    """Preallocated keys/values per layer for incremental decoding, written in place.

    Only the sampler uses it; training and evaluation run the plain full-sequence forward.
    `linears`, when set (the sampler sets it on the CPU), routes the blocks' linears through
    packed weights (PackedLinears).
    """

    def __init__(self, config: GPTNeoXConfig, batch_size: int, max_len: int, *, dtype, device):
        if max_len > config.max_positions:
            raise ValueError(
                f"KVCache max_len={max_len} exceeds max_positions={config.max_positions}"
            )
        shape = (batch_size, config.num_heads, max_len, config.head_dim)
        layers = range(config.num_layers)
        # Uninitialised: attention reads only the positions update() has written.
        self.keys = [torch.empty(shape, dtype=dtype, device=device) for _ in layers]
        self.values = [torch.empty(shape, dtype=dtype, device=device) for _ in layers]
        self.max_len = max_len
        self.linears: PackedLinears | None = None

    def linear(self, module: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """module(x), through the packed weights when there are some."""
        return module(x) if self.linears is None else self.linears.linear(module, x)

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

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False):
        """Attention output [B, T, H]; with a cache, keys and values of the T new positions are
        written into it first, and last_only returns the last position's output alone [B, 1, H]
        (a prefill needs the keys of every position but the output of the last)."""
        batch, seq, hidden = x.shape
        # The fused projection is interleaved per head: (heads, [q k v], head_dim).
        qkv = self.query_key_value(x) if kv_cache is None else kv_cache.linear(
            self.query_key_value, x)
        q, k, v = (t.transpose(1, 2) for t in qkv.view(
            batch, seq, self.num_heads, 3, self.head_dim).unbind(dim=3))  # [B, heads, T, hd]
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if kv_cache is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.dense(out.transpose(1, 2).reshape(batch, seq, hidden))
        k, v = kv_cache.update(self.layer_index, start_pos, k, v)
        if last_only and seq > 1:
            q, seq = q[:, :, -1:], 1
        if seq == 1:
            out = F.scaled_dot_product_attention(q, k, v)  # one new token sees everything
        elif start_pos == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            # New chunk after a prefix: is_causal would align the mask top-left, so say it.
            keys_at = torch.arange(k.shape[2], device=x.device)
            queries_at = torch.arange(start_pos, start_pos + seq, device=x.device)
            mask = keys_at[None, :] <= queries_at[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return kv_cache.linear(self.dense, out.transpose(1, 2).reshape(batch, seq, hidden))


class MLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x, kv_cache: KVCache | None = None):
        if kv_cache is not None:  # the decode path: the cache may hold packed weights
            inner = F.gelu(kv_cache.linear(self.dense_h_to_4h, x))
            return kv_cache.linear(self.dense_4h_to_h, inner)
        return self.dense_4h_to_h(F.gelu(self.dense_h_to_4h(x)))  # exact erf GELU, as HF


class Block(nn.Module):
    def __init__(self, config: GPTNeoXConfig, layer_index: int):
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = Attention(config, layer_index)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, kv_cache: KVCache | None = None, start_pos: int = 0,
                last_only: bool = False):
        """x + attention + MLP; last_only (with a cache): the last position's output alone."""
        attn = self.attention(self.input_layernorm(x), cos, sin, kv_cache, start_pos, last_only)
        if kv_cache is not None and last_only:
            x = x[:, -1:]
        if self.use_parallel_residual:
            return x + attn + self.mlp(self.post_attention_layernorm(x), kv_cache)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x), kv_cache)


class Backbone(nn.Module):
    """Embedding, blocks and final LayerNorm: HF's `gpt_neox` submodule."""

    def __init__(self, config: GPTNeoXConfig):
        super().__init__()
        # Handing nn.Embedding its (uninitialised) weight skips its own normal_() init:
        # GPTNeoX.reset_parameters initialises it anyway, and on the meta device (load_pretrained)
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
            return  # shapes only (load_pretrained fills every tensor); nothing to initialise
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
        self,
        input_ids: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Final-LayerNorm output [B, T, H]: what a fused head+loss consumes instead of logits.

        last_only (with a cache only): the last position's [B, 1, H]; every position's keys
        and values still enter the cache, but the last block's attention output, MLP and
        the final LayerNorm run for the last position alone (what a sampler's prefill needs).
        """
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
        if kv_cache is not None and kv_cache.linears is not None and seq == 1:
            return self._decode_packed(input_ids, kv_cache, start_pos)
        cos = self.rotary.cos[start_pos : start_pos + seq]
        sin = self.rotary.sin[start_pos : start_pos + seq]
        x = self.gpt_neox.embed_in(input_ids)
        recompute = (
            self.activation_checkpointing and kv_cache is None and torch.is_grad_enabled()
        )
        if last_only and kv_cache is None:
            raise ValueError("last_only needs a kv_cache (the full forward returns every position)")
        last = len(self.gpt_neox.layers) - 1
        for index, block in enumerate(self.gpt_neox.layers):
            if recompute:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin, kv_cache, start_pos, last_only and index == last)
        return self.gpt_neox.final_layer_norm(x)

    def _decode_packed(self, input_ids: torch.Tensor, kv_cache: KVCache, position: int):
        """hidden_states of one new position per row [B, 1, H] through the cache's packed
        weights: the blocks' cache path, op for op the same arithmetic, in fewer tensor
        operations (the rotation of q and k in one in-place pass, no per-head transposes), since
        a one-token decode step on the CPU is short enough for their overhead to show."""
        batch = input_ids.shape[0]
        heads, head_dim, rot = self.config.num_heads, self.config.head_dim, self.config.rotary_dims
        cos, sin = self.rotary.cos[position], self.rotary.sin[position]
        linear = kv_cache.linears.linear
        x = self.gpt_neox.embed_in(input_ids[:, 0])  # [B, H]
        for block in self.gpt_neox.layers:
            attention, mlp = block.attention, block.mlp
            qkv = linear(attention.query_key_value, block.input_layernorm(x))
            qkv = qkv.view(batch, heads, 3, head_dim)  # interleaved per head, as in Attention
            if rot:
                qk = qkv[:, :, :2, :rot]  # q and k's rotated dims, rotated in place
                first, second = qk.chunk(2, dim=-1)
                qk.copy_(qk * cos + torch.cat((-second, first), dim=-1) * sin)
            q, k, v = (t.unsqueeze(2) for t in qkv.unbind(dim=2))  # each [B, heads, 1, hd]
            keys, values = kv_cache.update(attention.layer_index, position, k, v)
            out = F.scaled_dot_product_attention(q, keys, values)  # sees every cached key
            attn = linear(attention.dense, out.reshape(batch, heads * head_dim))
            if block.use_parallel_residual:
                inner = block.post_attention_layernorm(x)
                x = x + attn
            else:
                x = x + attn
                inner = block.post_attention_layernorm(x)
            x = x + linear(mlp.dense_4h_to_h, F.gelu(linear(mlp.dense_h_to_4h, inner)))
        return self.gpt_neox.final_layer_norm(x)[:, None]

    def forward(
        self,
        input_ids: torch.Tensor,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
        return_hidden: bool = False,
        head_loss=None,
    ) -> torch.Tensor:
        """Logits [B, T, V]; with return_hidden the final hidden states [B, T, H] instead;
        with head_loss, what head_loss(hidden states, embed_out.weight) returns.

        return_hidden is how the training step reaches the fused head + loss through a DDP or
        torch.compile wrapper: the forward must run through the wrapper for DDP's gradient
        hooks to be armed, and the head (embed_out) then runs inside the loss. head_loss runs
        that loss inside this forward instead, for FSDP: its head weight is whole (gathered)
        only in here, and its gradient then takes FSDP's reduce-scatter like every other.
        """
        hidden = self.hidden_states(input_ids, kv_cache, start_pos)
        if head_loss is not None:
            return head_loss(hidden, self.embed_out.weight)
        return hidden if return_hidden else self.embed_out(hidden)

    def new_kv_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        weight = self.embed_out.weight
        return KVCache(
            self.config,
            batch_size,
            max_len or self.config.max_positions,
            dtype=weight.dtype,
            device=weight.device,
        )


def model_device(model: nn.Module) -> torch.device:
    """The device a module computes on (where its inputs must go): its parameters' device, or
    for FSDP's sharded parameters (DTensors) their mesh's, which differs when the shards are
    offloaded to the host."""
    param = next(model.parameters())
    mesh = getattr(param, "device_mesh", None)
    if mesh is not None and mesh.device_type == "cuda" and param.device.type != "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return param.device


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (`.module`) and torch.compile (`._orig_mod`) wrappers, which is
    where attributes such as embed_out live; the model itself when it is not wrapped."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def autocast_context(device_type: str, dtype: torch.dtype | None):
    """torch.autocast for `dtype` (a precision mode's autocast dtype, engine/precision.py),
    or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=dtype)


__all__ = ["GPTNeoX", "KVCache", "PackedLinears", "RotaryCache", "apply_rotary", "autocast_context",
           "model_device", "unwrap_model"]
