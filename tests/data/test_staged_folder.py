"""engine.data.atomic.staged_folder: a folder appears complete or not at all, and never
half-replaced."""

from __future__ import annotations

import os

import pytest

from engine.data.atomic import current_umask, staged_folder


def test_a_new_folder_appears_complete_with_ordinary_permissions(tmp_path):
    final = tmp_path / "sub" / "model"
    with staged_folder(final) as staged:
        assert staged.parent == final.parent and staged.name.startswith(".model.tmp-")
        assert not final.exists()  # nothing visible until the block ends
        (staged / "a.txt").write_text("one")
        (staged / "inner").mkdir()
        (staged / "inner" / "b.txt").write_text("two")
    assert (final / "a.txt").read_text() == "one" and (final / "inner" / "b.txt").exists()
    assert final.stat().st_mode & 0o777 == 0o777 & ~current_umask()
    assert sorted(p.name for p in final.parent.iterdir()) == ["model"]  # no leftovers


def test_an_existing_folder_is_replaced_whole(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with staged_folder(final) as staged:
        (staged / "new.txt").write_text("new")
    assert sorted(os.listdir(final)) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_a_failure_leaves_the_old_folder_and_no_debris(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(OSError, match="disk full"), staged_folder(final) as staged:
        (staged / "half.bin").write_bytes(b"\0" * 10)
        raise OSError("disk full (simulated)")
    assert sorted(os.listdir(final)) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
