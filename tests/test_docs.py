"""The README's and the docs' examples cannot go stale: every `ortzo` command line in them parses
with today's CLI and names no deprecated option, the walk-through command blocks run end to end
on the tiny model, and the Python examples run as written."""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from ortzo.cli import _parser, main
from ortzo.config import _Deprecated
from ortzo.errors import OrtzoError

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "experiments" / "README.md"]
SHELL = ("sh", "bash", "console", "shell", "")  # an untagged block is a shell one here


def _blocks(page: Path, languages: tuple[str, ...]) -> list[str]:
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", page.read_text(encoding="utf-8"), re.S | re.M)
            if m.group(1) in languages]


def _block_under(page: Path, heading: str, language: str) -> str:
    """The first `language` block after `heading` (a Markdown heading line)."""
    text = page.read_text(encoding="utf-8")
    start = text.index(f"\n{heading}\n")
    return re.search(rf"^```{language}\n(.*?)^```", text[start:], re.S | re.M).group(1)


def _commands(block: str) -> list[list[str]]:
    """The `ortzo ...` command lines of a shell block as argv lists (comments dropped, `\\` joined)."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        argv = shlex.split(line.removeprefix("$ "), comments=True)
        if argv[:1] == ["ortzo"]:
            out.append(argv[1:])
    return out


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _inline(page: Path) -> list[str]:
    """The `ortzo ...` code spans of a page's prose (fenced blocks left out)."""
    prose = re.sub(r"^```.*?^```", "", page.read_text(encoding="utf-8"), flags=re.S | re.M)
    return re.findall(r"`(ortzo [^`]+)`", prose.replace("\n", " "))


def _synopsis(argv: list[str]) -> bool:
    """A usage line ([optional] parts, a|b choices, ...) rather than a command to run."""
    return any(c in token for token in argv for c in ("[", "|", "..."))


def _problems(argv: list[str], fragment: bool, subs: dict[str, argparse.ArgumentParser]) -> list[str]:
    """What is wrong with one documented command line (`fragment`: options only are checked)."""
    if argv[0].startswith("-"):  # ortzo --version, ortzo --help
        return [] if argv[0] in ("--version", "--help", "-h") else [f"no option {argv[0]}"]
    if argv[0].isupper():  # ortzo COMMAND --help
        return []
    if argv[0] not in subs:
        return [f"no command {argv[0]!r}"]
    if fragment or _synopsis(argv):  # every option it names is a current one of that command
        options = {s: a for a in subs[argv[0]]._actions for s in a.option_strings}
        names = [t.strip("[]").split("=")[0] for t in argv[1:]]
        return [f"{n} is not an option" if n not in options else f"{n} is deprecated"
                for n in names if n.startswith("--") and (n not in options or isinstance(options[n], _Deprecated))]
    try:
        args = _parser().parse_args(argv)
    except (SystemExit, OrtzoError) as e:
        return [f"the CLI refuses it: {e}"]
    return list(getattr(args, "deprecated", []))


def test_every_command_line_in_the_readme_and_docs_is_one_the_cli_takes():
    subs = _subparsers()
    checked, problems = 0, []
    for page in PAGES:
        blocks = [(block, False) for block in _blocks(page, SHELL)] + [(span, True) for span in _inline(page)]
        for block, fragment in blocks:  # a code span in prose may be part of a command: its options are checked
            for argv in _commands(block):
                checked += 1
                problems += [f"{page.relative_to(ROOT)}: ortzo {' '.join(argv)}: {p}"
                             for p in _problems(argv, fragment, subs)]
    assert problems == []
    assert checked >= 60  # the pages do show commands: this test is not vacuous


@pytest.mark.parametrize("page,heading", [("README.md", "## From the command line"),
                                          ("docs/index.md", "## A first run")])
def test_the_walk_through_commands_run_on_the_tiny_model(page, heading, tiny_hf, tiny_data, tmp_path, monkeypatch,
                                                         capsys):
    """As written, but on the tiny model and data, with fewer steps and examples (appended options
    win in argparse)."""
    commands = _commands(_block_under(ROOT / page, heading, "sh"))
    assert [argv[0] for argv in commands] == ["export", "eval", "finetune", "eval", "bake"]
    faster = {"finetune": ["--steps", "2", "--eval-every", "2", "--train-examples", "16", "--eval-examples", "8",
                           "--batch-size", "4"], "eval": ["--eval-examples", "8"]}
    monkeypatch.chdir(tmp_path)
    printed = []
    for argv in commands:
        argv = [str(tiny_hf) if a == "smollm2-135m" and argv[0] == "export" else a for a in argv]
        argv = [str(tiny_data) if a == "../shared/data/sst2" else a for a in argv]
        assert main([*argv, *faster.get(argv[0], []), "--quiet"]) == 0, (argv, capsys.readouterr().err)
        printed.append(capsys.readouterr().out)
    model, run, baked = (Path(commands[i][commands[i].index("--out") + 1]) for i in (0, 2, 4))
    assert json.loads((model / "manifest.json").read_text())["parameters"]
    assert len((run / "steps.jsonl").read_text().splitlines()) == 2
    zero_shot, after = json.loads(printed[1]), json.loads(printed[3])
    assert zero_shot["examples"] == after["examples"] == 8
    assert (zero_shot["steps"], after["steps"]) == (0, 2) and zero_shot["loss"] != after["loss"]
    session = ort.InferenceSession(str(next(baked.glob("*.onnx"))), providers=["CPUExecutionProvider"])
    assert session.get_inputs()  # the baked folder is a plain ONNX model


def _run_python(code: str, folder: Path, cwd: Path) -> subprocess.CompletedProcess:
    assert '"models/smollm2-135m"' in code
    code = code.replace('"models/smollm2-135m"', repr(str(folder)))
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_the_readme_python_example_runs_and_its_saved_weights_open(tiny_model, tmp_path):
    r = _run_python(_block_under(ROOT / "README.md", "## From Python", "python"), tiny_model, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert lines[0].startswith("before [") and lines[1].startswith("after [") and " loss " in lines[1]
    saved = tmp_path / "sst2-weights.bin"
    assert [p.name for p in tmp_path.iterdir()] == [saved.name]
    import ortzo

    reopened = ortzo.open(tiny_model, weights=saved)  # the file the example saved opens without its hash
    reopened.save(tmp_path / "again.bin")
    assert (tmp_path / "again.bin").read_bytes() == saved.read_bytes() != (tiny_model / "weights.bin").read_bytes()


def test_the_embedding_guide_example_runs_as_written(tiny_model, tmp_path):
    r = _run_python(_blocks(ROOT / "docs" / "embed.md", ("python",))[0], tiny_model, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(line.split()[1]) for line in r.stdout.splitlines() if re.fullmatch(r"\d+ \S+", line)]
    assert len(losses) == 10 and r.stdout.startswith("before [")
    assert not any(tmp_path.iterdir())


def test_the_getting_started_python_example_runs_as_written(tiny_model, tmp_path):
    r = _run_python(_block_under(ROOT / "docs" / "index.md", "## The same from Python", "python"), tiny_model, tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("[")


def test_every_other_python_block_in_the_docs_is_valid_python():
    blocks = [(page, code) for page in PAGES for code in _blocks(page, ("python",))]
    assert len(blocks) >= 4
    for page, code in blocks:
        compile(code, str(page), "exec")
