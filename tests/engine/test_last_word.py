"""The quickstart's LAMBADA-style task: held-out files only, passages that end with a word the
earlier lines use, that fit the model, in the format engine.eval's lambada task reads."""

from __future__ import annotations

import json

import pytest

from engine.eval.tasks import lambada_pair
from engine.quickstart import last_word
from engine.quickstart.corpus import stdlib_sources
from engine.quickstart.last_word import (
    TARGET,
    build_last_word_task,
    file_passages,
    heldout_files,
    passage,
    spread,
)


def words_of(texts: list[str]) -> list[list[str]]:
    """A stand-in tokenizer: one token per whitespace-separated word."""
    return [text.split() for text in texts]


SOURCE = """import os

def find(path, pattern):
    result = []
    for name in os.listdir(path):
        if pattern in name:
            result.append(name)
    return result
"""


def match_of(text: str, word: str, occurrence: int = -1):
    return [m for m in TARGET.finditer(text) if m.group() == word][occurrence]


def test_passage_ends_with_a_word_its_earlier_lines_use():
    piece = passage(SOURCE, match_of(SOURCE, "result"), words_of, max_tokens=100)
    assert piece == SOURCE[:SOURCE.rindex("result") + len("result")]
    context, target = lambada_pair(piece)
    assert target == " result" and context + target == piece
    # The budget drops whole lines from the top, but keeps a line that names the word.
    short = passage(SOURCE, match_of(SOURCE, "result"), words_of, max_tokens=8)
    assert short.startswith("        if pattern") and len(short.split()) == 7
    shortest = passage(SOURCE, match_of(SOURCE, "result"), words_of, max_tokens=3)
    assert shortest == "            result.append(name)\n    return result"
    assert passage(SOURCE, match_of(SOURCE, "result"), words_of, max_tokens=2) is None


def test_passage_needs_the_word_above_and_not_before_it_on_its_line():
    text = "alpha = 1\nbeta = alpha + gamma\nprint(delta, delta)\n"
    assert passage(text, match_of(text, "alpha"), words_of, 100) is not None  # 'beta = alpha'
    assert passage(text, match_of(text, "gamma"), words_of, 100) is None  # never above
    assert passage(text, match_of(text, "delta"), words_of, 100) is None  # earlier on its line


def test_file_passages_spread_over_the_file_and_skip_long_words(monkeypatch):
    text = "".join(f"value_{i} = {i}\nprint( value_{i})\n" for i in range(30))
    found = file_passages(text, 3, words_of, max_tokens=50)
    assert len(found) == 3
    numbers = [int(word.split("_")[1]) for _, word in found]
    assert numbers == sorted(numbers) and numbers[0] > 0 and numbers[-1] < 29
    assert all(piece.endswith(" " + word) for piece, word in found)
    monkeypatch.setattr(last_word, "MAX_WORD_TOKENS", 0)  # every word is too long now
    assert file_passages(text, 3, words_of, max_tokens=50) == []


def test_spread_covers_the_list_first():
    files = list(range(10))
    assert spread(files, 3) == [0, 3, 6, 9, 1, 4, 7, 2, 5, 8]
    assert spread(files, 50) == files


def write_library(root, count: int) -> None:
    for i in range(count):
        body = "".join(f"    total_{i} = total_{i} + {j}\n    print( total_{i})\n"
                       for j in range(8))
        (root / f"mod{i:02d}.py").write_text(f"def run_{i}():\n{body}")


def test_task_file_holds_only_files_the_corpus_left_out(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    write_library(root, 12)
    size = (root / "mod00.py").stat().st_size
    corpus = {p.name for p in stdlib_sources(root, max_bytes=5 * size)}
    held_out = {p.name for p in heldout_files(5 * size, root)}
    assert len(corpus) == 5 and held_out == {f"mod{i:02d}.py" for i in range(12)} - corpus
    out = tmp_path / "tasks" / "last_word.jsonl"
    summary = build_last_word_task(out, corpus_max_bytes=5 * size, items=9,
                                   encode_batch=words_of, max_tokens=40, root=root)
    items = [json.loads(line) for line in out.read_text().splitlines()]
    assert summary == {"path": str(out), "items": 9, "files": 5}  # 2 per file
    for item in items:
        assert item["meta"]["path"] in held_out
        assert lambada_pair(item["text"])[1] == " " + item["meta"]["word"]
        assert len(item["text"].split()) <= 40
    again = tmp_path / "again.jsonl"
    build_last_word_task(again, corpus_max_bytes=5 * size, items=9, encode_batch=words_of,
                         max_tokens=40, root=root)
    assert again.read_text() == out.read_text()  # deterministic
    with pytest.raises(ValueError, match="no last-word passages"):
        build_last_word_task(tmp_path / "x.jsonl", corpus_max_bytes=10**9, items=9,
                             encode_batch=words_of, max_tokens=40, root=root)
    assert not (tmp_path / "x.jsonl").exists()
