"""engine.data.owned_folder: a tool empties its own output folder and nothing else."""

from __future__ import annotations

import pytest

from engine.data.owned_folder import ForeignFolderError, clear_owned_folder

OWN = dict(markers=("tool.json",), names=("runs", "table.md"))


def _tool_output(folder):
    (folder / "runs" / "a").mkdir(parents=True)
    (folder / "runs" / "a" / "metrics.jsonl").write_text("{}\n")
    (folder / "table.md").write_text("| x |\n")
    (folder / "tool.json").write_text("{}")


def test_the_tools_own_output_is_deleted_marker_and_atomic_temporaries_included(tmp_path):
    _tool_output(tmp_path)
    (tmp_path / ".table.md.abc123.tmp").write_text("half")  # an atomic write killed half-way
    clear_owned_folder(tmp_path, **OWN)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("stranger", ["notes.txt", ".table.md.bak", "run"])
def test_a_folder_holding_anything_else_is_refused_untouched(tmp_path, stranger):
    _tool_output(tmp_path)
    (tmp_path / stranger).write_text("keep me")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    with pytest.raises(ForeignFolderError, match=stranger.replace(".", r"\.")):
        clear_owned_folder(tmp_path, **OWN)
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before


def test_without_the_marker_nothing_is_deleted(tmp_path):
    (tmp_path / "runs").mkdir()
    (tmp_path / "table.md").write_text("a user's table")
    with pytest.raises(ForeignFolderError, match="not written by this tool"):
        clear_owned_folder(tmp_path, **OWN)
    assert (tmp_path / "table.md").read_text() == "a user's table"


def test_absent_empty_and_file_paths(tmp_path):
    clear_owned_folder(tmp_path / "absent", **OWN)
    assert not (tmp_path / "absent").exists()
    clear_owned_folder(tmp_path, **OWN)  # empty: nothing to do
    (tmp_path / "file").write_text("x")
    with pytest.raises(ForeignFolderError, match="not a folder"):
        clear_owned_folder(tmp_path / "file", **OWN)
    assert (tmp_path / "file").read_text() == "x"
