"""`ortzo federate`: MeZO on a simulated fleet through Flower's simulation engine.

N devices, each with its own shard of the task's training examples, take a round's MeZO steps
from the same weights and send only (seed, projected gradient) records; the server merges them
into one global step log (fleet/plan.py: averaged per step, or appended) and every device
replays it, so all hold the same weights, checked by hash every round. The run folder is an
ordinary run (config.json, steps.jsonl, metrics by round in rounds.csv): `ortzo eval DIR` and
`ortzo bake DIR` replay it. The lr schedule spans the run's steps, as a single-device run of
that many steps would.
"""
from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import RECORDED, RunConfig, flag
from ..errors import OrtzoError
from ..extras import require
from ..fleet.coordinator import ROUNDS, Coordinator
from ..fleet.plan import Fleet
from ..fleet.replica import Replica
from ..output import progress, silenced
from ..run.folder import RunFolder

logger = logging.getLogger(__name__)


def settings(given: dict[str, Any], where: str = "") -> tuple[RunConfig, Fleet, float | None]:
    """The run's settings, the fleet and a round's deadline from one mapping of settings (the
    command line's, or a Flower app's run config)."""
    from ..config import FleetOptions

    if fixed := [flag(k) for k in ("steps", "time_budget", "engine") if k in given]:
        raise OrtzoError(f"{where}ortzo federate sets {', '.join(fixed)} itself: the steps are --rounds x "
                         "--steps-per-round (x --clients with --merge append), with the ort engine")
    o = FleetOptions.build({k: v for k, v in given.items() if k in FleetOptions.model_fields}, where)
    fleet = Fleet(o.clients, o.rounds, o.steps_per_round, o.alpha, o.eval_every_rounds, o.merge)
    cfg = RunConfig.build({k: v for k, v in given.items() if k not in FleetOptions.model_fields}, where)
    return cfg, fleet, o.round_timeout


def federate(cfg: RunConfig, fleet: Fleet, out: str | Path, resume: bool = False,
             round_timeout: float | None = None) -> dict[str, Any]:
    """Run (or with `resume`, continue) the fleet's rounds into the run folder `out` on Flower's
    simulation engine."""
    require("fleet", "ortzo federate")  # before anything is written
    with _environment_kept():  # from the imports on: Flower and Ray set variables as they load
        from flwr.simulation import run_simulation

        from ..fleet.flower import client_app, server_app, spec

        with fleet_run(cfg, fleet, out, resume) as (cfg, co), \
                progress(total=fleet.rounds, initial=co.round, desc="rounds", unit="round") as bar, \
                silenced("flwr", level=logging.ERROR), warnings.catch_warnings():
            # Flower announces run_simulation's deprecation (for `flwr run`, docs/fleet.md) and Ray
            # its future defaults at every start: neither is the user's to act on
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            run_simulation(server_app(co, spec(cfg, fleet), round_timeout, lambda _: bar.update()), client_app(),
                           num_supernodes=fleet.clients,
                           backend_config={"client_resources": {"num_cpus": os.cpu_count() or 1},
                                           "init_args": {"logging_level": "ERROR"}})
        return summary(co)


@contextmanager
def fleet_run(cfg: RunConfig, fleet: Fleet, out: str | Path, resume: bool) -> Iterator[tuple[RunConfig, Coordinator]]:
    """The run folder `out` opened for the fleet's rounds (locked; with `resume`, its recorded
    settings must be these): the run's settings as recorded, and the coordinator. Raises after
    the rounds if the fleet stopped before its last."""
    cfg = cfg.model_copy(update={"steps": fleet.steps}).resolved()
    if cfg.adaptive != "none":
        raise OrtzoError("--adaptive: a fleet's steps take the round's lr (each device would adapt it to its own "
                         "estimate); not supported by ortzo federate")
    if fleet.merge == "average" and cfg.estimator != "mezo":
        raise OrtzoError(f"--estimator {cfg.estimator} normalizes each device's update by its own losses, so "
                         "averaging the estimates is not its step: use --merge append")
    fleet.shares(cfg.batch_size, [1] * fleet.clients)  # the batch can be dealt out
    run = RunFolder(out)
    with run.locked(create=not resume):
        if resume:
            saved = run.read_config()
            recorded = saved.pop(RECORDED)
            if recorded.get("fleet") != asdict(fleet) or RunConfig.from_saved(saved, f"{run.config}: ") != cfg:
                raise OrtzoError(f"{run.path} is a fleet run with other settings; resume it with its own")
        else:
            run.check_new()
        server = Replica(cfg, fleet, None)  # checks every input before a write
        if not resume:
            run.write_config(cfg.model_dump() | {RECORDED: server.setup.recorded() | {"fleet": asdict(fleet)}})
        co = Coordinator(cfg, fleet, run.path, server)
        logger.info(f"{fleet.clients} devices x {fleet.rounds} rounds x {fleet.per_round} step(s), merged by "
                    f"{fleet.merge} ({'IID' if fleet.alpha is None else f'Dirichlet {fleet.alpha:g}'} shards) on "
                    f"{cfg.task}; from round {co.round + 1}")
        yield cfg, co
        if co.round < fleet.rounds:
            raise OrtzoError(f"the fleet stopped after round {co.round} of {fleet.rounds}: "
                             f"ortzo federate ... --resume --out {run.path} continues it")
        logger.info(f"{ROUNDS}: {run.path / ROUNDS}; weights {co.rows[-1]['weights_sha256'][:12]}... on every device")


def summary(co: Coordinator) -> dict[str, Any]:
    """What a finished fleet run prints: rounds, steps, the last accuracy and the weights' hash."""
    last = co.rows[-1]
    accuracy = last.get("eval_accuracy")  # a number, or text when the row was read back from rounds.csv
    return {"rounds": co.round, "steps": len(co.log), "eval_accuracy": float(accuracy) if accuracy else None,
            "weights_sha256": last["weights_sha256"]}


@contextmanager
def _environment_kept() -> Iterator[None]:
    """Ray and Flower set PYTHONPATH (to this process's whole sys.path), PYTHONBREAKPOINT and
    their own variables in the process's environment for their workers: put it back after, so
    the host's later child processes (another virtual environment's Python, say) get the
    environment they had."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
