"""The fleet on Flower: a ServerApp that runs the coordinator's rounds and a ClientApp that
keeps a device's replica, talking in Flower messages (one ConfigRecord each way).

Down (server to device, message type "train"): the round, the global log's records from the
device's position on (`from`), the hash the weights must have after them, the device's slots
and the round's lr; on first contact also the run's settings (`run`), from which the device
builds its replica and its shard. Up: the hash after replaying, its new records and its example
count. A device whose position differs from `from` (it restarted and lost its replica) answers
`need` with its own position and gets the records from there in the next round; one whose hash
differs from the server's (another model or version) is refused for the rest of the run. After
the last round a "query" message brings every device to the final weights and collects its hash.

Flower calls the ClientApp once per message: the simulation engine in a process that lives
across messages, a SuperNode in a new process each time. So a device keeps its replica in this
process (keyed by run and partition) and, for the next process, its position and trained
tensors in the run's `Context.state`, which the SuperNode keeps between messages. Its partition
is `partition-id` in the node config (the simulation engine sets it; a SuperNode takes
`--node-config "partition-id=K"`); `model` and `data` there name the device's own copies.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp

from ..config import RunConfig
from ..errors import OrtzoError
from .coordinator import Coordinator, decode, encode
from .plan import Fleet
from .replica import Replica

logger = logging.getLogger(__name__)
KEY = "fleet"  # the one record of every message; in a device's state, its settings and position
TENSORS = "fleet-tensors"  # in a device's state: its trained tensors
_REPLICAS: dict[tuple[int, int], Replica] = {}  # (run id, partition id) -> this process's replica


def spec(cfg: RunConfig, fleet: Fleet) -> str:
    """What a device needs to build its replica: the run's settings and the fleet's."""
    return json.dumps({"cfg": cfg.model_dump(), "fleet": asdict(fleet)})


def client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _reply(msg, context, probe=True)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _reply(msg, context, probe=False)

    return app


def _device(msg: Message, context: Context) -> Replica | None:
    """This device's replica: this process's, or one rebuilt from the run's state on this
    device, or one built from the run spec in the message (None: neither, so the server must
    send the spec)."""
    partition = int(context.node_config.get("partition-id", 0))
    key = (msg.metadata.run_id, partition)
    if key in _REPLICAS:
        return _REPLICAS[key]
    c, state = msg.content[KEY], context.state
    run_spec = str(c["run"]) if "run" in c else str(state[KEY]["run"]) if KEY in state else None
    if run_spec is None:
        return None
    s = json.loads(run_spec)
    own = {k: context.node_config[k] for k in ("model", "data") if k in context.node_config}
    replica = Replica(RunConfig.build(s["cfg"] | own), Fleet(**s["fleet"]), partition)
    if "run" not in c:  # where this device's previous process left off
        for b, saved in zip(replica.engine.buffers, state[TENSORS].to_numpy_ndarrays(), strict=True):
            np.copyto(b, saved)
        replica.replayed = int(state[KEY]["replayed"])
    state[KEY] = ConfigRecord({"run": run_spec, "replayed": replica.replayed})
    _REPLICAS[key] = replica
    return replica


def _reply(msg: Message, context: Context, probe: bool) -> Message:
    c, replica = msg.content[KEY], _device(msg, context)
    if replica is None or replica.replayed != int(c["from"]):
        return Message(RecordDict({KEY: ConfigRecord({"need": replica.replayed if replica else 0})}), reply_to=msg)
    replica.catch_up(decode(str(c["records"])))
    sha = replica.sha256()
    # never probe from weights the fleet does not share: the server refuses this device
    records = replica.probe([int(s) for s in c["slots"]], float(c["lr"])) if probe and sha == c["sha256"] else []
    context.state[KEY]["replayed"] = replica.replayed
    context.state[TENSORS] = ArrayRecord(numpy_ndarrays=list(replica.engine.buffers))
    return Message(RecordDict({KEY: ConfigRecord({"round": int(c["round"]), "sha256": sha, "records": encode(records),
                                                   "examples": replica.examples})}), reply_to=msg)


def server_app(coordinator: Coordinator, run_spec: str, timeout: float | None, progress) -> ServerApp:
    """The ServerApp for `coordinator`'s run, for the simulation engine (serve())."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, coordinator, run_spec, timeout, progress)

    return app


def serve(grid: Grid, co: Coordinator, run_spec: str, timeout: float | None,
          progress: Callable[[int], None]) -> None:
    """The run's remaining rounds on `grid` (its devices: the simulation's or a SuperLink's),
    then the final query; `timeout`: a round's deadline in seconds (a device that misses it is
    left out of the round); `progress(round)` after each round."""
    fleet = co.fleet
    _wait_for(grid, fleet.clients)
    position: dict[int, int | None] = {}  # records each device holds; None: not yet sent the run spec
    refused: set[int] = set()  # devices that hold other weights
    sha = co.replica.sha256()  # of the global weights: once a round (a full-parameter run hashes all its weights)
    for rnd in range(co.round, fleet.rounds):
        t = time.perf_counter()
        nodes = _devices(grid, fleet, refused)
        sent = [_message(co, rnd, k, node, position.setdefault(node, None), sha, run_spec, "train")
                for k, node in enumerate(nodes)]
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        answers = _answers(co, replies, nodes, position, sha, refused)
        if not answers:
            raise OrtzoError(f"no device answered round {rnd + 1}")
        merged = co.merge({k: decode(str(c["records"])) for k, c in answers.items()},
                          {k: int(c["examples"]) for k, c in answers.items()})
        co.commit(merged, time.perf_counter() - t)
        sha = co.replica.sha256()
        scores = co.evaluate(rnd)
        co.finish_round({"round": rnd + 1, "clients": len(answers), "bytes_down": _bytes(sent),
                         "bytes_up": _bytes(replies), "weights_sha256": sha, "steps": len(co.log),
                         "seconds": round(time.perf_counter() - t, 3), **scores})
        progress(rnd + 1)
    nodes = _devices(grid, fleet, refused)
    final = [_message(co, fleet.rounds, k, node, position.setdefault(node, None), sha, run_spec, "query")
             for k, node in enumerate(nodes)]
    answered = _answers(co, list(grid.send_and_receive(final, timeout=timeout)), nodes, position, sha, refused)
    if len(answered) < len(nodes):
        logger.warning(f"note: {len(nodes) - len(answered)} of {len(nodes)} devices did not confirm the final "
                       "weights (they catch up when they next join)")


def _wait_for(grid: Grid, clients: int, seconds: float = 300.0) -> None:
    deadline = time.monotonic() + seconds
    while len(grid.get_node_ids()) < clients:
        if time.monotonic() > deadline:
            raise OrtzoError(f"{len(grid.get_node_ids())} of {clients} devices connected within {seconds:.0f} s")
        time.sleep(0.2)


def _devices(grid: Grid, fleet: Fleet, refused: set[int]) -> list[int]:
    """The round's devices: every connected one not refused (a device that left drops out, one
    that joined or came back takes part); with "append", whose slots are per device, at most
    `clients` of them."""
    nodes = sorted(set(grid.get_node_ids()) - refused)
    return nodes[:fleet.clients] if fleet.merge == "append" else nodes


def _message(co: Coordinator, rnd: int, k: int, node: int, at: int | None, sha: str, run_spec: str,
             kind: str) -> Message:
    start = at or 0
    content: dict[str, Any] = {"round": rnd, "from": start, "records": encode(co.log.records[start:]),
                               "sha256": sha, "slots": co.fleet.slots(rnd, k) if kind == "train" else [],
                               "lr": co.lr(rnd) if kind == "train" else 0.0}
    if at is None:
        content["run"] = run_spec
    return Message(RecordDict({KEY: ConfigRecord(content)}), dst_node_id=node, message_type=kind)


def _answers(co: Coordinator, replies: list[Message], nodes: list[int], position: dict[int, int | None], sha: str,
             refused: set[int]) -> dict[int, ConfigRecord]:
    """The replies of devices that hold the global weights, by device index; positions updated.
    A new device that holds other weights after replaying the log (another model or version) is
    refused for the rest of the run; one that held the fleet's weights before and no longer
    does stops the run (its weights diverged: the output contract is one hash a round)."""
    answered = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if node not in nodes:  # a reply to another round's message
            continue
        if reply.has_error():
            logger.warning(f"note: device {node} failed this round: {reply.error.reason.strip().splitlines()[-1]}")
            continue
        c = reply.content[KEY]
        if "need" in c:  # it lost its replica, or replayed a round's message too late: from its own position
            logger.warning(f"note: device {node} holds {int(c['need'])} of the log's {len(co.log)} steps, not the "
                           f"{position.get(node) or 0} this server counted: it catches up next round")
            position[node] = int(c["need"]) or None
            continue
        if c["sha256"] != sha and position.get(node) is not None:  # it held the fleet's weights before
            raise OrtzoError(f"device {node} diverged: after replaying the global log it holds weights "
                             f"{str(c['sha256'])[:12]}..., the fleet {sha[:12]}... (the run can resume)")
        if c["sha256"] != sha:
            refused.add(node)
            logger.warning(f"note: device {node} refused: after replaying the global log it holds weights "
                           f"{str(c['sha256'])[:12]}..., the fleet {sha[:12]}... (another model or version)")
            continue
        position[node] = len(co.log)
        answered[nodes.index(node)] = c
    return answered


def _bytes(messages: list[Message]) -> int:
    """What the messages take on the wire: their protobuf encoding, metadata included."""
    return sum(message_to_proto(m).ByteSize() for m in messages)
