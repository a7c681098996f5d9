"""Batched sampling from our GPT-NeoX with its KV cache: what on-policy training draws from.

`sample(model, prompts [B, P], new_tokens, ...)` continues every row of a batch of equal-length
prompts by exactly `new_tokens` positions and returns a `Samples`: the tokens [B, new_tokens]
and a boolean mask of what each row really generated. A row that draws its stop token is
masked after it, not dropped: the stop token itself counts as generated, every later position
is masked (and holds the stop token, so the tensor stays a valid input), and the batch stays
rectangular for a teacher's prefill and a masked loss.

Temperature 0 is greedy (argmax); otherwise the logits are divided by the temperature and,
optionally, cut to the top_k largest and then to the smallest set whose probability reaches
top_p (nucleus), before one draw per row from an explicit torch.Generator. The same generator
state gives the same tokens on the CPU; `generator_state` / `restore_generator_state` save and
restore it as a plain uint8 tensor (no pickle), so a resumed run samples what the uninterrupted
one would have. Columns at or past `valid_vocab` (Pythia's padded embedding rows) never take
part: the head multiplies only the first `valid_vocab` rows of its weight.

Only the last position's logits are ever formed (the prefill runs the network over the prompt,
the last block's attention output and MLP and the head over its last position alone), keys and
values are written in place into the preallocated cache, and on the CPU, for plain fp32 weights
outside autocast, the blocks' linears and the head run from copies packed once per call for
oneDNN (engine.model.network.PackedLinears). Everything runs under torch.no_grad (not
inference_mode: the returned tokens must be usable as inputs of a later forward that is
differentiated). The model's train/eval mode is restored on return.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine.model.network import GPTNeoX, PackedLinears, model_device
from engine.token_ids import check_ids


@dataclass
class Samples:
    """What `sample` returns: tokens [B, N] (long), mask [B, N] (bool, True where the row
    really generated the token) and lengths [B] (long, mask.sum(1))."""

    tokens: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor


def new_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator on `device`, seeded: the sampler's only source of randomness."""
    return torch.Generator(device=device).manual_seed(int(seed))


def generator_state(generator: torch.Generator) -> torch.Tensor:
    """The generator's state as a plain uint8 CPU tensor (a copy), for a checkpoint."""
    return generator.get_state().clone()


def restore_generator_state(generator: torch.Generator, state: torch.Tensor) -> None:
    """Put back a state from `generator_state`, so the next draws repeat the saved run's."""
    expected = generator.get_state()
    if (not isinstance(state, torch.Tensor) or state.dtype != torch.uint8
            or state.shape != expected.shape):
        got = (f"{state.dtype} {tuple(state.shape)}" if isinstance(state, torch.Tensor)
               else type(state).__name__)
        raise ValueError(f"generator state: expected a uint8 tensor of shape "
                         f"{tuple(expected.shape)} (from generator_state), got {got}")
    generator.set_state(state.cpu())


def check_sampling(
    temperature: float, top_k: int | None, top_p: float | None, *, prefix: str = ""
) -> None:
    """ValueError naming the argument when temperature, top_k or top_p is out of range
    (`prefix` is prepended to the names, e.g. "onpolicy.")."""
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or (
            not math.isfinite(temperature) or temperature < 0):
        raise ValueError(f"{prefix}temperature: must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)
                              or top_k < 1):
        raise ValueError(f"{prefix}top_k: must be an integer >= 1 (or None: no cut), "
                         f"got {top_k}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                              or not 0 < top_p <= 1):
        raise ValueError(f"{prefix}top_p: must be in (0, 1] (1 or None: no cut), got {top_p}")


def next_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One token per row from logits [B, V]: argmax at temperature 0, else a draw from
    softmax(logits / temperature) cut to the top_k largest and then to the nucleus of
    probability top_p (the most likely token is always kept)."""
    if temperature == 0:
        # The first maximal column, as argmax gives, in one faster pass on the CPU.
        return logits.max(dim=-1).indices
    scaled = logits.float() / temperature
    cut_p = top_p is not None and top_p < 1
    if top_k is not None and top_k < scaled.shape[-1]:
        scaled, columns = torch.topk(scaled, top_k, dim=-1)  # sorted, largest first
    elif cut_p:
        scaled, columns = torch.sort(scaled, dim=-1, descending=True)
    else:
        columns = None
    if cut_p:
        probs = torch.softmax(scaled, dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        scaled = scaled.masked_fill(mass_before >= top_p, float("-inf"))
    choice = torch.multinomial(torch.softmax(scaled, dim=-1), 1, generator=generator)
    return (choice if columns is None else columns.gather(-1, choice)).squeeze(-1)


def _stop_ids(stop_token, batch: int, limit: int, device) -> torch.Tensor | None:
    """stop_token (None, one id, or one id per row) as a [B] long tensor, checked."""
    if stop_token is None:
        return None
    ids = torch.as_tensor(stop_token, device=device)
    if ids.dtype not in (torch.int64, torch.int32) or ids.dim() > 1 or (
            ids.dim() == 1 and ids.shape[0] != batch):
        raise ValueError(f"stop_token: must be one token id or a [{batch}] tensor of ids "
                         f"(one per row), got {stop_token!r}")
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= limit:
        raise ValueError(f"stop_token: id {high if high >= limit else low} is outside the "
                         f"{limit} tokens that can be sampled")
    return ids.long().expand(batch)


def _check_request(model: GPTNeoX, prompts: torch.Tensor, new_tokens: int,
                   valid_vocab: int | None) -> int:
    """ValueError naming the argument for a bad prompt, length or vocabulary; returns the
    number of columns that may be sampled."""
    if not isinstance(prompts, torch.Tensor) or prompts.dim() != 2 or prompts.numel() == 0 or (
            prompts.dtype not in (torch.int64, torch.int32)):
        shape = tuple(prompts.shape) if isinstance(prompts, torch.Tensor) else prompts
        raise ValueError(f"prompts: must be a non-empty int64/int32 tensor [B, P] of equal-length "
                         f"prompts, got {getattr(prompts, 'dtype', '')} {shape}")
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens: must be an integer >= 1, got {new_tokens}")
    vocab = model.config.vocab_size
    if valid_vocab is not None and (isinstance(valid_vocab, bool) or not isinstance(
            valid_vocab, int) or not 1 <= valid_vocab <= vocab):
        raise ValueError(f"valid_vocab: must be an integer in [1, {vocab}] (the model's "
                         f"vocabulary), got {valid_vocab}")
    check_ids(prompts, vocab, "prompts")
    prompt_len, limit = prompts.shape[1], model.config.max_positions
    if prompt_len + new_tokens > limit:
        raise ValueError(f"new_tokens: prompt ({prompt_len} tokens) + new_tokens ({new_tokens}) "
                         f"= {prompt_len + new_tokens} exceeds the model's position table "
                         f"(max_positions={limit})")
    return valid_vocab or vocab


@torch.no_grad()
def sample(
    model: GPTNeoX,
    prompts: torch.Tensor,
    new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    stop_token: int | torch.Tensor | None = None,
    valid_vocab: int | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
    stop_early: bool = True,
) -> Samples:
    """Continue each row of prompts [B, P] by new_tokens positions (see the module docstring).

    use_kv_cache=False recomputes the whole prefix at every step (slow; a cross-check).
    stop_early=False runs every decode step even once all rows have stopped: the same
    tokens, a fixed number of forwards (ranks of a sharded model must run the same ones)."""
    check_sampling(temperature, top_k, top_p)
    columns = _check_request(model, prompts, new_tokens, valid_vocab)
    device = model_device(model)
    batch, prompt_len = prompts.shape
    stops = _stop_ids(stop_token, batch, columns, device)
    head = model.embed_out.weight[:columns]  # the padded rows never become logits
    packed = None
    if use_kv_cache and PackedLinears.usable(model):
        packed = PackedLinears(model, columns, batch)

    def logits_after(ids: torch.Tensor, cache, start: int) -> torch.Tensor:
        if cache is None:
            hidden = model.hidden_states(ids)[:, -1]
        else:
            hidden = model.hidden_states(ids, cache, start, last_only=True)[:, -1]
        if packed is not None:
            return packed.head(hidden)
        # head @ hidden^T, read transposed: the same product as F.linear(hidden, head), but
        # with the 50k-row weight as the left operand MKL runs it faster on the CPU
        # (benchmarks/README.md, batched sampling).
        return (head @ hidden.t()).t()

    was_training = model.training
    model.eval()
    try:
        ids = prompts.to(device=device, dtype=torch.long)
        tokens = torch.empty(batch, new_tokens, dtype=torch.long, device=device)
        mask = torch.zeros(batch, new_tokens, dtype=torch.bool, device=device)
        running = torch.ones(batch, dtype=torch.bool, device=device)
        cache = model.new_kv_cache(batch, prompt_len + new_tokens) if use_kv_cache else None
        if cache is not None:
            cache.linears = packed
        logits = logits_after(ids, cache, 0)
        for step in range(new_tokens):
            token = next_tokens(logits, temperature, top_k, top_p, generator)
            if stops is not None:
                token = torch.where(running, token, stops)
            tokens[:, step] = token
            mask[:, step] = running
            if stops is not None:
                running &= token != stops
                if stop_early and step + 1 < new_tokens and not bool(running.any()):
                    tokens[:, step + 1:] = stops[:, None]
                    break
            if step + 1 < new_tokens:
                if cache is not None:
                    logits = logits_after(token[:, None], cache, prompt_len + step)
                else:
                    sequence = torch.cat((ids, tokens[:, : step + 1]), dim=1)
                    logits = logits_after(sequence, None, 0)
    finally:
        model.train(was_training)
    return Samples(tokens=tokens, mask=mask, lengths=mask.sum(dim=1))


__all__ = ["Samples", "check_sampling", "generator_state", "new_generator", "next_tokens",
           "restore_generator_state", "sample"]
