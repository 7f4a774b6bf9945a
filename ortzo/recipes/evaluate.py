"""`ortzo eval`: accuracy of a model folder as exported, or of a run's weights.

For a run folder every unset option comes from the run, so the result is measured on
exactly the run's evaluation set (same data, split, sample, prompt length). It reads the
run without taking its lock and writes nothing into it: safe while the run is live.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..config import RECORDED, EvalOptions, RunConfig
from ..engines.base import Engine, record_type
from ..errors import OrtzoError
from ..model.adapter import apply_adapter
from ..model.manifest import MANIFEST
from ..optim import steplog
from ..run import checkpoint
from ..run.folder import RunFolder
from ..tasks.objective import calibration, evaluate
from ..tasks.task import Task, load_task
from .setup import Setup, prepare


def open_weights(opts: EvalOptions) -> tuple[Setup, Engine, int]:
    """The setup `opts` ask for and an engine holding the weights to score: a model folder's
    as exported (step 0), or a run's after `opts.step` steps (default: all logged)."""
    path, run = Path(opts.path), RunFolder(opts.path)
    chosen = {k: v for k, v in opts.model_dump().items() if v is not None and k in RunConfig.model_fields}
    if (path / MANIFEST).is_file():
        if opts.task is None:
            raise OrtzoError("--task is required to evaluate a model folder")
        if opts.step is not None:
            raise OrtzoError("--step needs a run folder")
        cfg = RunConfig.build({"model": str(path)} | chosen)
        setup = prepare(cfg, load_task(cfg.task, cfg.template))
        store = setup.load_store()
        if opts.adapter is not None:
            apply_adapter(opts.adapter, store, path)
        engine, steps = setup.engine(store), 0
    elif opts.adapter is not None:
        raise OrtzoError("--adapter applies to a model folder (a run's own tensors are its weights)")
    elif run.holds_run():
        saved = run.read_config()
        recorded = saved.pop(RECORDED)
        cfg = RunConfig.from_saved(saved | chosen)
        task = Task.from_json(recorded["task"])
        if opts.task or opts.template:
            task = load_task(opts.task or task.name, opts.template)
        setup = prepare(cfg, task, recorded=recorded)
        setup.check_model(recorded, run.path)
        log = steplog.read(run.steps, record_type(cfg.engine))  # a torn tail (a live run mid-write) is left alone
        steps = len(log) if opts.step is None else opts.step
        engine = checkpoint.restore(run.path, log.records, steps, setup.load_store, setup.engine)
    else:
        raise OrtzoError(f"{path} is neither a trainable model folder nor a finetune run folder")
    return setup, engine, steps


def evaluate_path(opts: EvalOptions) -> dict[str, Any]:
    setup, engine, steps = open_weights(opts)
    cfg, offset = setup.cfg, None
    if opts.calibrate:
        if opts.calibrate > len(setup.splits.train):
            raise OrtzoError(f"--calibrate {opts.calibrate}: the training sample has "
                             f"{len(setup.splits.train)} rows")
        offset = calibration(engine.score, setup.encoder, setup.splits.train[:opts.calibrate], cfg.eval_batch_size)
    r = evaluate(engine.score, setup.encoder, setup.splits.eval, cfg.eval_batch_size, desc="eval", offset=offset)
    return {"task": setup.task.name, "steps": steps, "examples": len(setup.splits.eval)} | r
