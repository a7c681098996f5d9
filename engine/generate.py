"""A small sampler, so a user can read what a student model says.

    python -m engine.generate --model DIR --tokenizer tokenizer.json --prompt "The Pile is"

Greedy when --temperature 0, otherwise temperature sampling, optionally cut to the top-k
tokens and to the nucleus of probability top-p. The batched sampler behind it is
engine.sampling (what on-policy training draws from). Decoding uses the model's KV cache by
default; --no-kv-cache recomputes the whole prefix each step, which is slower but exercises
nothing beyond the plain forward.
"""

from __future__ import annotations

import argparse
import sys

import torch

from engine.data.tokenizer_file import read_tokenizer_file
from engine.model.hf_io import load_pretrained
from engine.model.network import GPTNeoX, model_device
from engine.precision import DTYPE_NAMES, dtype_of
from engine.sampling import check_sampling, new_generator, sample
from engine.token_ids import TokenIdError, check_ids


def generate(
    model: GPTNeoX,
    prompt_ids: torch.Tensor,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    generator: torch.Generator | None = None,
    use_kv_cache: bool = True,
    stop_token: int | None = None,
    valid_vocab: int | None = None,
) -> torch.Tensor:
    """Continue prompt_ids [B, T] (or [T]) by up to max_new_tokens with engine.sampling.sample;
    returns only the new tokens, up to the column where the last row stopped.

    A row that stopped before the others holds stop_token after its stop, so a batch's outputs
    stay rectangular. valid_vocab excludes the padded embedding rows (Pythia has 50304 rows for
    50277 tokens) that the tokenizer could not decode.
    """
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or (
            max_new_tokens < 0):
        raise ValueError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_k, top_p)
    squeeze = prompt_ids.dim() == 1
    ids = prompt_ids.unsqueeze(0) if squeeze else prompt_ids
    if ids.dim() == 2:
        check_ids(ids, model.config.vocab_size, "prompt")
    if max_new_tokens == 0:
        new = torch.empty(ids.shape[0], 0, dtype=torch.long, device=model_device(model))
    else:
        out = sample(model, ids, max_new_tokens, temperature=temperature, top_k=top_k,
                     top_p=top_p, stop_token=stop_token, valid_vocab=valid_vocab,
                     generator=generator, use_kv_cache=use_kv_cache)
        new = out.tokens[:, : int(out.lengths.max())]
    return new.squeeze(0) if squeeze else new


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
    parser.add_argument("--top-p", type=float, default=None, help="nucleus, in (0, 1]")
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
        generator = new_generator(args.seed, device)
        new = generate(
            model,
            torch.tensor(prompt, dtype=torch.long),
            args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
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
