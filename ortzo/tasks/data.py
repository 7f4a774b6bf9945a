"""Examples for a task: JSON Lines splits from a folder, or a `datasets` hub name, sampled
reproducibly (MeZO's n-example setting or k-shot per class).

Each sample draws from its own seeded stream, so the evaluation set depends only on the
seed and --eval-examples, never on how the training examples were chosen: `ortzo eval RUN`
rebuilds exactly the run's evaluation set."""
from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import OrtzoError
from .task import HUB, Task

DATA_ENV = "ORTZO_DATA"  # a folder holding one sub-folder per task, as ../shared/data does
HELD_OUT_SEED = 20240101  # fixed: the train/eval split of a one-split task never moves
EVAL_STREAM = 1  # the evaluation sample's stream: np.random.default_rng([seed, EVAL_STREAM])
SUBSET_STREAM = 2  # the --eval-subset sample's

Rows = list[dict[str, Any]]


@dataclass(frozen=True)
class Splits:
    train: Rows
    eval: Rows
    note: str | None = None
    dev: Rows = field(default_factory=list)


@dataclass(frozen=True)
class Source:
    """A folder of `<split>.jsonl` files, or a `datasets` hub name (`name` or `name:config`)."""

    folder: Path | None = None
    hub: str | None = None

    def split_path(self, split: str) -> Path:
        if split.endswith(".jsonl"):
            path = Path(split)
            if path.is_absolute():
                return path
            if self.folder is None:
                raise OrtzoError(f"split file {split} is relative, but the data is {HUB}{self.hub}: give an absolute path")
            return self.folder / path
        return self.folder / f"{split}.jsonl"


def data_source(task: Task, data: str | None) -> Source:
    """Where the task's examples come from: `data` (a folder, or hub:NAME[:CONFIG]), else the
    task spec's data, else $ORTZO_DATA/<task>, else the task's hub dataset."""
    data = data or task.data
    if data is None:
        env = os.environ.get(DATA_ENV)
        if env and (Path(env) / task.name).is_dir():
            return Source(folder=Path(env) / task.name)
        if task.hub:
            return Source(hub=task.hub)
        raise OrtzoError(f"task {task.name} has no data: pass --data FOLDER or set {DATA_ENV}")
    if data.startswith(HUB):
        return Source(hub=data[len(HUB):])
    path = Path(data)
    if path.is_dir():
        return Source(folder=path)
    if path.exists():
        raise OrtzoError(f"--data {data} is a file: it takes a folder of <split>.jsonl files "
                         "(name a single file with --train-split/--eval-split)")
    raise OrtzoError(f"data folder not found: {data} (a hub dataset is written {HUB}NAME[:CONFIG])")


def load_split(task: Task, source: Source, split: str) -> Rows | None:
    """Rows of `split`, checked against the task's fields; None if the source has no such split."""
    if source.hub is not None and not split.endswith(".jsonl"):
        rows = _read_hub(source.hub, split)
        where = f"{HUB}{source.hub}[{split}]"
    else:
        path = source.split_path(split)
        if not path.is_file():
            return None
        rows, where = _read_jsonl(path), str(path)
    if rows is not None:
        _check(task, rows, where)
    return rows


def _read_jsonl(path: Path) -> Rows:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue  # blank lines (a trailing one, say) hold no example
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise OrtzoError(f"{path}:{n}: not JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise OrtzoError(f"{path}:{n}: expected a JSON object per line")
            rows.append(row)
    return rows


def _read_hub(name: str, split: str) -> Rows | None:
    try:
        import datasets
    except ImportError:
        raise OrtzoError(f"no local data and no `datasets` package to fetch {name}; "
                         "pass --data FOLDER or pip install 'ortzo[hub]'") from None
    try:
        return [dict(r) for r in datasets.load_dataset(*name.split(":"), split=split)]
    except ValueError:
        return None  # no such split
    except Exception as e:  # offline, unknown name: datasets raises many types
        raise OrtzoError(f"cannot load dataset {name}: {str(e).splitlines()[0]}") from None


def _check(task: Task, rows: Rows, where: str) -> None:
    k = len(task.label_words)
    for n, row in enumerate(rows, 1):
        for f in (*task.fields, task.label_field):
            if f not in row:
                raise OrtzoError(f"{where}:{n}: missing field {f!r} needed by task {task.name} "
                                 f"(has {', '.join(sorted(row))})")
        label = row[task.label_field]
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < k:
            raise OrtzoError(f"{where}:{n}: label {label!r} is not an integer in [0, {k})")
    if not rows:
        raise OrtzoError(f"{where}: no rows")


def _missing(task: Task, source: Source, split: str, flag: str) -> OrtzoError:
    if source.hub is not None and not split.endswith(".jsonl"):
        return OrtzoError(f"task {task.name}: {HUB}{source.hub} has no split {split!r}; choose one with --{flag}")
    path = source.split_path(split)
    have = sorted(p.name for p in path.parent.glob("*.jsonl")) if path.parent.is_dir() else []
    return OrtzoError(f"task {task.name}: {path} not found ({path.parent} has {', '.join(have) or 'no .jsonl files'}); "
                      f"choose the split with --{flag} or {flag.replace('-', '_')} in a task spec")


def make_splits(task: Task, data: str | None, *, train_split: str | None = None, eval_split: str | None = None,
                train_examples: int | None = 1000, k_shot: int | None = None, eval_examples: int | None = None,
                dev_examples: int | None = None, seed: int = 0) -> Splits:
    """Training examples from the train split and evaluation examples from the eval split.

    MeZO's large-model setting is 1000 train / 500 dev / 1000 test: `dev_examples` are drawn from
    the training pool, disjoint from the training sample, and the eval split is the test.

    A task with no train split here (BoolQ ships validation only) has its eval split cut in two
    by a fixed permutation: the last third is the evaluation pool, the rest the training pool,
    whatever --eval-examples says (which then samples within that third). The note says so."""
    source = data_source(task, data)
    train_split, eval_split = train_split or task.train_split, eval_split or task.eval_split
    eval_pool = load_split(task, source, eval_split)
    if eval_pool is None:
        raise _missing(task, source, eval_split, "eval-split")
    train_pool = load_split(task, source, train_split)
    note = None
    if train_pool is None:
        if train_split != Task.train_split:  # chosen by name: no silent fallback
            raise _missing(task, source, train_split, "train-split")
        perm = np.random.default_rng(HELD_OUT_SEED).permutation(len(eval_pool))
        n_eval = len(eval_pool) // 3
        if n_eval == 0:
            raise OrtzoError(f"task {task.name}: {len(eval_pool)} rows are too few to split into train and eval")
        train_pool = [eval_pool[i] for i in sorted(perm[:-n_eval])]
        eval_pool = [eval_pool[i] for i in sorted(perm[-n_eval:])]
        note = (f"{task.name} has no {train_split} split here: its {eval_split} split was cut by a fixed permutation "
                f"into {len(train_pool)} training and {len(eval_pool)} evaluation rows")
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
        pick = np.random.default_rng([seed, EVAL_STREAM]).choice(len(eval_pool), eval_examples, replace=False)
        eval_pool = [eval_pool[i] for i in sorted(pick)]
    return Splits([train_pool[i] for i in chosen], eval_pool, note, dev)


def subset(rows: Rows, n: int | None, seed: int) -> Rows:
    """A fixed sample of at most `n` rows (in their order), its own seeded stream: the same rows
    at every evaluation of a run; all rows if `n` is None."""
    if n is None or n >= len(rows):
        return rows
    pick = np.random.default_rng([seed, SUBSET_STREAM]).choice(len(rows), n, replace=False)
    return [rows[i] for i in sorted(pick)]


def batch_indices(n: int, batch_size: int, step: int, seed: int, lengths: Sequence[int] | None = None,
                  group: int = 1) -> np.ndarray:
    """The examples of step `step`: consecutive slices of one seeded permutation per epoch
    (the last incomplete slice of each is skipped). A pure function of the step, so a resumed
    run sees the batches it would have seen.

    With `lengths` and `group` > 1, each run of `group` consecutive slices is cut again by
    length: its examples sorted by length, sliced, the slices taken in a seeded order. A batch
    is padded to its longest prompt, so on SST-2 (17 tokens on average, 38 the longest of 16
    random ones) this halves the tokens a forward computes; an epoch still sees every example
    once (Hugging Face's `group_by_length` does the same for the same reason). Measured on
    SST-2 with MeZO, though, such batches learned less per step than random ones: off by
    default (docs/ablation-sst2.md)."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    if lengths is None or group <= 1:
        return perm[k * batch_size:(k + 1) * batch_size]
    chunk, j = divmod(k, group)
    members = perm[chunk * group * batch_size:min((chunk + 1) * group, per_epoch) * batch_size]
    members = members[np.argsort(np.asarray(lengths)[members], kind="stable")]
    pick = np.random.default_rng([seed, epoch, chunk]).permutation(len(members) // batch_size)[j]
    return members[pick * batch_size:(pick + 1) * batch_size]
