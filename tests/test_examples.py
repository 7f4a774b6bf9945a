"""examples/sentiment_app.py end to end, in its own process with torch made unimportable: the app
classifies with plain onnxruntime, fine-tunes the same model through ortzo, and gets better."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

from test_prepare import NEGATIVE, NEUTRAL, POSITIVE, make_tiny_bert

APP = Path(__file__).resolve().parents[1] / "examples" / "sentiment_app.py"


def _sst2_like(folder: Path) -> Path:
    """SST-2-shaped rows the tiny BERT's head can learn: a sentiment word, at most one other word."""
    rng = np.random.default_rng(0)
    folder.mkdir()
    for split, n in (("train", 512), ("validation", 128)):
        rows = []
        for i in range(n):
            label = int(rng.integers(2))
            words = [str(rng.choice(POSITIVE if label else NEGATIVE)), *rng.choice(NEUTRAL, rng.integers(2))]
            rows.append({"sentence": " ".join(rng.permutation(words)) + " ", "label": label, "idx": i})
        (folder / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_the_sentiment_app_gets_better_with_ortzo(tmp_path):
    model, data = make_tiny_bert(tmp_path / "bert"), _sst2_like(tmp_path / "sst2")
    argv = [str(APP), str(model), "--data", str(data), "--work", str(tmp_path / "work"), "--steps", "300",
            "--batch-size", "32", "--lr", "1"]
    code = (f"import runpy, sys\nsys.modules['torch'] = None  # importing torch now fails\nsys.argv = {argv!r}\n"
            "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    before, after = (float(re.search(rf"accuracy {w}: ([0-9.]+) on 128 sentences", r.stdout).group(1))
                     for w in ("before", "after"))
    assert before < 0.6 and after > before + 0.25, r.stdout  # measured: 0.4531 -> 0.8359
    assert (tmp_path / "work" / "weights.bin").is_file() and (tmp_path / "work" / "model" / "manifest.json").is_file()
