"""The README's Python example runs as written (on the tiny model) and writes nothing where it runs."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_api_example_runs(tiny_model, tmp_path):
    code = re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)
    assert 'folder = "models/smollm2-135m"' in code
    code = code.replace('folder = "models/smollm2-135m"', f"folder = {str(tiny_model)!r}")
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    losses = [float(line.split()[1]) for line in r.stdout.splitlines() if re.fullmatch(r"\d+ \S+", line)]
    assert len(losses) == 10 and r.stdout.startswith("before [")
    assert not any(tmp_path.iterdir())
