"""Checkpoints: the weights after N steps, in `checkpoints/step-N/`, written whole or not at all.

A checkpoint is built in a hidden temporary folder and renamed into place. It holds the
weight store and whatever the engine keeps besides (a backprop optimizer's state). Resuming
loads the newest checkpoint at or before the wanted step, opens the engine over it and has it
replay the step log's records after it, so the weights are those of that step (for MeZO bit
for bit).
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from ..engines.base import Record, Saved
from ..errors import OrtzoError
from ..files import TMP_SUFFIX, fsync_dir, write_json
from ..model.weights import WeightStore

DIR = "checkpoints"
META = "checkpoint.json"
WEIGHTS = "weights.bin"
MASTERS = "masters.bin"
_NAME = re.compile(r"^step-(\d+)$")

StoreLoader = Callable[[Path | None, str | None], WeightStore]  # (weight file, sha256) -> store; None: the model's


class Replayer(Protocol):
    def replay(self, records: Sequence[Record]) -> None: ...


E = TypeVar("E", bound=Replayer)


def name(step: int) -> str:
    return f"step-{step:07d}"


def save(run_dir: Path, store: WeightStore, step: int, keep: int = 2,
         extra: Callable[[Path], dict[str, Any]] | None = None) -> Path:
    """Write checkpoint `step` (steps 0..step-1 applied); keep the newest `keep`. `extra(folder)`
    writes more files into the checkpoint and returns their metadata."""
    root = run_dir / DIR
    root.mkdir(exist_ok=True)
    tmp = root / f".{name(step)}{TMP_SUFFIX}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    meta = {"steps_applied": step, "sha256": store.save(tmp / WEIGHTS)}
    if store.masters:
        meta["masters"] = list(store.masters)
        meta["masters_sha256"] = store.save_masters(tmp / MASTERS)
    if extra is not None:
        meta |= extra(tmp)
    write_json(tmp / META, meta)
    final = root / name(step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(root)
    prune(run_dir, keep)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints (a resume prunes too: a kill between a
    save and its pruning leaves one too many)."""
    for old in saved(run_dir)[:-keep]:
        shutil.rmtree(run_dir / DIR / name(old))


def saved(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints, oldest first (by number, not by name)."""
    root = run_dir / DIR
    if not root.is_dir():
        return []
    steps = [int(m.group(1)) for p in root.iterdir() if (m := _NAME.match(p.name)) and (p / META).is_file()]
    return sorted(steps)


def load(run_dir: Path, step: int, load_store: StoreLoader) -> tuple[WeightStore, Saved]:
    folder = run_dir / DIR / name(step)
    try:
        meta = json.loads((folder / META).read_text())
        if meta["steps_applied"] != step:
            raise ValueError(f"it says steps_applied={meta['steps_applied']}")
        store = load_store(folder / WEIGHTS, meta["sha256"])
        if "masters" in meta:
            store.load_masters(folder / MASTERS, meta["masters"], meta["masters_sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise OrtzoError(f"corrupt checkpoint {folder}: {e}") from None
    return store, Saved(folder, meta)


def restore(run_dir: Path, records: Sequence[Record], at: int, load_store: StoreLoader,
            open_engine: Callable[[WeightStore, Saved | None], E]) -> E:
    """An engine at the weights after the first `at` logged steps: opened over the newest
    checkpoint at or before `at` (or the model's own weights), then replaying the records after it."""
    steps = saved(run_dir)
    if steps and steps[-1] > len(records):  # checkpoints are written after their steps are logged
        raise OrtzoError(f"{run_dir}: its step log has {len(records)} steps but a checkpoint holds step "
                         f"{steps[-1]}: steps.jsonl is missing or truncated, so its weights cannot be rebuilt "
                         "exactly (restore steps.jsonl from a backup)")
    if at > len(records):
        raise OrtzoError(f"{run_dir}: cannot restore step {at}: the step log has {len(records)} steps")
    start = max((s for s in steps if s <= at), default=0)
    store, state = load(run_dir, start, load_store) if start else (load_store(None, None), None)
    engine = open_engine(store, state)
    engine.replay(records[start:at])
    return engine
