"""Shards, run.tokenizer and the models must share a vocabulary: checked before the first step
(issue 10, item 7). Before, shards from a 300-token BPE trained into a model with another
run.tokenizer, exit 0, and the export shipped the wrong tokenizer.json."""

from __future__ import annotations

import json

import pytest

from engine.data.preprocess import preprocess
from engine.train.__main__ import main as train_main
from tests.data.common import docs_lines, random_texts, train_tokenizer, write_jsonl
from tests.engine.test_train import base_overrides, make_assets


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """Models (vocab 320), tokenizer A (300 tokens) and shards made with it, tokenizer B."""
    root = tmp_path_factory.mktemp("vocab")
    assets = make_assets(root / "assets")
    texts = random_texts(300, seed=11)
    for name in ("a", "b"):
        (root / name).mkdir()
    tok_a = train_tokenizer(root / "a" / "tokenizer.json", texts, vocab_size=300)
    tok_b = train_tokenizer(root / "b" / "tokenizer.json", random_texts(300, seed=12),
                            vocab_size=260)
    corpus = write_jsonl(root / "corpus.jsonl", docs_lines(texts))
    shards = root / "shards"
    preprocess([corpus], tok_a, shards, show_progress=False)
    assets["data"] = shards
    return {**assets, "tok_a": tok_a, "tok_b": tok_b, "root": root}


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_shards_from_another_tokenizer_are_refused(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_overrides(setup, out, run__tokenizer=setup["tok_b"])) == 2
    err = error_line(capsys)
    assert f"data.path: {setup['data']} was tokenised with another tokenizer" in err
    assert f"run.tokenizer={setup['tok_b']}" in err and "260 tokens" in err
    assert "300 tokens" in err
    assert not (out / "metrics.jsonl").exists()


def test_the_same_tokenizer_saved_differently_is_accepted(setup, tmp_path):
    pretty = tmp_path / "tokenizer.json"
    pretty.write_text(json.dumps(json.loads(setup["tok_a"].read_text()), indent=4))
    out = tmp_path / "run"
    assert train_main(base_overrides(setup, out, run__steps=1, run__tokenizer=pretty)) == 0
    assert (out / "final" / "tokenizer.json").read_bytes() == pretty.read_bytes()


def test_a_model_smaller_than_the_vocabulary_is_refused(setup, tmp_path, capsys):
    scratch = dict(teacher__path="", student__init="scratch", student__path="",
                   student__vocab_size=200, student__num_layers=1, student__hidden_size=16,
                   student__num_heads=2, student__intermediate_size=32,
                   student__max_positions=32, data__valid_vocab=0)
    out = tmp_path / "run"
    assert train_main(base_overrides(setup, out, run__tokenizer=setup["tok_a"], **scratch)) == 2
    assert "has 300 tokens, more than the models' 200 embedding rows" in error_line(capsys)
    assert train_main(base_overrides(setup, out, **scratch)) == 2  # no run.tokenizer: manifest
    assert "was tokenised with a 300-token tokenizer, more than the models' 200" in (
        error_line(capsys))
    assert not out.exists() or not (out / "metrics.jsonl").exists()


def test_ids_past_valid_vocab_are_refused(setup, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_main(base_overrides(setup, out, data__valid_vocab=50)) == 2
    assert "outside data.valid_vocab (50); the shards were made with another tokenizer" in (
        error_line(capsys))
