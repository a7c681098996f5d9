"""A small sampler, so a user can read what a student model says.

    python -m engine.generate --model DIR --tokenizer tokenizer.json --prompt "The Pile is"

Greedy when --temperature 0, otherwise temperature (and optionally top-k) sampling. Decoding
uses the model's KV cache by default; --no-kv-cache recomputes the whole prefix each step,
which is slower but exercises nothing beyond the plain forward.
"""

from __future__ import annotations

import argparse
import math
import sys

import torch

from engine.data.tokenizer_file import read_tokenizer_file
from engine.model.hf_io import load_pretrained
from engine.model.network import GPTNeoX, model_device
from engine.precision import DTYPE_NAMES, dtype_of
from engine.token_ids import TokenIdError, check_ids


def sample_next(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Pick one token per row from logits [B, V]: argmax at temperature 0, else sample."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    scaled = logits.float() / temperature
    if top_k is not None and top_k < scaled.shape[-1]:
        kth_best = torch.topk(scaled, top_k, dim=-1).values[:, -1:]
        scaled = scaled.masked_fill(scaled < kth_best, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(
    model: GPTNeoX,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
    stop_token: int | None = None,
    valid_vocab: int | None = None,
) -> torch.Tensor:
    """Continue prompt_ids [B, T] (or [T]) by up to max_new_tokens; returns only the new tokens.

    Rows that emit stop_token keep emitting it, and decoding ends once every row has, so a
    batch's outputs stay rectangular. valid_vocab excludes the padded embedding rows (Pythia
    has 50304 rows for 50277 tokens) that the tokenizer could not decode.
    """
    if not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature: must be a finite number >= 0 (0 = greedy), got "
                         f"{temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids.unsqueeze(0) if squeeze else prompt_ids
    if ids.dim() != 2 or ids.shape[1] == 0:
        raise ValueError(
            f"prompt_ids must be a non-empty [B, T] or [T] tensor, got {tuple(ids.shape)}"
        )
    check_ids(ids, model.config.vocab_size, "prompt")
    batch, prompt_len = ids.shape
    total = prompt_len + max_new_tokens
    limit = model.config.max_positions
    if total > limit:
        raise ValueError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) = {total} exceeds "
            f"the model's max_positions={limit}"
        )
    device = model_device(model)
    ids = ids.to(device)
    new_tokens = torch.empty(batch, 0, dtype=torch.long, device=device)
    if max_new_tokens == 0:
        return new_tokens.squeeze(0) if squeeze else new_tokens

    cache = model.new_kv_cache(batch, total) if use_kv_cache else None
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    logits = model(ids, kv_cache=cache, start_pos=0)[:, -1]
    for step in range(max_new_tokens):
        if valid_vocab is not None:
            logits = logits[:, :valid_vocab]
        token = sample_next(logits, temperature, top_k, generator)
        if stop_token is not None:
            token = torch.where(finished, torch.full_like(token, stop_token), token)
            finished |= token == stop_token
        new_tokens = torch.cat((new_tokens, token[:, None]), dim=1)
        if step == max_new_tokens - 1 or (stop_token is not None and bool(finished.all())):
            break
        if cache is not None:
            position = prompt_len + step
            logits = model(token[:, None], kv_cache=cache, start_pos=position)[:, -1]
        else:
            logits = model(torch.cat((ids, new_tokens), dim=1))[:, -1]
    return new_tokens.squeeze(0) if squeeze else new_tokens


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="neox-distill generate", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--model", required=True, help="folder with config.json + safetensors")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json (GPT-NeoX-20B BPE)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-kv-cache", action="store_true")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop after <|endoftext|>")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda, cuda:1 ... (default: cuda when there is one)")
    parser.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    return parser.parse_args(argv)


def _device(name: str) -> torch.device:
    """--device as a torch.device that this build and machine can use."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device (cpu, cuda, cuda:1 ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this torch build or machine has no CUDA device "
                         "(use --device cpu)")
    return device


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        device = _device(args.device)
        tokenizer = read_tokenizer_file(args.tokenizer).tokenizer
        model = load_pretrained(args.model, dtype=dtype_of(args.dtype), device=device)
        prompt = tokenizer.encode(args.prompt).ids or [model.config.eos_token_id]
        generator = torch.Generator(device=device).manual_seed(args.seed)
        new = generate(
            model,
            torch.tensor(prompt, dtype=torch.long),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            generator=generator,
            use_kv_cache=not args.no_kv_cache,
            stop_token=model.config.eos_token_id if args.stop_at_eos else None,
            valid_vocab=min(tokenizer.get_vocab_size(), model.config.vocab_size),
        )
    except TokenIdError as error:
        print(f"error: {args.tokenizer}: {error} (use the tokenizer the model was trained "
              "with)", file=sys.stderr)
        return 2
    except ValueError as error:  # CheckpointError, TokenizerFileError, a bad argument
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(args.prompt + tokenizer.decode(new.tolist(), skip_special_tokens=False))
    return 0

if __name__ == "__main__":
    sys.exit(main())
