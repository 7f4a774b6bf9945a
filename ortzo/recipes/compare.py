"""`ortzo compare`: the paper's experiment, measured. Under one memory budget and one time
budget, each arm (an engine, its settings, and the model it may use) trains for the time
budget with several seeds; the accuracy-vs-time curves of all runs go into one CSV and one
PNG (mean and spread per arm), and any run whose measured peak RSS exceeded the budget is
marked, so a claim like "MeZO fits a bigger model and wins after N minutes" is checked.

An arm gives `model` (taken as is) or `models` (candidates: the largest whose predicted peak
memory, by the memory model at the arm's batch size and prompt length, fits the budget).
Every run is a `ortzo finetune` child process of its own (its peak RSS is its own) in
OUT/<arm>/seed-<n>/; run again, `compare` resumes what is unfinished and redraws.

The x axis is the steps' seconds (`train_seconds`): evaluations are the experimenter's cost,
scheduled differently per arm, not the method's. `report_minutes` asks the user's question
instead: the accuracy on the whole evaluation split of the weights a run had after M minutes of
wall clock, evaluations on the way included. Those weights are rebuilt from the step log
(exact), evaluated after the run and cached in the run's marks.json.
"""
from __future__ import annotations

import csv
import io
import json
import logging
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


from .. import jsonl
from ..config import CompareSpec, EvalOptions, RunConfig
from ..engines.base import record_type
from ..errors import OrtzoError
from ..files import atomic_open, write_json
from ..memory import estimate, parse_size
from ..model.manifest import HF_CONFIG, MANIFEST, Manifest, hf_config
from ..optim import steplog
from ..output import progress
from ..run.folder import RunFolder
from ..run.plots import plot_compare
from .evaluate import evaluate_path
from .validate import frozen_base

logger = logging.getLogger(__name__)

COLUMNS = ("arm", "seed", "model", "engine", "step", "train_seconds", "wall_seconds", "eval_accuracy", "eval_loss",
           "peak_rss_mib", "over_budget")


def compare(spec: CompareSpec, out: Path) -> list[dict[str, Any]]:
    """Plan, run (or resume) every arm x seed, then write curves.csv, summary.csv and curves.png."""
    plan = _plan(spec)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "plan.json", {"spec": spec.model_dump(), "arms": plan})
    runs = [(arm, seed) for arm in plan for seed in spec.seeds]
    for arm, seed in progress(runs, desc="compare", unit="run", dynamic_ncols=True):
        _run(out / arm / f"seed-{seed}", plan[arm]["settings"] | {"seed": seed})
    rows = _curves(out, plan, spec)
    with atomic_open(out / "curves.csv", "w") as f:
        f.write(_csv(rows, COLUMNS))
    marks = {(arm, seed): _marks(out / arm / f"seed-{seed}", spec.report_minutes) for arm, seed in runs}
    summary = _summary(rows, plan, spec, marks)
    with atomic_open(out / "summary.csv", "w") as f:
        f.write(_csv(summary, tuple(summary[0])))
    drawn = plot_compare(rows, out / "curves.png", title=f"{spec.title}: memory budget {spec.memory_budget}, "
                 f"{round(spec.time_budget / 60, 1):g} min of steps per run")
    for s in summary:
        print(" ".join(f"{k}={v}" for k, v in s.items()))
    logger.info(f"wrote {out / 'curves.csv'}, {out / 'summary.csv'}" + f", {out / 'curves.png'}" * drawn)
    return summary


def wall_step(seconds: list[float], history: list[dict[str, Any]], limit: float) -> int:
    """How many steps a run had done when its wall clock (its steps' seconds and the
    evaluations before them: the one after step k runs before step k + 1) last stood at or
    under `limit` seconds."""
    n, wall = 0, 0.0
    evals = {}
    for h in history:
        evals[h["step"]] = evals.get(h["step"], 0.0) + h["eval_seconds"]
    while n < len(seconds):
        wall += evals.get(n, 0.0) + seconds[n]
        if wall > limit:
            break
        n += 1
    return n


def _marks(folder: Path, minutes: list[float]) -> dict[float, dict[str, Any]]:
    """Per mark: the step reached then and the whole evaluation split's accuracy there."""
    if not minutes:
        return {}
    run = RunFolder(folder)
    cache_file = folder / "marks.json"
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    engine = run.read_config().get("engine", "ort")
    seconds = steplog.read(run.steps, record_type(engine)).seconds
    history, _ = jsonl.read(run.metrics)
    full = max(h["eval_examples"] for h in history)
    out = {}
    for m in minutes:
        n = wall_step(seconds, history, m * 60)
        if str(n) not in cache:
            done = [h for h in history if h["step"] == n and h["eval_examples"] == full]
            cache[str(n)] = done[0]["eval_accuracy"] if done else \
                evaluate_path(EvalOptions.build({"path": str(folder), "step": n}))["accuracy"]
            write_json(cache_file, cache)
        out[m] = {"step": n, "accuracy": cache[str(n)]}
    return out


def _plan(spec: CompareSpec) -> dict[str, dict[str, Any]]:
    """Each arm's settings with its model chosen; every arm's settings validated up front."""
    budget = parse_size(spec.memory_budget)
    plan = {}
    for arm, given in spec.arms.items():
        given = spec.common | given
        settings = {k: v for k, v in given.items() if k != "models"} | {"time_budget": spec.time_budget}
        candidates = [given["model"]] if "model" in given else list(given.get("models", []))
        if not candidates:
            raise OrtzoError(f"arm {arm!r}: give a model or a list of candidate models")
        cfg = RunConfig.build(settings | {"model": candidates[0]}, f"arm {arm!r}: ")
        if "model" in given and not Path(given["model"], HF_CONFIG).is_file() and Path(given["model"], MANIFEST).is_file():
            predicted = {given["model"]: None}  # a prepared app model (an onnxruntime-genai folder): no architecture
        else:
            predicted = {m: estimate(hf_config(m), cfg.batch_size, cfg.max_length, method=_method(cfg),
                                     optimizer=cfg.optimizer, checkpoint_fraction=cfg.checkpoint_fraction,
                                     **(frozen_base(Manifest.load(m)) if Path(m, MANIFEST).is_file() else {})).total
                         for m in candidates}
        fitting = [m for m in candidates if "model" in given or predicted[m] <= budget]
        if not fitting:
            raise OrtzoError(f"arm {arm!r}: no candidate fits {spec.memory_budget} (predicted: "
                             + ", ".join(f"{m} {b / 2**30:.2f} GiB" for m, b in predicted.items()) + ")")
        model = max(fitting, key=lambda m: _parameters(m))
        plan[arm] = {"model": model, "predicted_peak_bytes": predicted[model],
                     "settings": settings | {"model": str(Path(model).resolve())}}
    return plan


def _method(cfg: RunConfig) -> str:
    return {"ort": "ort-mezo", "torch-mezo": "torch-mezo", "torch-bp": "bp"}[cfg.engine]


def _parameters(model: str) -> int:
    return sum(p.size for p in Manifest.load(model).parameters)


def _run(folder: Path, settings: dict[str, Any]) -> None:
    """Start or resume one run in a child process; its output goes to <folder>.log."""
    if RunFolder(folder).holds_run():
        argv = ["finetune", "--resume", "--out", str(folder)]
    else:
        folder.parent.mkdir(parents=True, exist_ok=True)
        spec = folder.parent / f"{folder.name}.json"
        write_json(spec, settings)
        argv = ["finetune", "--config", str(spec), "--out", str(folder)]
    with open(folder.parent / f"{folder.name}.log", "a") as log, _sigterm_raises(), \
            subprocess.Popen([sys.executable, "-m", "ortzo.cli", *argv], stdout=log, stderr=subprocess.STDOUT) as child:
        try:
            code = child.wait()
        except BaseException:  # Ctrl-C or `kill`: the run stops with compare instead of training on, orphaned
            child.terminate()
            child.wait()
            raise
    if code:
        raise OrtzoError(f"run {folder} failed (exit {code}); see {folder.parent / (folder.name + '.log')}")


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises SystemExit here, so that `finally` and `except` clauses run; Python's default dies at once."""
    def stop(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _curves(out: Path, plan: dict[str, dict[str, Any]], spec: CompareSpec) -> list[dict[str, Any]]:
    budget_mib = parse_size(spec.memory_budget) / 2**20
    rows = []
    for arm, p in plan.items():
        for seed in spec.seeds:
            history, _ = jsonl.read(RunFolder(out / arm / f"seed-{seed}").metrics)
            peak = max((h.get("peak_rss_mib", 0) for h in history), default=0)
            for h in history:
                rows.append({"arm": arm, "seed": seed, "model": Path(p["model"]).name,
                             "engine": p["settings"].get("engine", "ort")} |
                            {k: h.get(k) for k in COLUMNS[4:-1]} | {"over_budget": peak > budget_mib})
    return rows


def _summary(rows: list[dict[str, Any]], plan: dict[str, dict[str, Any]], spec: CompareSpec,
             marks: dict[tuple[str, int], dict[float, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per arm: zero-shot and final accuracy (mean and standard deviation over seeds), steps,
    seconds per step, the accuracy at each wall-clock mark (median, min, max), the largest
    measured peak RSS against the inference peak and the predicted one."""
    import numpy as np

    out = []
    for arm, p in plan.items():
        runs = [[r for r in rows if r["arm"] == arm and r["seed"] == s] for s in spec.seeds]
        first = np.array([r[0]["eval_accuracy"] for r in runs])
        last = np.array([r[-1]["eval_accuracy"] for r in runs])
        out.append({"arm": arm, "model": Path(p["model"]).name, "engine": runs[0][0]["engine"], "seeds": len(runs),
                    "zero_shot": round(float(first.mean()), 4), "final_mean": round(float(last.mean()), 4),
                    "final_std": round(float(last.std(ddof=1)) if len(last) > 1 else 0.0, 4),
                    "steps_mean": round(float(np.mean([r[-1]["step"] for r in runs])), 1),
                    "s_per_step": round(float(np.mean([r[-1]["train_seconds"] / max(r[-1]["step"], 1)
                                                       for r in runs])), 3)}
                   | {f"acc_{m:g}min_{name}": round(float(f([marks[arm, s][m]["accuracy"] for s in spec.seeds])), 4)
                      for m in spec.report_minutes for name, f in (("median", np.median), ("min", min), ("max", max))}
                   | {"peak_rss_mib": round(max(r[-1]["peak_rss_mib"] or 0 for r in runs)),
                      # the run's peak over its first (untrained, whole-split) evaluation's: inference
                      "peak_vs_inference": round(max((r[-1]["peak_rss_mib"] or 0) / (r[0]["peak_rss_mib"] or 1)
                                                     for r in runs), 3),
                      "predicted_mib": round(p["predicted_peak_bytes"] / 2**20) if p["predicted_peak_bytes"] else None,
                      "over_budget": any(r[0]["over_budget"] for r in runs)})
    return out


def _csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns)
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()
