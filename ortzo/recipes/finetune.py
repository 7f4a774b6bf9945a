"""The fine-tuning recipe, start to finish, for every engine: MeZO through an ONNX Runtime
inference session (the product), or a PyTorch baseline (backprop, reference MeZO) on the same
weights, batches, evaluation, run folder and metrics, so their curves compare line by line.

Read top to bottom. `start` checks every input (model checksum and parameter patterns
included) before it writes anything, then takes the run folder's lock and writes the config.
`resume` takes the lock, reads the run back (config, step log, metrics) and restores the
engine at the right step. Both then `train`: evaluate whatever an interruption left
unevaluated, loop the engine's steps, log every step, evaluate and checkpoint on a schedule,
and finish with a table, the metrics and a plot.

Times are accounted as an uninterrupted run would have them: each step's seconds are in the
step log, each evaluation's in its metrics row, so `train_seconds` (steps only) and
`wall_seconds` (steps and evaluations) never count a crash, a replay or a restart.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import jsonl
from ..config import RECORDED, RunConfig, flag
from ..engines.base import Adapt, Engine, record_type
from ..errors import OrtzoError
from ..optim import meazo, steplog
from ..output import progress
from ..optim.mezo import scheduled_lr
from ..run import checkpoint
from ..run.folder import RunFolder
from ..run.plots import plot_curves
from ..tasks.data import subset
from ..tasks.objective import evaluate
from ..tasks.task import Task, load_task
from .measure import peak_rss_mib
from .setup import Setup, prepare, version_notes

logger = logging.getLogger(__name__)


def start(cfg: RunConfig, out: str | Path) -> dict[str, Any]:
    """A new run of `cfg` in the run folder `out`."""
    cfg = cfg.resolved()
    setup = prepare(cfg, load_task(cfg.task, cfg.template))
    _check_batch(setup)
    store = setup.load_store()
    setup = setup.with_scales(store)  # from the weights the run starts from, recorded with it
    engine = setup.engine(store)  # checksum, patterns, the engine's own needs: before any write
    run = RunFolder(out)
    _warn_schedule(cfg)
    with run.locked(create=True):
        run.check_new()
        run.clean_stale()
        run.write_config(cfg.model_dump() | {RECORDED: setup.recorded()})
        return train(run, setup, engine, steplog.Log(), [], at=0)


def resume(out: str | Path, overrides: dict[str, Any]) -> dict[str, Any]:
    """Continue the run in `out` from its last logged step, with `overrides` of resumable settings."""
    run = RunFolder(out)
    with run.locked():
        saved = run.read_config()
        recorded = saved.pop(RECORDED)
        old = RunConfig.from_saved(saved, f"{run.config}: ")
        cfg = RunConfig.build(old.model_dump() | overrides).resolved()
        changed = {k: (getattr(old, k), getattr(cfg, k)) for k in overrides if getattr(old, k) != getattr(cfg, k)}
        fixed = [flag(k) for k in changed if not RunConfig.resumable(k)]
        if fixed:
            may = ", ".join(flag(k) for k in RunConfig.model_fields if RunConfig.resumable(k))
            raise OrtzoError(f"cannot resume {run.path} with another {', '.join(fixed)}: fixed at the run's start "
                             f"(a resumed run may change {may})")
        setup = prepare(cfg, Task.from_json(recorded["task"]), recorded=recorded)
        setup.check_model(recorded, run.path)
        for note in version_notes(recorded):
            logger.warning(note)
        log = steplog.read(run.steps, record_type(cfg.engine))
        history, torn = jsonl.read(run.metrics)
        if cfg.steps < len(log):
            raise OrtzoError(f"{run.path} has already logged {len(log)} steps; --steps must be at least that")
        if history and history[-1]["step"] > len(log):
            raise OrtzoError(f"{run.metrics} has a row for step {history[-1]['step']}, "
                             f"but {run.steps} ends at step {len(log)}")
        for path, tail in ((run.steps, log.torn), (run.metrics, torn)):
            if tail:
                logger.warning(f"note: {jsonl.torn_note(path, tail)}")
        run.clean_stale()  # the writers cut the torn tails when they open
        checkpoint.prune(run.path, cfg.keep_checkpoints)
        if changed:
            resumes = recorded.get("resumes", []) + [{"at_step": len(log), "changed": changed}]
            run.write_config(cfg.model_dump() | {RECORDED: recorded | {"resumes": resumes}})
        _warn_schedule(cfg)
        at = min(_due(cfg, history, len(log)), default=len(log))
        engine = checkpoint.restore(run.path, log.records, at, setup.load_store, setup.engine)
        return train(run, setup, engine, log, history, at)


def train(run: RunFolder, setup: Setup, engine: Engine, log: steplog.Log, history: list[dict],
          at: int) -> dict[str, Any]:
    """Run the steps after those in `log`, from weights that are at step `at` of it."""
    cfg, splits, store = setup.cfg, setup.splits, engine.store
    trained = setup.trained(store)
    logger.info(f"{setup.manifest.source.get('model', setup.model_dir)}: {sum(store.arrays[n].size for n in trained):,} "
                f"of {sum(p.size for p in setup.manifest.parameters):,} parameters ({cfg.params}) trained by {cfg.engine}; "
                f"{len(splits.train)} train / {len(splits.eval)} eval examples of {setup.task.name}")
    t = setup.task
    logger.info(f"recipe: prompt {t.template_name} {t.template!r} -> {' / '.join(map(repr, t.label_words))}; "
                f"lr {cfg.lr:g} ({_schedule(cfg)}), batch {cfg.batch_size} "
                f"({f'grouped by length in runs of {cfg.group_by_length}' if cfg.group_by_length > 1 else 'random'}), "
                f"{_update(cfg)}, weight decay {cfg.weight_decay:g}" + _scales(setup))

    def save(step: int) -> None:
        checkpoint.save(run.path, store, step, cfg.keep_checkpoints, extra=engine.save_state)

    with steplog.StepLog(run.steps) as steps_out, jsonl.Writer(run.metrics) as metrics_out, \
            progress(total=cfg.steps if cfg.time_budget is None else None,  # a budget: no step-count ETA
                 initial=len(log), desc=cfg.engine, unit="step", dynamic_ncols=True) as bar:
        def measure(step: int) -> None:
            t = time.perf_counter()
            scores = _evaluate(setup, engine, step, whole=step == 0 or _ended(cfg, log, step))
            row = _row(step, log, history, scores, time.perf_counter() - t)
            history.append(row)
            metrics_out.append(row)

        for point in _due(cfg, history, len(log)):  # rows an interruption lost, at their own weights
            engine.replay(log.records[at:point])
            at = point
            measure(point)
        engine.replay(log.records[at:])
        if _ended(cfg, log) and history and history[-1]["step"] < len(log):  # the time budget's last row
            measure(len(log))
        if len(log) and (_is_checkpoint(cfg, len(log)) or _ended(cfg, log)) and \
                len(log) not in checkpoint.saved(run.path):
            save(len(log))

        for step in range(len(log), cfg.steps):
            if _ended(cfg, log):
                break
            t0 = time.perf_counter()
            try:
                record = engine.step(step, _lr(cfg, log), _adapt(cfg, log))
            except FloatingPointError as e:
                raise OrtzoError(f"{e}; the run stopped before logging it: continue with a smaller --lr or --clip "
                                 f"(ortzo finetune --resume --out {run.path} --lr ...)") from None
            seconds = time.perf_counter() - t0
            steps_out.append_step(record, seconds)
            log.records.append(record)
            log.seconds.append(seconds)
            done, last = step + 1, _ended(cfg, log)
            if _is_eval(cfg, done) or last:
                measure(done)
            if _is_checkpoint(cfg, done) or last:
                save(done)
            bar.update()
            bar.set_postfix(loss=f"{record.loss:.4f}", acc=f"{history[-1]['eval_accuracy']:.3f}",
                            s_per_step=f"{sum(log.seconds) / done:.2f}", refresh=False)

    drawn = plot_curves(history, run.curve, title=f"{cfg.engine} on {setup.task.name}: {setup.model_dir.name}")
    _print_table(history)
    first, last = history[0], history[-1]
    logger.info(f"{setup.task.name}: zero-shot accuracy {first['eval_accuracy']:.4f} -> {last['eval_accuracy']:.4f} "
                f"after {last['step']} {cfg.engine} steps ({last['train_seconds'] / 60:.1f} min of steps, "
                f"{last['wall_seconds'] / 60:.1f} min with evaluations); metrics {run.metrics}" + f", plot {run.curve}" * drawn)
    return {"zero_shot_accuracy": first["eval_accuracy"], "final_accuracy": last["eval_accuracy"],
            "steps": last["step"], "train_seconds": last["train_seconds"], "wall_seconds": last["wall_seconds"]}


def _evaluate(setup: Setup, engine: Engine, step: int, whole: bool) -> dict[str, Any]:
    """Accuracy and loss on the evaluation (and dev) examples, as metrics fields; unless
    `whole`, on the --eval-subset sample of them (the same rows at every step)."""
    scores: dict[str, Any] = {}
    for name, examples in (("eval", setup.splits.eval), ("dev", setup.splits.dev)):
        if examples:
            if not whole:
                examples = subset(examples, setup.cfg.eval_subset, setup.cfg.seed)
            r = evaluate(engine.score, setup.encoder, examples, setup.cfg.eval_batch_size, desc=f"{name} at step {step}")
            scores |= {f"{name}_accuracy": r["accuracy"], f"{name}_loss": r["loss"], f"{name}_examples": len(examples)}
    return scores


def _row(step: int, log: steplog.Log, history: list[dict], scores: dict[str, float],
         eval_seconds: float) -> dict[str, Any]:
    """The metrics row of `step`, accounted from the step log and the earlier rows, as an
    uninterrupted run would have it: train loss since the last row, seconds of the steps so far,
    and those plus every evaluation's seconds. `peak_rss_mib` is this process's peak so far
    (after a resume: since the resume)."""
    since = history[-1]["step"] if history else 0
    losses = [r.loss for r in log.records[since:step]]
    train_seconds = sum(log.seconds[:step])
    wall_seconds = train_seconds + sum(h["eval_seconds"] for h in history) + eval_seconds
    return {"step": step, "train_seconds": round(train_seconds, 3), "wall_seconds": round(wall_seconds, 3),
            "eval_seconds": round(eval_seconds, 3), "train_loss": float(np.mean(losses)) if losses else None,
            "peak_rss_mib": round(peak_rss_mib(), 1)} | scores



def _check_batch(setup: Setup) -> None:
    if setup.cfg.batch_size > len(setup.splits.train):
        raise OrtzoError(f"--batch-size {setup.cfg.batch_size} is more than the {len(setup.splits.train)} "
                         "training examples")


def _lr(cfg: RunConfig, log: steplog.Log) -> float:
    """The lr of the step after those in `log`: the lower of the schedule over its steps and
    over its seconds of steps (whichever span is nearer its end), so the lr reaches 0 when the
    run ends, by --steps or by --time-budget. Only the log decides it, so a resume agrees."""
    return scheduled_lr(cfg.lr, cfg.schedule, len(log), cfg.schedule_steps or cfg.steps, sum(log.seconds),
                        cfg.schedule_seconds)


def _adapt(cfg: RunConfig, log: steplog.Log) -> Adapt | None:
    """The adaptive step of the step after those in `log`: MEAZO's scale from their gradients."""
    if cfg.adaptive == "none":
        return None
    return meazo.scale_after(r.grad for r in log.records)


def _scales(setup: Setup) -> str:
    if setup.scales is None:
        return ""
    s = np.concatenate([np.ravel(v) for v in setup.scales.values()])
    return f", directions scaled by {setup.cfg.direction_scale} ({s.min():.2f}-{s.max():.2f})"


def _update(cfg: RunConfig) -> str:
    """The update the engine makes, naming only the settings it uses (a backprop run has no eps)."""
    if cfg.engine == "torch-bp":
        return f"backprop with {cfg.optimizer}" + f" {cfg.momentum:g}" * (cfg.optimizer == "momentum")
    if cfg.engine == "torch-mezo":
        return f"eps {cfg.eps:g}, mezo in PyTorch with 1 x gaussian direction"
    return (f"eps {cfg.eps:g}, clip {cfg.clip}, {cfg.estimator} with {cfg.n_directions} x {cfg.directions} "
            "directions" + ", MEAZO's adaptive step" * (cfg.adaptive == "meazo"))


def _warn_schedule(cfg: RunConfig) -> None:
    """A decaying schedule shorter than the run leaves its last steps at lr 0: say so (a resume
    that raises --steps keeps the schedule it started with unless told otherwise)."""
    if cfg.schedule != "constant" and cfg.schedule_steps is not None and cfg.steps > cfg.schedule_steps:
        logger.warning(f"the {cfg.schedule} schedule ends at step {cfg.schedule_steps}: steps "
                       f"{cfg.schedule_steps + 1}-{cfg.steps} run at lr 0 (pass --schedule-steps {cfg.steps} "
                       "to stretch it)")


def _schedule(cfg: RunConfig) -> str:
    if cfg.schedule == "constant":
        return "constant"
    if cfg.schedule_seconds is None:
        return f"{cfg.schedule} over {cfg.schedule_steps} steps"
    return f"{cfg.schedule} over {cfg.schedule_steps} steps or {cfg.schedule_seconds:g} s of steps, whichever " \
           "ends first"


def _ended(cfg: RunConfig, log: steplog.Log, step: int | None = None) -> bool:
    """The run has done its steps, or its steps have used up the time budget (after `step`
    steps; default: all logged)."""
    step = len(log) if step is None else step
    return step >= cfg.steps or (cfg.time_budget is not None and sum(log.seconds[:step]) >= cfg.time_budget)


def _is_eval(cfg: RunConfig, step: int) -> bool:
    return step == 0 or step % cfg.eval_every == 0 or step == cfg.steps


def _is_checkpoint(cfg: RunConfig, step: int) -> bool:
    return step % cfg.checkpoint_every == 0 or step == cfg.steps


def _due(cfg: RunConfig, history: list[dict], logged: int) -> list[int]:
    """Evaluation points up to the last logged step that have no metrics row yet."""
    after = history[-1]["step"] if history else -1
    first = after + 1 + (-(after + 1)) % cfg.eval_every  # the first multiple of eval_every past `after`
    points = set(range(first, logged + 1, cfg.eval_every)) | ({cfg.steps} if after < cfg.steps <= logged else set())
    return sorted(points)


def _print_table(history: list[dict]) -> None:
    dev = "dev_accuracy" in history[0]
    logger.info(f"{'step':>7} {'train s':>9} {'wall s':>9} {'train loss':>10} {'eval acc':>9} {'eval loss':>9} "
                f"{'rows':>5}" + (f" {'dev acc':>8}" if dev else ""))
    for h in history:
        tl = "-" if h["train_loss"] is None else f"{h['train_loss']:.4f}"
        logger.info(f"{h['step']:>7} {h['train_seconds']:>9.1f} {h['wall_seconds']:>9.1f} {tl:>10} "
                    f"{h['eval_accuracy']:>9.4f} {h['eval_loss']:>9.4f} {h.get('eval_examples', ''):>5}"
                    + (f" {h['dev_accuracy']:>8.4f}" if dev else ""))
