"""The fine-tuning recipe: MeZO through an ONNX Runtime inference session, start to finish.

Read top to bottom: load the model folder, bind its weights, build the data, evaluate
zero-shot, then loop `mezo_step` over batches, logging every step, evaluating and
checkpointing every few, and finish with a table, a metrics file and a plot.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from . import checkpoint, steplog
from .batches import Encoder
from .data import make_splits
from .directions import Directions
from .errors import OrtzoError
from .files import write_json
from .manifest import Manifest
from .mezo import lr_at, mezo_step, step_seed
from .objective import evaluate, loss
from .plots import plot_curves
from .session import ScoringSession
from .targets import load_target
from .tasks import load_task
from .tokenizer import Tokenizer
from .weights import WeightStore


@dataclass
class FinetuneConfig:
    model: str
    task: str
    out: str
    data: str | None = None
    steps: int = 1000
    batch_size: int = 16
    lr: float = 1e-5
    eps: float = 1e-3
    schedule: str = "constant"
    weight_decay: float = 0.0
    directions: str = "rademacher"
    n_directions: int = 1
    clip: float | None = None
    include: list[str] = field(default_factory=lambda: ["*"])
    exclude: list[str] = field(default_factory=list)
    train_examples: int | None = 1000
    k_shot: int | None = None
    eval_examples: int | None = None
    dev_examples: int | None = None
    eval_every: int = 100
    eval_batch_size: int = 16
    checkpoint_every: int = 500
    max_length: int = 256
    seed: int = 0
    target: str = "cpu"


# Settings a resumed run may change; any other difference means another experiment.
RESUMABLE = {"steps", "eval_every", "checkpoint_every", "eval_batch_size"}


def finetune(cfg: FinetuneConfig, resume: bool = False) -> dict[str, float]:
    # Absolute paths in the run's config, so `ortzo eval RUN` works from any folder.
    cfg.model = str(Path(cfg.model).resolve())
    if cfg.data and Path(cfg.data).is_dir():
        cfg.data = str(Path(cfg.data).resolve())
    run = Path(cfg.out)
    model_dir = Path(cfg.model)
    manifest = Manifest.load(model_dir)
    target = load_target(cfg.target)
    task = load_task(cfg.task)
    splits = make_splits(task, cfg.data, train_examples=cfg.train_examples, k_shot=cfg.k_shot,
                         eval_examples=cfg.eval_examples, dev_examples=cfg.dev_examples, seed=cfg.seed)
    if splits.note:
        print(f"note: {splits.note}")
    encoder = Encoder(task, Tokenizer(model_dir, manifest.tokenizer), cfg.max_length)
    directions = Directions(cfg.directions, target.direction_threads or None)
    _check_run_dir(run, cfg, resume)  # only once every input has been checked

    def trained(store: WeightStore) -> list[np.ndarray]:
        return store.trainable(store.select(cfg.include, cfg.exclude))

    def load(weights=None, sha=None) -> WeightStore:
        return WeightStore.load(model_dir, manifest, weights, sha)

    if resume:
        store, records = checkpoint.restore(run, load, trained, directions)
    else:
        store, records = load(), []
    buffers = trained(store)
    decay = checkpoint.decay_mask(buffers)
    session = ScoringSession(model_dir, store, target)
    n_trained = sum(b.size for b in buffers)
    print(f"{manifest.source.get('model', model_dir)}: {n_trained:,} of "
          f"{sum(p.size for p in manifest.parameters):,} parameters trained; "
          f"{len(splits.train)} train / {len(splits.eval)} eval examples of {task.name}")

    train_ids = [encoder.encode(e) for e in splits.train]
    train_labels = np.array([e[task.label_field] for e in splits.train], np.int64)
    metrics_path = run / "metrics.jsonl"
    history = _read_metrics(metrics_path) if resume else []

    def measure(step: int, train_seconds: float, wall_seconds: float, train_loss: float | None) -> None:
        row = {"step": step, "train_seconds": round(train_seconds, 3), "wall_seconds": round(wall_seconds, 3),
               "train_loss": train_loss}
        for name, examples in (("eval", splits.eval), ("dev", splits.dev)):
            if examples:
                r = evaluate(session, encoder, examples, cfg.eval_batch_size)
                row |= {f"{name}_accuracy": r["accuracy"], f"{name}_loss": r["loss"]}
        history.append(row)
        _append(metrics_path, row)

    if not history:
        measure(0, 0.0, 0.0, None)
    start = len(records)
    train_seconds, wall0 = history[-1]["train_seconds"], time.perf_counter() - history[-1]["wall_seconds"]
    log = steplog.StepLog(run / checkpoint.STEPS)
    losses: list[float] = []
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="mezo", unit="step", dynamic_ncols=True)
    try:
        for step in bar:
            idx = batch_indices(len(train_ids), cfg.batch_size, step, cfg.seed)
            batch = encoder.batch([train_ids[i] for i in idx], train_labels[idx])
            t0 = time.perf_counter()
            try:
                record = mezo_step(buffers, lambda b=batch: loss(session(b.feeds), b.labels), step=step,
                                   seed=step_seed(cfg.seed, step), eps=cfg.eps,
                                   lr=lr_at(step, cfg.steps, cfg.lr, cfg.schedule), directions=directions,
                                   n_directions=cfg.n_directions, clip=cfg.clip, weight_decay=cfg.weight_decay,
                                   decay=decay)
            except FloatingPointError as e:
                raise OrtzoError(f"{e}; the run stopped before logging it (try a smaller --lr or --clip)") from None
            train_seconds += time.perf_counter() - t0
            log.append(record)
            losses.append(record.loss)
            done = step + 1
            if done % cfg.eval_every == 0 or done == cfg.steps:
                measure(done, train_seconds, time.perf_counter() - wall0, float(np.mean(losses)))
                losses = []
            if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                checkpoint.save(run, store, done)
            bar.set_postfix(loss=f"{record.loss:.4f}", acc=f"{history[-1]['eval_accuracy']:.3f}",
                            s_per_step=f"{train_seconds / max(1, done - start):.2f}", refresh=False)
    finally:
        log.close()
        bar.close()
    plot_curves(history, run / "curve.png", title=f"MeZO on {task.name}: {model_dir.name}")
    _print_table(history)
    print(f"{task.name}: zero-shot accuracy {history[0]['eval_accuracy']:.4f} -> {history[-1]['eval_accuracy']:.4f} "
          f"after {history[-1]['step']} MeZO steps ({history[-1]['train_seconds'] / 60:.1f} min); "
          f"metrics {metrics_path}, plot {run / 'curve.png'}")
    return {"zero_shot_accuracy": history[0]["eval_accuracy"], "final_accuracy": history[-1]["eval_accuracy"],
            "steps": history[-1]["step"], "train_seconds": history[-1]["train_seconds"]}


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The examples of step `step`: consecutive slices of one seeded permutation per epoch.
    A pure function of the step, so a resumed run sees the batches it would have seen."""
    per_epoch = max(1, n // batch_size)
    epoch, k = divmod(step, per_epoch)
    perm = np.random.default_rng([seed, epoch]).permutation(n)
    return perm[k * batch_size:(k + 1) * batch_size]


def _check_run_dir(run: Path, cfg: FinetuneConfig, resume: bool) -> None:
    saved = run / "config.json"
    if resume:
        if not saved.is_file():
            raise OrtzoError(f"nothing to resume in {run} (no config.json)")
        old = json.loads(saved.read_text())
        changed = sorted(k for k, v in asdict(cfg).items() if k not in RESUMABLE and old.get(k) != v)
        if changed:
            raise OrtzoError(f"cannot resume {run}: settings differ from the run's ({', '.join(changed)})")
    elif run.exists() and any(run.iterdir()):
        raise OrtzoError(f"run folder {run} is not empty; pass --resume to continue it or choose another --out")
    run.mkdir(parents=True, exist_ok=True)
    write_json(saved, asdict(cfg))


def _append(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _print_table(history: list[dict]) -> None:
    dev = "dev_accuracy" in history[0]
    print(f"{'step':>7} {'train s':>9} {'train loss':>10} {'eval acc':>9} {'eval loss':>9}" + (f" {'dev acc':>8}" if dev else ""))
    for h in history:
        tl = "-" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
        print(f"{h['step']:>7} {h['train_seconds']:>9.1f} {tl:>10} {h['eval_accuracy']:>9.4f} {h['eval_loss']:>9.4f}"
              + (f" {h['dev_accuracy']:>8.4f}" if dev else ""))
