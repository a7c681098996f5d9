"""A Hugging Face ``tokenizer.json``: loaded with clear errors, and fingerprinted.

Two identities are recorded for the tokenizer that made a shard folder: the sha256 of the
file's bytes, and a fingerprint, the sha256 of its canonical JSON (sorted keys, no
whitespace). Why both: the same tokenizer saved by another tool (pretty-printed or compact,
keys in another order) has other bytes but the same fingerprint, so the engine can tell "the
same tokenizer" from "the same file". The file is read once for both and for loading.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class TokenizerFileError(ValueError):
    """The file is missing or is not a tokenizer.json; the message names the file."""


@dataclass(frozen=True)
class TokenizerFile:
    path: Path
    tokenizer: Any  # tokenizers.Tokenizer
    sha256: str
    fingerprint: str

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


def canonical_fingerprint(obj: Any) -> str:
    """sha256 of `obj` as JSON with sorted keys and no whitespace (whitespace-independent)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise TokenizerFileError(f"{path}: no such tokenizer file") from None
    except IsADirectoryError:
        raise TokenizerFileError(f"{path}: is a folder, not a tokenizer.json file") from None
    except OSError as exc:
        raise TokenizerFileError(f"{path}: cannot read the tokenizer: {exc.strerror}") from None


def _parse_json(path: Path, raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError:
        raise TokenizerFileError(f"{path}: not a tokenizer.json (not UTF-8 text)") from None
    except json.JSONDecodeError as exc:
        raise TokenizerFileError(
            f"{path}: not a tokenizer.json (invalid JSON at line {exc.lineno} column "
            f"{exc.colno}: {exc.msg})"
        ) from None
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        found = f"keys {sorted(obj)[:8]}" if isinstance(obj, dict) else type(obj).__name__
        raise TokenizerFileError(
            f"{path}: not a tokenizer.json (a Hugging Face tokenizers file is a JSON object "
            f"with a \"model\" section; this one has {found})"
        )
    return obj


def read_tokenizer_file(path: str | Path) -> TokenizerFile:
    """Load `path` with the tokenizers library; every failure names the file."""
    from tokenizers import Tokenizer

    path = Path(path)
    raw = _read_bytes(path)
    obj = _parse_json(path, raw)
    try:
        tokenizer = Tokenizer.from_str(raw.decode("utf-8"))
    except Exception as exc:  # the Rust side raises a bare Exception with a serde message
        reason = str(exc).splitlines()[0] if str(exc) else "rejected by the tokenizers library"
        raise TokenizerFileError(f"{path}: not a valid tokenizer.json: {reason}") from None
    return TokenizerFile(path, tokenizer, hashlib.sha256(raw).hexdigest(),
                         canonical_fingerprint(obj))


def tokenizer_identity(path: str | Path) -> dict:
    """{sha256, fingerprint, vocab_size} of a tokenizer.json, to compare with a manifest's."""
    loaded = read_tokenizer_file(path)
    return {"sha256": loaded.sha256, "fingerprint": loaded.fingerprint,
            "vocab_size": loaded.vocab_size}
