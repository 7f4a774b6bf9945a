"""One engine's training steps on a random batch, in a process of its own: the step time and
the peak RSS that `ortzo bench --engines`, `ortzo bench --memory` (beside forwards alone) and
`ortzo memory --validate` report.

A process's peak RSS is the high-water mark of everything it did, so each measurement that
reports one runs alone in a child (`python -m ortzo.recipes.measure ...`, one JSON line out).
Timings that are compared with each other are taken in one process, interleaved (`interleaved`).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..engines import open_engine
from ..engines.base import Engine
from ..model.manifest import Manifest
from ..model.session import ScoringSession
from ..model.targets import Target, load_target
from ..model.tokenizer import Tokenizer
from ..model.weights import WeightStore
from ..tasks.batches import Batch

LR = 1e-7  # the timed steps' lr: the weights barely move, so every step costs what a training step costs


def random_batch(batch_size: int, seq_len: int, vocab: int, seed: int = 0) -> Batch:
    """Full rows of random ids (no padding: the shape is what costs), two candidates scored at
    the last position; timing and memory do not depend on the ids."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(10, vocab, size=(batch_size, seq_len))
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids),
             "position_ids": np.tile(np.arange(seq_len), (batch_size, 1)),
             "score_index": np.arange(batch_size) * seq_len + seq_len - 1,
             "score_ids": np.tile(np.array([11, 12]), (batch_size, 1))}
    return Batch(feeds, rng.integers(0, 2, size=batch_size))


def engine_on(model: Path, engine: str, batch: Batch, variant: Target | None = None, **settings: Any) -> Engine:
    """An engine over all of `model`'s parameters (those `settings` choose, if they name
    `params`), stepping on `batch` (at LR); `variant`: a target that no file holds, in place
    of the settings' target."""
    cfg = RunConfig.build({"model": str(model), "task": "sst2", "engine": engine, "lr": LR} | settings)
    cfg = cfg.resolved()
    manifest = Manifest.load(model)
    store = WeightStore.load(model, manifest)
    names = store.select(cfg.include, cfg.exclude, vectors=cfg.params == "vectors") if "params" in settings \
        else [p.name for p in manifest.parameters]
    return open_engine(cfg, model, store, names, variant or load_target(cfg.target), lambda _: batch)


def steps(model: Path, engine: str, batch_size: int, seq_len: int, n: int, **settings: Any) -> dict[str, float]:
    """`n` steps after one warm-up step: the median step seconds and the process's peak RSS."""
    vocab = vocab_size(model)
    e = engine_on(model, engine, random_batch(batch_size, seq_len, vocab), **settings)
    e.step(0, LR)
    times = []
    for k in range(1, n + 1):
        t = time.perf_counter()
        e.step(k, LR)
        times.append(time.perf_counter() - t)
    return {"step_s": statistics.median(times), "peak_rss_mib": peak_rss_mib()}


def forwards(model: Path, target: str, batch_size: int, seq_len: int, n: int) -> dict[str, float]:
    """Inference alone, to set beside `steps`: `n` forwards after a warm-up one through the
    session a run uses, nothing trained; the median seconds and the process's peak RSS."""
    batch = random_batch(batch_size, seq_len, vocab_size(model))
    store = WeightStore.load(model, Manifest.load(model))
    session = ScoringSession(model, store, load_target(target))
    session(batch.feeds)
    times = []
    for _ in range(n):
        t = time.perf_counter()
        session(batch.feeds)
        times.append(time.perf_counter() - t)
    return {"forward_s": statistics.median(times), "peak_rss_mib": peak_rss_mib()}


def forwards_in_turn(models: list[Path], batch_size: int, seq_len: int, n: int) -> dict[str, float]:
    """Median forward seconds of each folder's scoring session (folders of one model: say fp32
    and a frozen int4 base), timed in turn (A B A B ...) in this process on one batch."""
    batch = random_batch(batch_size, seq_len, vocab_size(models[0]))
    sessions = {str(m): ScoringSession(m, WeightStore.load(m, Manifest.load(m)), load_target("cpu")) for m in models}
    return _in_turn({name: lambda _, s=s: s(batch.feeds) for name, s in sessions.items()}, n)


def interleaved(model: Path, engines: list[str], batch_size: int, seq_len: int, n: int) -> dict[str, float]:
    """Median step seconds of each engine, timed in turn (A B C A B C ...) in this process, so
    that a drift of the machine's speed touches every engine alike."""
    batch = random_batch(batch_size, seq_len, vocab_size(model))
    return _in_turn(_steps({name: engine_on(model, name, batch) for name in engines}), n)


def graph_formats(model: Path, target: str, formats: list[str], batch_size: int, seq_len: int,
                  n: int) -> dict[str, float]:
    """Median step seconds of the ORT engine on each graph format (`model.onnx`, `model.ort`)
    under one target's providers and session options, timed in turn in this process."""
    batch, base = random_batch(batch_size, seq_len, vocab_size(model)), load_target(target)
    return _in_turn(_steps({f: engine_on(model, "ort", batch, variant=replace(base, format=f)) for f in formats}), n)


def _steps(engines: dict[str, Engine]) -> dict[str, Callable[[int], object]]:
    """Each engine's step k at LR, as `_in_turn` calls it."""
    return {name: lambda k, e=e: e.step(k, LR) for name, e in engines.items()}


def _in_turn(calls: dict[str, Callable[[int], object]], n: int) -> dict[str, float]:
    """One warm-up call each (k = 0), then `n` rounds of one call each (A B A B ...): median seconds."""
    for call in calls.values():
        call(0)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for k in range(1, n + 1):
        for name, call in calls.items():
            t = time.perf_counter()
            call(k)
            times[name].append(time.perf_counter() - t)
    return {name: statistics.median(t) for name, t in times.items()}


def in_child(*args: Any, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python -m ortzo.recipes.measure ARGS` (with `env` added to the environment) and
    return its JSON line."""
    out = subprocess.run([sys.executable, "-m", "ortzo.recipes.measure", *map(str, args)], capture_output=True,
                         text=True, env=os.environ | (env or {}))
    if out.returncode:
        raise RuntimeError(f"measurement {' '.join(map(str, args))} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def peak_rss_mib() -> float:
    """This process's peak resident set size since it started its program: Linux's VmHWM.
    (`getrusage`'s ru_maxrss is no good for a child: Linux carries the parent's peak into it
    at exec, so a child of a big process would report the parent's size.)"""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / (1024 if sys.platform == "darwin" else 1)


def vocab_size(model: Path) -> int:
    return Tokenizer(model, Manifest.load(model).tokenizer).backend.get_vocab_size()


if __name__ == "__main__":
    what, model, *rest = sys.argv[1:]
    if what == "steps":
        engine, b, s, n, settings = rest
        result = steps(Path(model), engine, int(b), int(s), int(n), **json.loads(settings))
    elif what == "forwards":
        target, b, s, n = rest
        result = forwards(Path(model), target, int(b), int(s), int(n))
    elif what == "bases":
        b, s, n, *others = rest
        result = forwards_in_turn([Path(model), *map(Path, others)], int(b), int(s), int(n))
    elif what == "formats":
        target, b, s, n, *formats = rest
        result = graph_formats(Path(model), target, formats, int(b), int(s), int(n))
    else:
        b, s, n, *names = rest
        result = interleaved(Path(model), names, int(b), int(s), int(n))
    print(json.dumps(result))
