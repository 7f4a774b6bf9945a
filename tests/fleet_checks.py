"""What every fleet test checks of a run folder, computed here from the files: its rounds, its
global log, and each round's weights hash against the weights the log gives after it."""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

from ortzo.model.manifest import Manifest
from ortzo.recipes.bake import weights_at


def read_rows(out: Path) -> list[dict]:
    with (out / "rounds.csv").open() as f:
        return list(csv.DictReader(f))


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]


def check_hashes(out: Path, model: Path, rows: list[dict], every: bool = False) -> None:
    """Every round's hash is that of the weights the log gives after it, computed here: of the
    model's vectors (the default recipe's), or with `every` of all its parameters."""
    trained = [p.name for p in Manifest.load(model).parameters if every or len(p.shape) == 1]
    for r in rows:
        _, store, _ = weights_at(out, int(r["steps"]))
        h = hashlib.sha256()
        for name in trained:
            h.update(store.arrays[name].tobytes())
        assert r["weights_sha256"] == h.hexdigest()
    assert len({r["weights_sha256"] for r in rows}) == len(rows)
