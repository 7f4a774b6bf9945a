"""Fault injection: kill -9 a tiny run at random moments (in a step, in an evaluation, in a
log append, in a checkpoint write, after a rename, or at a random time), resume it each time,
and compare with an uninterrupted run: the same weights, step log and metrics.

ORTZO_KILLS sets how many kills (default 10; the README quotes a run with 200)."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

from ortzo.cli import main

HARNESS = Path(__file__).with_name("crash.py")
ARGS = ["--task", "sst2", "--steps", "10", "--batch-size", "8", "--lr", "5e-3", "--eval-every", "3",
        "--checkpoint-every", "2", "--train-examples", "48", "--dev-examples", "8", "--eval-examples", "16",
        "--schedule", "linear"]
SITES = {"forward": 40, "append": 16, "checkpoint": 6, "rename": 10, "timer": None}
TIMES = ("seconds", "train_seconds", "wall_seconds", "eval_seconds", "peak_rss_mib")  # vary per process


def _state(run: Path) -> dict:
    """What must not differ: final weights, step records and metrics (timings aside), leftovers."""
    def rows(name):
        return [{k: v for k, v in json.loads(line).items() if k not in TIMES}
                for line in (run / name).read_text().splitlines()]
    return {"weights": (run / "checkpoints" / "step-0000010" / "weights.bin").read_bytes(),
            "steps": rows("steps.jsonl"), "metrics": rows("metrics.jsonl"),
            "checkpoints": sorted(p.name for p in (run / "checkpoints").iterdir()),
            "leftovers": sorted(p.name for p in run.rglob(".*.tmp"))}


def _attempt(argv: list[str], site: str, n: int, rng: random.Random) -> int:
    if site != "timer":
        return subprocess.run([sys.executable, str(HARNESS), site, str(n), *argv], capture_output=True).returncode
    p = subprocess.Popen([sys.executable, str(HARNESS), "none", "0", *argv], stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        return p.wait(timeout=rng.uniform(0.5, 6.0))
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


def test_kill_9_anywhere_then_resume_equals_an_uninterrupted_run(tiny_model, tiny_data, tmp_path):
    kills_wanted = int(os.environ.get("ORTZO_KILLS", "10"))
    fresh = ["finetune", str(tiny_model), "--data", str(tiny_data), *ARGS]
    assert main([*fresh, "--out", str(tmp_path / "reference")]) == 0
    reference = _state(tmp_path / "reference")
    rng = random.Random(int(os.environ.get("ORTZO_KILL_SEED", "0")))
    kills, episodes, differences, where = 0, 0, [], {}
    t0 = time.perf_counter()
    while kills < kills_wanted:
        run = tmp_path / f"run{episodes}"
        episodes += 1
        for attempt in range(200):
            argv = ["finetune", "--resume", "--out", str(run)] if (run / "config.json").exists() \
                else [*fresh, "--out", str(run)]
            site = rng.choice(list(SITES)) if kills < kills_wanted else "none"
            rc = _attempt(argv, site, rng.randint(1, SITES.get(site) or 1), rng)
            if rc == 0:
                break
            assert rc == -9, f"{site}: exit {rc}"
            kills += 1
            where[site] = where.get(site, 0) + 1
        else:
            raise AssertionError("the run never finished")
        state = _state(run)
        differences += [f"{run.name}: {k}" for k in reference if state[k] != reference[k]]
    print(f"{kills} kills ({', '.join(f'{k} {v}' for k, v in sorted(where.items()))}) in {episodes} runs, "
          f"{len(differences)} differences, {time.perf_counter() - t0:.0f} s")
    assert not differences, differences
