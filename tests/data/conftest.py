"""Fixtures shared by the data tests: a small BPE tokenizer and a set of varied texts."""

from __future__ import annotations

import pytest

from tests.data.common import random_texts, train_tokenizer


@pytest.fixture(scope="session")
def bpe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tok")
    return train_tokenizer(folder / "tokenizer.json", random_texts(400, seed=1))


@pytest.fixture(scope="session")
def texts():
    return random_texts(240, seed=2)
