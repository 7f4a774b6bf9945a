"""`ortzo federate`: MeZO on a simulated fleet through Flower's simulation engine.

N devices, each with its own shard of the task's training examples, take a round's MeZO steps
from the same weights and send only (seed, projected gradient) records; the server merges them
into one global step log and every device replays it, so all hold the same weights, checked by
hash every round. The run folder is an ordinary run (config.json, steps.jsonl, metrics by
round in rounds.csv): `ortzo eval DIR` and `ortzo bake DIR` replay it. The steps in all are
clients x rounds x steps per round, and the lr schedule spans them, as a single-device run of
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

from ..config import RECORDED, RunConfig
from ..errors import OrtzoError
from ..extras import require
from ..fleet.coordinator import ROUNDS, Coordinator
from ..fleet.plan import Fleet
from ..fleet.replica import Replica
from ..output import progress, silenced
from ..run.folder import RunFolder

logger = logging.getLogger(__name__)


def federate(cfg: RunConfig, fleet: Fleet, out: str | Path, resume: bool = False,
             round_timeout: float | None = None) -> dict[str, Any]:
    """Run (or with `resume`, continue) the fleet's rounds into the run folder `out`."""
    require("fleet", "ortzo federate")  # before anything is written
    with _environment_kept():  # from the imports on: Flower and Ray set variables as they load
        return _federate(cfg, fleet, out, resume, round_timeout)


def _federate(cfg: RunConfig, fleet: Fleet, out: str | Path, resume: bool, round_timeout: float | None
              ) -> dict[str, Any]:
    from flwr.simulation import run_simulation

    from ..fleet.flower import client_app, server_app, spec

    cfg = cfg.model_copy(update={"steps": fleet.steps}).resolved()
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
        logger.info(f"{fleet.clients} devices x {fleet.rounds} rounds x {fleet.per_round} step(s) "
                    f"({'IID' if fleet.alpha is None else f'Dirichlet {fleet.alpha:g}'} shards) on "
                    f"{cfg.task}; from round {co.round + 1}")
        with progress(total=fleet.rounds, initial=co.round, desc="rounds", unit="round") as bar, \
                silenced("flwr", level=logging.ERROR), warnings.catch_warnings():
            # Flower announces run_simulation's deprecation (for `flwr run`, docs/fleet.md) and Ray
            # its future defaults at every start: neither is the user's to act on
            warnings.filterwarnings("ignore", category=FutureWarning, module="ray")
            run_simulation(server_app(co, spec(cfg, fleet), round_timeout, lambda _: bar.update()), client_app(),
                           num_supernodes=fleet.clients,
                           backend_config={"client_resources": {"num_cpus": os.cpu_count() or 1},
                                           "init_args": {"logging_level": "ERROR"}})
        if co.round < fleet.rounds:
            raise OrtzoError(f"the fleet stopped after round {co.round} of {fleet.rounds}: "
                             f"ortzo federate ... --resume --out {run.path} continues it")
        last = co.rows[-1]
        logger.info(f"{ROUNDS}: {run.path / ROUNDS}; weights {last['weights_sha256'][:12]}... on every device")
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
