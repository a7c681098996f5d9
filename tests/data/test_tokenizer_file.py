"""tokenizer.json loading: every failure names the file; the fingerprint ignores whitespace."""

from __future__ import annotations

import hashlib
import json

import pytest

from engine.data.tokenizer_file import TokenizerFileError, read_tokenizer_file, tokenizer_identity


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "no such tokenizer file"),
        ("folder", "is a folder, not a tokenizer.json file"),
        (b"\xff\xfe not text", r"not a tokenizer\.json \(not UTF-8 text\)"),
        ('{"text": "a"}\n{"text": "b"}\n', r"invalid JSON at line 2 column 1: Extra data"),
        ('{"version": "1.0", "vocab": {}}', r"with a \"model\" section; this one has keys "
                                            r"\['version', 'vocab'\]"),
        ("[1, 2]", "this one has list"),
        ('{"model": {"type": "BPE", "vocab": 5, "merges": []}}', "not a valid tokenizer.json: "),
    ],
    ids=["missing", "folder", "binary", "jsonl", "no-model", "list", "bad-model"],
)
def test_a_file_that_is_not_a_tokenizer_gets_one_line_naming_it(tmp_path, content, message):
    path = tmp_path / "tokenizer.json"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(TokenizerFileError, match=message) as info:
        read_tokenizer_file(path)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_identity_of_a_tokenizer_and_of_the_same_one_reformatted(tmp_path, bpe):
    loaded = read_tokenizer_file(bpe)
    assert loaded.tokenizer.token_to_id("<|endoftext|>") == 0
    assert loaded.sha256 == hashlib.sha256(bpe.read_bytes()).hexdigest()
    identity = tokenizer_identity(bpe)
    assert identity == {"sha256": loaded.sha256, "fingerprint": loaded.fingerprint,
                        "vocab_size": loaded.tokenizer.get_vocab_size(with_added_tokens=True)}
    obj = json.loads(bpe.read_text())
    compact = tmp_path / "compact.json"
    compact.write_text(json.dumps(obj, separators=(",", ":")))
    assert tokenizer_identity(compact)["fingerprint"] == identity["fingerprint"]
    obj["added_tokens"][0]["content"] = "<|end|>"  # another tokenizer: another fingerprint
    changed = tmp_path / "changed.json"
    changed.write_text(json.dumps(obj))
    assert tokenizer_identity(changed)["fingerprint"] != identity["fingerprint"]
