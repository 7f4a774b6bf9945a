"""Checkpoints: a weight file plus the step log. Resuming loads the newest checkpoint and
replays the log's later steps, so the weights are those of the last logged step, bit for bit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Sequence

import numpy as np

from . import steplog
from .directions import Directions
from .errors import OrtzoError
from .files import write_json
from .mezo import StepRecord, replay
from .weights import WeightStore

STEPS = "steps.jsonl"
DIR = "checkpoints"


def save(run_dir: Path, store: WeightStore, step: int, keep: int = 2) -> Path:
    """Write checkpoint `step` (steps 0..step-1 applied); keep the newest `keep`."""
    folder = run_dir / DIR / f"step-{step:07d}"
    folder.mkdir(parents=True, exist_ok=True)
    sha = store.save(folder / "weights.bin")
    write_json(folder / "checkpoint.json", {"steps_applied": step, "sha256": sha})
    for old in sorted((run_dir / DIR).glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest(run_dir: Path) -> tuple[int, Path, str] | None:
    """(steps applied, weight file, sha256) of the newest complete checkpoint."""
    for folder in sorted((run_dir / DIR).glob("step-*"), reverse=True):
        meta = folder / "checkpoint.json"
        if meta.is_file() and (folder / "weights.bin").is_file():
            d = json.loads(meta.read_text())
            return int(d["steps_applied"]), folder / "weights.bin", d["sha256"]
    return None


def restore(run_dir: Path, store_loader, buffers_of, directions: Directions) -> tuple[WeightStore, list[StepRecord]]:
    """Weights after every logged step: newest checkpoint (or the model's) + replayed records.

    `store_loader(weights, sha256)` builds a WeightStore; `buffers_of(store)` lists the trained
    buffers in the order the run used."""
    records = steplog.read(run_dir / STEPS)
    found = latest(run_dir)
    if found is not None and found[0] > len(records):
        raise OrtzoError(f"{run_dir}: checkpoint at step {found[0]} is newer than the step log ({len(records)} steps)")
    start, weights, sha = found if found is not None else (0, None, None)
    store = store_loader(weights, sha)
    buffers = buffers_of(store)
    replay(buffers, records[start:], directions, decay_mask(buffers))
    return store, records


def decay_mask(buffers: Sequence[np.ndarray]) -> list[bool]:
    """Weight decay on matrices only, not on norms or biases (as MeZO does)."""
    return [b.ndim >= 2 for b in buffers]
