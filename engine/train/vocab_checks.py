"""Tokenizer, data and models must agree on the vocabulary: checked at start-up.

Shards made with one tokenizer and trained into a model with another train without a
complaint and produce garbage (and an export that ships the wrong tokenizer.json). So before
the first step: the shards' tokenizer (their manifest) against run.tokenizer, both against
the models' embedding rows, and the data's largest token id and the pad id against those
rows. A folder without a manifest (EleutherAI's pre-tokenized Pile) records none of this;
its ids are then checked batch by batch (engine/token_ids.py).
"""

from __future__ import annotations

from typing import Any

from engine.data.tokenizer_file import TokenizerFileError, tokenizer_identity
from engine.train.config import Config, ConfigError


def read_run_tokenizer(path: str) -> dict[str, Any]:
    """{sha256, fingerprint, vocab_size} of run.tokenizer; a ConfigError naming the file."""
    try:
        return tokenizer_identity(path)
    except TokenizerFileError as exc:
        raise ConfigError(f"run.tokenizer: {exc}") from None


def _same_tokenizer(shards: dict[str, Any], run: dict[str, Any]) -> bool:
    """By fingerprint (formatting-independent) when the manifest has one, else by sha256."""
    if shards.get("fingerprint"):
        return shards["fingerprint"] == run["fingerprint"]
    return shards.get("sha256") == run["sha256"]


def _short(identity: dict[str, Any]) -> str:
    digest = identity.get("fingerprint") or identity.get("sha256") or "?"
    return f"{digest[:12]}..., {identity.get('vocab_size')} tokens"


def check_tokenizers(config: Config, shard_info: dict[str, Any] | None, rows: int) -> None:
    """run.tokenizer against the shards' tokenizer and the embedding rows."""
    run_tok = read_run_tokenizer(config.run.tokenizer) if config.run.tokenizer else None
    if run_tok is not None and run_tok["vocab_size"] > rows:
        raise ConfigError(
            f"run.tokenizer: {config.run.tokenizer} has {run_tok['vocab_size']} tokens, more "
            f"than the models' {rows} embedding rows (use the models' own tokenizer)"
        )
    if shard_info is None:
        return
    if run_tok is not None and not _same_tokenizer(shard_info, run_tok):
        raise ConfigError(
            f"data.path: {config.data.path} was tokenised with another tokenizer "
            f"({_short(shard_info)}) than run.tokenizer={config.run.tokenizer} "
            f"({_short(run_tok)}); preprocess the data with run.tokenizer, or set run.tokenizer "
            "to the one the shards were made with"
        )
    vocab = shard_info.get("vocab_size")
    if vocab is not None and vocab > rows:
        raise ConfigError(
            f"data.path: {config.data.path} was tokenised with a {vocab}-token tokenizer, "
            f"more than the models' {rows} embedding rows (use models made for it)"
        )


def check_ids_fit(config: Config, max_token_id: int | None, rows: int) -> None:
    """The data's largest id and the pad id against the embedding (and data.valid_vocab)."""
    if config.data.mode == "padded" and not 0 <= config.data.pad_id < rows:
        raise ConfigError(
            f"data.pad_id={config.data.pad_id} is outside the models' {rows} embedding rows "
            f"(use an id in [0, {rows}))"
        )
    if max_token_id is None:
        return
    limits = [(rows, "the models' embedding rows")]
    if config.data.valid_vocab:
        limits.append((config.data.valid_vocab, "data.valid_vocab"))
    for limit, what in limits:
        if max_token_id >= limit:
            raise ConfigError(
                f"data.path: {config.data.path} holds token id {max_token_id}, outside "
                f"{what} ({limit}); the shards were made with another tokenizer"
            )


def check_data_fits(config: Config, shards, rows: int) -> None:
    """Every start-up vocabulary check for `shards` (an engine.data.shards.ShardSet)."""
    check_tokenizers(config, shards.tokenizer_info(), rows)
    check_ids_fit(config, shards.max_token_id(), rows)
