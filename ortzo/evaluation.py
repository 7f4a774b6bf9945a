"""`ortzo eval`: accuracy of a model folder as exported, or of a run's latest weights."""
from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint
from .batches import Encoder
from .data import make_splits
from .directions import Directions
from .errors import OrtzoError
from .manifest import MANIFEST, Manifest
from .objective import evaluate
from .session import ScoringSession
from .targets import load_target
from .tasks import load_task
from .tokenizer import Tokenizer
from .weights import WeightStore


def evaluate_folder(path: Path, task_name: str | None, data: str | None, eval_examples: int | None,
                    batch_size: int, target_name: str, max_length: int) -> dict:
    run_config = path / "config.json"
    if (path / MANIFEST).is_file():
        model_dir, cfg = path, {}
    elif run_config.is_file():
        cfg = json.loads(run_config.read_text())
        model_dir = Path(cfg["model"])
    else:
        raise OrtzoError(f"{path} is neither a trainable model folder nor a finetune run folder")
    task = load_task(task_name or cfg.get("task") or _missing("--task"))
    manifest = Manifest.load(model_dir)
    target = load_target(target_name)
    if cfg:
        def trained(store: WeightStore):
            return store.trainable(store.select(cfg["include"], cfg["exclude"]))

        store, records = checkpoint.restore(
            path, lambda w=None, s=None: WeightStore.load(model_dir, manifest, w, s), trained,
            Directions(cfg["directions"], target.direction_threads or None))
        steps = len(records)
    else:
        store, steps = WeightStore.load(model_dir, manifest), 0
    splits = make_splits(task, data or cfg.get("data"), eval_examples=eval_examples or cfg.get("eval_examples"),
                         seed=cfg.get("seed", 0))
    encoder = Encoder(task, Tokenizer(model_dir, manifest.tokenizer), max_length)
    result = evaluate(ScoringSession(model_dir, store, target), encoder, splits.eval, batch_size)
    return {"task": task.name, "steps": steps, "examples": len(splits.eval)} | result


def _missing(flag: str):
    raise OrtzoError(f"{flag} is required for a model folder")
