"""Packaging: one import root that shadows no other distribution, and the installed command.

transformers 5 requires Hugging Face's `kernels` distribution (top-level module `kernels`); our
package of that name once shadowed it from the checkout. These tests keep that class of bug out:
our top-level names belong to us alone, both packages import in one process, and a wheel works
from an empty folder with nothing of the checkout on sys.path.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import textwrap
import venv
from pathlib import Path

import pytest

from engine.cli import COMMANDS
from tests.engine.test_train import base_overrides, make_assets

REPO_ROOT = Path(__file__).resolve().parents[1]
# Every importable top-level name of the checkout (the distribution ships only `engine`).
OUR_TOP_LEVEL = ("engine", "tests", "tools", "benchmarks")


def test_transformers_hub_kernels_and_ours_import_in_one_process():
    """With the checkout first on sys.path, as `python -m` and pytest put it."""
    script = textwrap.dedent("""
        import sys
        sys.path.insert(0, sys.argv[1])
        try:
            import transformers.integrations.hub_kernels  # imports HF's `kernels` if installed
        except ModuleNotFoundError as exc:
            if exc.name != "transformers.integrations.hub_kernels":
                raise
            print("no hub_kernels")
        from engine.kernels import kd_head_loss, kd_loss
        from engine.model.network import GPTNeoX
        from engine.train.loop import Trainer
        import engine.kernels
        assert engine.kernels.__file__.startswith(sys.argv[1]), engine.kernels.__file__
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script, str(REPO_ROOT)], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    if "no hub_kernels" in done.stdout:
        pytest.skip("this transformers has no integrations.hub_kernels")
    assert done.stdout.strip() == "ok"


def test_no_top_level_name_of_ours_belongs_to_another_distribution():
    owners = importlib.metadata.packages_distributions()
    shared = {name: sorted(set(owners[name]) - {"neox-distill"})
              for name in OUR_TOP_LEVEL if set(owners.get(name, ())) - {"neox-distill"}}
    assert not shared, f"top-level names another installed distribution also ships: {shared}"


def test_the_distribution_ships_one_import_root():
    try:
        top_level = importlib.metadata.distribution("neox-distill").read_text("top_level.txt")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("neox-distill is not installed (pip install -e .)")
    if top_level is None:
        pytest.skip("this install records no top_level.txt")
    assert top_level.split() == ["engine"]


def test_every_subcommand_names_a_module_with_main():
    import importlib

    for name, (module, summary) in COMMANDS.items():
        assert callable(importlib.import_module(module).main), name
        assert summary and "\n" not in summary


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return make_assets(tmp_path_factory.mktemp("assets"))


@pytest.mark.slow
def test_a_wheel_runs_every_command_from_an_empty_folder(tmp_path, assets):
    """pip wheel -> a fresh venv (system site-packages for torch & co, offline) -> the
    installed `neox-distill` from an empty folder: --help, every SUB --help, a tiny train."""
    source = tmp_path / "source"  # a copy: setuptools writes build/ beside what it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO_ROOT / name, source / name)
    shutil.copytree(REPO_ROOT / "engine", source / "engine",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    wheels = tmp_path / "wheels"
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                            "--no-build-isolation", "-w", str(wheels), str(source)],
                           capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    (wheel,) = wheels.glob("neox_distill-*.whl")
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(wheel)],
        capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    command = str(env_dir / "bin" / "neox-distill")

    def neox(*args, timeout=300):
        done = subprocess.run([command, *args], cwd=empty, env=env, capture_output=True,
                              text=True, timeout=timeout)
        assert done.returncode == 0, f"neox-distill {' '.join(args)}:\n{done.stderr}"
        return done.stdout

    where = subprocess.run([str(python), "-c", "import engine; print(engine.__file__)"],
                           cwd=empty, env=env, capture_output=True, text=True, timeout=60)
    assert str(env_dir) in where.stdout, where.stdout + where.stderr
    listing = neox("--help")
    print(listing)
    for name in COMMANDS:
        assert name in listing
        assert "usage" in neox(name, "--help").lower(), name
    out = neox("train", *base_overrides(assets, empty / "run", run__steps=2), timeout=600)
    print(out.splitlines()[-1])
    assert (empty / "run" / "final" / "model.safetensors").is_file()
    assert sorted(p.name for p in empty.iterdir()) == ["run"]  # nothing else written there
