"""Failpoints (issue 23 item 6): each is inert unless its variable is set, fires when it is,
is documented, is called by name where the registry says, and no other engine code reads an
environment variable to inject a fault."""

from __future__ import annotations

import ast
import re
import signal
import time
from pathlib import Path

import pytest

import engine.data.failpoints as fp

ENGINE = Path(__file__).resolve().parents[2] / "engine"

# A value that arms each failpoint so that the call in fire() below fires it.
ARMED = {"checkpoint.save": "3:0.1", "train.finish": "0.1", "preprocess.worker": "die here",
         "teacher_cache.batches": "2"}

# Environment variables the engine may read: configuration of torchrun, torch and Triton,
# never a fault. Any other read must be a registered failpoint, read by failpoints.py only.
CONFIGURATION = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                 "NEOX_DIST_TIMEOUT_S", "TORCH_NCCL_ASYNC_ERROR_HANDLING",
                 "PYTORCH_CUDA_ALLOC_CONF", "TRITON_INTERPRET"}


@pytest.fixture
def effects(monkeypatch):
    """Record the kills and sleeps failpoints do instead of doing them; each sleep records
    whether a PAUSED file exists at that moment."""
    done, real_sleep = [], time.sleep
    monkeypatch.setattr(fp.os, "kill", lambda pid, sig: done.append(("kill", pid, sig)))

    def sleep(seconds):
        done.append(("sleep", any(Path(".").glob("PAUSED"))))
        real_sleep(0.01)

    monkeypatch.setattr(fp.time, "sleep", sleep)
    return done


def fire(name: str) -> None:
    """Call failpoint `name` with arguments that fire it when it is armed with ARMED[name]."""
    action = fp.FAILPOINTS[name].action
    if action == "pause":
        fp.pause(name, step=3, folder=Path("."))
    elif action == "kill_on":
        fp.kill_on(name, ["a document", ARMED[name]])
    else:
        fp.kill_after(name, 5)


def test_every_registered_failpoint_has_a_test_value():
    assert set(ARMED) == set(fp.FAILPOINTS)


@pytest.mark.parametrize("name", sorted(fp.FAILPOINTS))
def test_a_failpoint_is_inert_unless_its_variable_is_set(name, effects, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(fp.FAILPOINTS[name].variable, raising=False)
    fire(name)
    assert effects == [] and not list(tmp_path.iterdir())
    monkeypatch.setenv(fp.FAILPOINTS[name].variable, "")
    fire(name)
    assert effects == [] and not list(tmp_path.iterdir())
    monkeypatch.setenv(*fp.arm(name, ARMED[name]).popitem())
    fire(name)
    if fp.FAILPOINTS[name].action == "pause":
        assert effects and all(kind == "sleep" for kind, _ in effects)
        assert effects[0][1] is True  # the PAUSED file shows while it sleeps ...
        assert not list(tmp_path.iterdir())  # ... and is gone after
    else:
        assert effects == [("kill", fp.os.getpid(), signal.SIGKILL)]


def test_a_pause_fires_only_at_its_step_and_ends_when_told(effects, monkeypatch, tmp_path):
    monkeypatch.setenv(*fp.arm("checkpoint.save", "4:60").popitem())
    fp.pause("checkpoint.save", step=3, folder=tmp_path)
    assert effects == [] and not list(tmp_path.iterdir())
    monkeypatch.setenv(*fp.arm("train.finish", "60").popitem())
    started = time.monotonic()
    fp.pause("train.finish", until=lambda: len(effects) >= 2)
    assert len(effects) == 2 and time.monotonic() - started < 30


def test_a_pause_removes_only_the_paused_file_it_created(monkeypatch, tmp_path):
    """A PAUSED file already in the folder (not this pause's) is left as it was."""
    monkeypatch.setenv(*fp.arm("checkpoint.save", "3:0").popitem())
    fp.pause("checkpoint.save", step=3, folder=tmp_path)
    assert not (tmp_path / "PAUSED").exists()  # its own, removed when it ended
    (tmp_path / "PAUSED").write_text("someone else's")
    fp.pause("checkpoint.save", step=3, folder=tmp_path)
    assert (tmp_path / "PAUSED").read_text() == "someone else's"


def test_a_kill_waits_for_its_count_or_text(effects, monkeypatch):
    monkeypatch.setenv(*fp.arm("teacher_cache.batches", 3).popitem())
    fp.kill_after("teacher_cache.batches", 2)
    monkeypatch.setenv(*fp.arm("preprocess.worker", "die").popitem())
    fp.kill_on("preprocess.worker", ["die here", "not die"])
    assert effects == []


def test_a_failpoint_fired_by_the_wrong_function_is_refused():
    with pytest.raises(ValueError, match=r"checkpoint\.save is fired by pause"):
        fp.kill_after("checkpoint.save", 1)


@pytest.mark.parametrize("name", sorted(fp.FAILPOINTS))
def test_a_failpoint_is_documented_and_called_by_name_where_it_fires(name):
    point = fp.FAILPOINTS[name]
    assert f"``{name}``: {point.variable}" in fp.__doc__
    call = re.compile(rf"failpoints\.{point.action}\(\s*\"{re.escape(name)}\"")
    for file in point.files:
        assert call.search((ENGINE.parent / file).read_text()), f"{file} does not fire {name}"


def environment_reads(tree: ast.AST) -> list[str]:
    """The variables a module reads from the environment (the source of each key), and
    'other' for a use of os.environ this scan does not understand."""
    reads, known = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "os.environ.get", "os.getenv", "os.environ.setdefault", "os.environ.pop"):
            reads.append(ast.unparse(node.args[0]))
            known.add(id(node.func.value if ast.unparse(node.func) != "os.getenv"
                         else node.func))
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            known.add(id(node.value))
            if isinstance(node.ctx, ast.Load):
                reads.append(ast.unparse(node.slice))
    for node in ast.walk(tree):
        named = (isinstance(node, ast.Attribute) and node.attr in ("environ", "getenv")) or (
            isinstance(node, ast.Name) and node.id in ("environ", "getenv"))
        if named and id(node) not in known:
            reads.append("other")
    return reads


def test_the_engine_reads_no_fault_variable_outside_the_failpoints_module():
    registered = {point.variable for point in fp.FAILPOINTS.values()}
    unexpected = []
    for path in sorted(ENGINE.rglob("*.py")):
        if path.name == "failpoints.py" and path.parent.name == "data":
            continue
        text = path.read_text()
        where = path.relative_to(ENGINE.parent)
        unexpected += [f"{where}: names {var}" for var in registered if var in text]
        for key in environment_reads(ast.parse(text)):
            literal = key.strip("'\"") if key[0] in "'\"" else None
            if literal in CONFIGURATION or (key == "name" and where == Path("engine/dist.py")):
                continue
            unexpected.append(f"{where}: reads the environment variable {key}")
    assert unexpected == []


def test_the_scan_sees_reads_in_every_form():
    code = ('import os\nfrom os import environ\na = os.environ.get("A")\nb = os.environ["B"]\n'
            'c = os.getenv("C")\nos.environ["D"] = "1"\nd = dict(os.environ)\ne = environ')
    assert sorted(environment_reads(ast.parse(code))) == ["'A'", "'B'", "'C'", "other", "other"]
