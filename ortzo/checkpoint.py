"""Checkpoints: a weight file plus the step log. Resuming loads the newest checkpoint and
replays the log's later steps, so the weights are those of the last logged step, bit for bit."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from collections.abc import Sequence

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
    meta = {"steps_applied": step, "sha256": store.save(folder / "weights.bin")}
    if store.masters:
        meta["masters"] = list(store.masters)
        meta["masters_sha256"] = store.save_masters(folder / "masters.bin")
    write_json(folder / "checkpoint.json", meta)
    for old in sorted((run_dir / DIR).glob("step-*"))[:-keep]:
        shutil.rmtree(old)
    return folder


def latest(run_dir: Path) -> tuple[Path, dict] | None:
    """(folder, checkpoint.json) of the newest complete checkpoint."""
    for folder in sorted((run_dir / DIR).glob("step-*"), reverse=True):
        meta = folder / "checkpoint.json"
        if meta.is_file() and (folder / "weights.bin").is_file():
            return folder, json.loads(meta.read_text())
    return None


def restore(run_dir: Path, store_loader, buffers_of, directions: Directions) -> tuple[WeightStore, list[StepRecord]]:
    """Weights after every logged step: newest checkpoint (or the model's) + replayed records.

    `store_loader(weights, sha256)` builds a WeightStore; `buffers_of(store)` lists the trained
    buffers in the order the run used."""
    records = steplog.read(run_dir / STEPS)
    found = latest(run_dir)
    if found is None:
        start, store = 0, store_loader(None, None)
    else:
        folder, meta = found
        start = int(meta["steps_applied"])
        if start > len(records):
            raise OrtzoError(f"{run_dir}: checkpoint at step {start} is newer than the step log ({len(records)} steps)")
        store = store_loader(folder / "weights.bin", meta["sha256"])
        if "masters" in meta:
            store.load_masters(folder / "masters.bin", meta["masters"], meta["masters_sha256"])
    buffers = buffers_of(store)
    replay(buffers, records[start:], directions, decay_mask(buffers))
    return store, records


def decay_mask(buffers: Sequence[np.ndarray]) -> list[bool]:
    """Weight decay on matrices only, not on norms or biases (as MeZO does)."""
    return [b.ndim >= 2 for b in buffers]
