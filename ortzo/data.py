"""Examples for a task: JSON Lines splits from a folder, or a `datasets` hub name, sampled
reproducibly (MeZO's n-example setting or k-shot per class)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import OrtzoError
from .tasks import Task

DATA_ENV = "ORTZO_DATA"  # a folder holding one sub-folder per task, as ../shared/data does
HELD_OUT_SEED = 20240101  # fixed: the train/eval split of a validation-only task never moves


@dataclass(frozen=True)
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    note: str | None = None
    dev: list[dict[str, Any]] = field(default_factory=list)


def load_split(task: Task, data: str | None, split: str) -> list[dict[str, Any]] | None:
    """Rows of `split`, checked against the task's fields; None if the source has no such split.

    `data` is a folder of `<split>.jsonl` files or a hub name (`name` or `name:config`). Without
    it: the task spec's own folder, then $ORTZO_DATA/<task>, then the task's hub dataset."""
    data = data or task.data
    if data is None and os.environ.get(DATA_ENV) and (Path(os.environ[DATA_ENV]) / task.name).is_dir():
        data = str(Path(os.environ[DATA_ENV]) / task.name)
    if data is not None and Path(data).is_dir():
        path = Path(data) / f"{split}.jsonl"
        if not path.is_file():
            return None
        rows = _read_jsonl(path)
        source = str(path)
    elif data is not None and (Path(data).exists() or data.startswith((".", "/"))):
        raise OrtzoError(f"data folder not found: {data}")
    else:
        name = data.split(":") if data else list(task.hub)
        if not name:
            raise OrtzoError(f"task {task.name} has no data: pass --data FOLDER or set {DATA_ENV}")
        rows, source = _read_hub(name, split), ":".join(name)
        if rows is None:
            return None
    _check(task, rows, source)
    return rows


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise OrtzoError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise OrtzoError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_hub(name: list[str], split: str) -> list[dict[str, Any]] | None:
    try:
        import datasets
    except ImportError:
        raise OrtzoError(f"no local data and no `datasets` package to fetch {':'.join(name)}; "
                         "pass --data FOLDER or pip install 'ortzo[hub]'") from None
    try:
        return [dict(r) for r in datasets.load_dataset(*name, split=split)]
    except ValueError:
        return None  # no such split
    except Exception as e:  # offline, unknown name: datasets raises many types
        raise OrtzoError(f"cannot load dataset {':'.join(name)}: {str(e).splitlines()[0]}") from None


def _check(task: Task, rows: list[dict[str, Any]], source: str) -> None:
    k = len(task.label_words)
    for n, row in enumerate(rows, 1):
        for f in (*task.fields, task.label_field):
            if f not in row:
                raise OrtzoError(f"{source}:{n}: missing field {f!r} needed by task {task.name} "
                                 f"(has {', '.join(sorted(row))})")
        label = row[task.label_field]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k:
            raise OrtzoError(f"{source}:{n}: label {label!r} is not an integer in [0, {k})")
    if not rows:
        raise OrtzoError(f"{source}: no rows")


def make_splits(task: Task, data: str | None, *, train_examples: int | None = 1000, k_shot: int | None = None,
                eval_examples: int | None = None, dev_examples: int | None = None, seed: int = 0) -> Splits:
    """Training examples from the train split and evaluation examples from the validation split.

    MeZO's large-model setting is 1000 train / 500 dev / 1000 test: `dev_examples` are drawn from
    the training pool, disjoint from the training sample, and the validation split is the test.

    A task with no train split here (BoolQ ships validation only) has its validation split cut
    in two by a fixed permutation: the last `eval_examples` (default a third) for evaluation,
    the rest as the training pool. The note says so."""
    train_pool = load_split(task, data, "train")
    eval_pool = load_split(task, data, "validation")
    if eval_pool is None:
        raise OrtzoError(f"task {task.name}: no validation split found")
    note = None
    if train_pool is None:
        perm = np.random.default_rng(HELD_OUT_SEED).permutation(len(eval_pool))
        n_eval = eval_examples or len(eval_pool) // 3
        if n_eval >= len(eval_pool):
            raise OrtzoError(f"task {task.name}: {len(eval_pool)} validation rows cannot give {n_eval} for evaluation")
        train_pool = [eval_pool[i] for i in sorted(perm[:-n_eval])]
        eval_pool = [eval_pool[i] for i in sorted(perm[-n_eval:])]
        note = (f"{task.name} has no train split here: validation was split by a fixed permutation into "
                f"{len(train_pool)} training and {len(eval_pool)} evaluation rows")
    rng = np.random.default_rng(seed)
    if k_shot:
        chosen = []
        for label in range(len(task.label_words)):
            idx = [i for i, r in enumerate(train_pool) if r[task.label_field] == label]
            if len(idx) < k_shot:
                raise OrtzoError(f"task {task.name}: class {label} has {len(idx)} training rows, fewer than k={k_shot}")
            chosen += sorted(rng.choice(idx, k_shot, replace=False).tolist())
    elif train_examples and train_examples < len(train_pool):
        chosen = sorted(rng.choice(len(train_pool), train_examples, replace=False).tolist())
    else:
        chosen = list(range(len(train_pool)))
    dev = []
    if dev_examples:
        rest = sorted(set(range(len(train_pool))) - set(chosen))
        if dev_examples > len(rest):
            raise OrtzoError(f"task {task.name}: {len(rest)} training rows left, fewer than {dev_examples} for dev")
        dev = [train_pool[i] for i in sorted(rng.choice(rest, dev_examples, replace=False))]
    if eval_examples and eval_examples < len(eval_pool):
        eval_pool = [eval_pool[i] for i in sorted(rng.choice(len(eval_pool), eval_examples, replace=False))]
    return Splits([train_pool[i] for i in chosen], eval_pool, note, dev)
