"""The fleet as a Flower app, for Flower's deployment engine (`flwr run`, docs/fleet.md).

`server` and `client` are the components a Flower app names in its pyproject.toml
(examples/fleet/). The ServerApp reads `ortzo federate`'s options from the run config (the
same names, `-` or `_`; an empty string keeps a default; `out` is the run folder and `resume`
continues it) and runs the rounds the simulation engine runs, against the SuperNodes that
connect to its SuperLink.
"""
from __future__ import annotations

import logging
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from ..errors import OrtzoError
from ..recipes.federate import fleet_run, settings, summary
from .flower import client_app, serve, spec

logger = logging.getLogger(__name__)
client = client_app()
server = ServerApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    given: dict[str, Any] = {k.replace("-", "_"): v for k, v in context.run_config.items() if v != ""}
    if "out" not in given:
        raise OrtzoError("run config: `out`, the run folder, is required")
    out, resume = given.pop("out"), given.pop("resume", False)
    if not isinstance(resume, bool):
        raise OrtzoError(f"run config: `resume` is true or false, not {resume!r}")
    cfg, fleet, timeout = settings(given, "run config: ")
    with fleet_run(cfg, fleet, out, resume) as (cfg, co):
        serve(grid, co, spec(cfg, fleet), timeout, lambda rnd: logger.info(f"round {rnd} of {fleet.rounds}"))
    logger.info(f"done: {summary(co)}")
