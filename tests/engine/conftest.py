"""Fixtures of the training tests: tiny models and shards, and the uninterrupted reference run.

Module-scoped, so every test module gets its own copy to damage as it likes (test_train.py
keeps a session-scoped pair of its own).
"""

from __future__ import annotations

import pytest

from tests.engine.test_train import do_straight_run, make_assets


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.fixture(scope="module")
def straight_run(assets, tmp_path_factory):
    return do_straight_run(assets, tmp_path_factory.mktemp("straight"))
