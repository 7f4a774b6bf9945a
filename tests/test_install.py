"""A newcomer's walk-through of a bare `pip install` (no extras) in a fresh virtual environment:
the version, every command's --help, the runtime (import, fine-tune, evaluate) without
torch, onnx or matplotlib, and the commands that need an extra saying which, in one line,
with nothing left behind. The environment is built once per session (pip's cache makes it
quick); the tiny model and data come from this environment's fixtures."""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from test_docs import _block_under

ROOT = Path(__file__).resolve().parents[1]
BUILT_FROM = ("pyproject.toml", "README.md", "ortzo", "targets", "export")  # what the package is built from
OPTIONAL = ("torch", "onnx", "matplotlib", "transformers", "optimum", "datasets", "onnxruntime_genai", "cupy", "flwr",
            "ray")


@pytest.fixture(scope="session")
def bare(tmp_path_factory) -> Path:
    """The bin folder of a fresh venv with `pip install <a copy of this checkout>`, no extras
    (a copy: building writes build/ and *.egg-info beside the sources)."""
    where = tmp_path_factory.mktemp("install")
    for name in BUILT_FROM:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, where / "src" / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            (where / "src").mkdir(exist_ok=True)
            shutil.copy(source, where / "src" / name)
    subprocess.run([sys.executable, "-m", "venv", str(where / "venv")], check=True)
    r = subprocess.run([str(where / "venv/bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                        str(where / "src")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return where / "venv/bin"


def _ortzo(bare: Path, *argv: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([str(bare / "ortzo"), *map(str, argv)], capture_output=True, text=True, timeout=300,
                          **kwargs)


def test_the_bare_install_has_no_optional_dependency_and_imports(bare):
    code = ("import importlib.util, sys, ortzo, ortzo.cli\n"
            f"optional = {OPTIONAL!r}\n"
            "assert [m for m in optional if importlib.util.find_spec(m)] == [], 'not a bare install'\n"
            "assert not [m for m in sys.modules if m.split('.')[0] in optional]\n"
            "print(ortzo.__version__)")
    r = subprocess.run([str(bare / "python"), "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_version_and_every_commands_help(bare):
    from ortzo.cli import _parser

    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    r = _ortzo(bare, "--version")
    assert (r.returncode, r.stdout) == (0, f"ortzo {version}\n"), r.stderr
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert {"export", "prepare", "finetune", "eval", "bake", "mobile", "memory"} <= set(commands)
    for command in ["--help", *(f"{c} --help" for c in commands)]:
        r = _ortzo(bare, *command.split())
        assert r.returncode == 0 and r.stdout.startswith("usage: ortzo") and r.stderr == "", (command, r.stderr)


@pytest.mark.parametrize("command,extra,module", [("prepare", "onnx", "onnx"), ("bake", "onnx", "onnx"),
                                                  ("mobile", "onnx", "onnx"), ("export", "export", "torch"),
                                                  ("federate", "fleet", "flwr")])
def test_a_command_that_needs_an_extra_says_which_in_one_line(bare, command, extra, module, tiny_hf, tiny_model,
                                                              tiny_data, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    before = {p: p.read_bytes() for p in folder.rglob("*")}
    out = tmp_path / "out"
    out.mkdir()
    argv = {"prepare": [folder / "model.onnx", "--out", out / "p"], "bake": [folder, "--out", out / "b"],
            "mobile": [folder], "export": [tiny_hf, "--out", out / "e"],
            "federate": [folder, "--task", "sst2", "--data", tiny_data, "--clients", "2", "--rounds", "1",
                         "--out", out / "f"]}[command]
    r = _ortzo(bare, command, *argv)
    assert r.returncode == 2 and r.stdout == "", r.stderr
    assert r.stderr == (f"ortzo: error: ortzo {command} needs the {extra!r} extra: pip install 'ortzo[{extra}]' "
                        f"(No module named {module!r})\n")
    assert list(out.iterdir()) == [] and {p: p.read_bytes() for p in folder.rglob("*")} == before


def test_fine_tuning_and_evaluation_run_without_the_extras(bare, tiny_model, tiny_data, tmp_path):
    run = tmp_path / "run"
    r = _ortzo(bare, "finetune", tiny_model, "--task", "sst2", "--data", tiny_data, "--out", run, "--steps", "2",
               "--eval-every", "2", "--train-examples", "8", "--batch-size", "4", "--eval-examples", "8", "--quiet")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["steps"] == 2 and not (run / "curve.png").exists()
    assert r.stderr == f"{run / 'curve.png'} not drawn: plots need the 'plots' extra: pip install 'ortzo[plots]'\n"
    r = _ortzo(bare, "eval", run, "--quiet")
    assert r.returncode == 0 and json.loads(r.stdout)["examples"] == 8, r.stderr


def test_the_readme_python_example_runs_on_the_bare_install(bare, tiny_model, tmp_path):
    code = _block_under(ROOT / "README.md", "## From Python", "python")
    code = code.replace('"models/smollm2-135m"', repr(str(tiny_model)))
    r = subprocess.run([str(bare / "python"), "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("before [") and [p.name for p in tmp_path.iterdir()] == ["sst2-weights.bin"]
