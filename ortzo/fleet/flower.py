"""The fleet on Flower: a ServerApp that runs the coordinator's rounds and a ClientApp that
keeps a device's replica, talking in Flower messages (one ConfigRecord each way).

Down (server to device, message type "train"): the round, the global log's records from the
device's position on (`from`), the hash the weights must have after them, the device's slots
and the round's lr; on first contact also the run's settings (`run`), from which the device
builds its replica and its shard. Up: the hash after replaying, and its new records. A device
whose position differs from `from` (it restarted and lost its replica) answers `need` with its
own position and gets the records from there in the next round. After the last round a
"query" message brings every device to the final weights and collects its hash.

Flower's ClientApp is called once per message; the replica lives across messages in the
device's process, keyed by run and partition (`partition-id` in the node config, which the
simulation engine sets and a SuperNode takes as `--node-config "partition-id=K"`).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict
from typing import Any

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.serde import message_to_proto
from flwr.serverapp import Grid, ServerApp

from ..config import RunConfig
from ..errors import OrtzoError
from .coordinator import Coordinator, decode, encode
from .plan import Fleet
from .replica import Replica

logger = logging.getLogger(__name__)
KEY = "fleet"  # the one record of every message
_REPLICAS: dict[tuple[int, int], Replica] = {}  # (run id, partition id) -> this process's replica


def spec(cfg: RunConfig, fleet: Fleet) -> str:
    """What a device needs to build its replica: the run's settings and the fleet's."""
    return json.dumps({"cfg": cfg.model_dump(), "fleet": asdict(fleet)})


def client_app() -> ClientApp:
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        return _reply(msg, _device(msg, context), probe=True)

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        return _reply(msg, _device(msg, context), probe=False)

    return app


def _device(msg: Message, context: Context) -> Replica | None:
    """This device's replica: the cached one, or one built from the run spec (None: no spec
    in the message, so the server must send it)."""
    c = msg.content[KEY]
    partition = int(context.node_config.get("partition-id", 0))
    key = (msg.metadata.run_id, partition)
    if key not in _REPLICAS and "run" in c:
        s = json.loads(str(c["run"]))
        _REPLICAS[key] = Replica(RunConfig.build(s["cfg"]), Fleet(**s["fleet"]), partition)
    return _REPLICAS.get(key)


def _reply(msg: Message, replica: Replica | None, probe: bool) -> Message:
    c = msg.content[KEY]
    if replica is None or replica.replayed != int(c["from"]):
        return Message(RecordDict({KEY: ConfigRecord({"need": replica.replayed if replica else 0})}), reply_to=msg)
    replica.catch_up(decode(str(c["records"])))
    sha = replica.sha256()
    if sha != c["sha256"]:  # never probe from weights the fleet does not share
        raise OrtzoError(f"after replaying the global log this device holds {sha[:12]}..., the server "
                         f"{str(c['sha256'])[:12]}...: another model or version")
    records = replica.probe([int(s) for s in c["slots"]], float(c["lr"])) if probe else []
    return Message(RecordDict({KEY: ConfigRecord({"round": int(c["round"]), "sha256": sha,
                                                   "records": encode(records)})}), reply_to=msg)


def server_app(coordinator: Coordinator, run_spec: str, timeout: float | None, progress) -> ServerApp:
    """The ServerApp for `coordinator`'s run; `timeout`: a round's deadline in seconds (a
    device that misses it is left out of the round); `progress(round)` after each round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        _serve(grid, coordinator, run_spec, timeout, progress)

    return app


def _serve(grid: Grid, co: Coordinator, run_spec: str, timeout: float | None, progress) -> None:
    fleet = co.fleet
    nodes = _wait_for(grid, fleet.clients)
    position: dict[int, int | None] = dict.fromkeys(nodes)  # None: not yet sent the run spec
    sha = co.replica.sha256()  # of the global weights: once a round (a full-parameter run hashes all its weights)
    for rnd in range(co.round, fleet.rounds):
        t = time.perf_counter()
        sent = [_message(co, rnd, k, node, position[node], sha, run_spec, "train") for k, node in enumerate(nodes)]
        replies = list(grid.send_and_receive(sent, timeout=timeout))
        probes = {k: decode(str(c["records"])) for k, c in _answers(co, replies, nodes, position).items()}
        merged = co.merge(probes)
        co.commit(merged, time.perf_counter() - t)
        sha = co.replica.sha256()
        scores = co.evaluate(rnd)
        co.finish_round({"round": rnd + 1, "clients": len(probes), "bytes_down": _bytes(sent),
                         "bytes_up": _bytes(replies), "weights_sha256": sha, "steps": len(co.log),
                         "seconds": round(time.perf_counter() - t, 3), **scores})
        progress(rnd + 1)
    final = [_message(co, fleet.rounds, k, node, position[node], sha, run_spec, "query")
             for k, node in enumerate(nodes)]
    answered = _answers(co, list(grid.send_and_receive(final, timeout=timeout)), nodes, position)
    if len(answered) < len(nodes):
        logger.warning(f"note: {len(nodes) - len(answered)} of {len(nodes)} devices did not confirm the final "
                       "weights (they catch up when they next join)")


def _wait_for(grid: Grid, clients: int, seconds: float = 300.0) -> list[int]:
    deadline = time.monotonic() + seconds
    while len(nodes := sorted(grid.get_node_ids())) < clients:
        if time.monotonic() > deadline:
            raise OrtzoError(f"{len(nodes)} of {clients} devices connected within {seconds:.0f} s")
        time.sleep(0.2)
    return nodes[:clients]


def _message(co: Coordinator, rnd: int, k: int, node: int, at: int | None, sha: str, run_spec: str,
             kind: str) -> Message:
    start = at or 0
    content: dict[str, Any] = {"round": rnd, "from": start, "records": encode(co.log.records[start:]),
                               "sha256": sha, "slots": co.fleet.slots(rnd, k) if kind == "train" else [],
                               "lr": co.lr(rnd) if kind == "train" else 0.0}
    if at is None:
        content["run"] = run_spec
    return Message(RecordDict({KEY: ConfigRecord(content)}), dst_node_id=node, message_type=kind)


def _answers(co: Coordinator, replies: list[Message], nodes: list[int], position: dict[int, int | None]
             ) -> dict[int, ConfigRecord]:
    """The replies that hold the global weights, by device index; the positions updated. A
    device that holds other weights stops the run: its records would diverge the fleet."""
    answered = {}
    for reply in replies:
        node = reply.metadata.src_node_id
        if reply.has_error():
            logger.warning(f"note: device {nodes.index(node)} failed this round: {reply.error.reason}")
            if "another model or version" in reply.error.reason:
                raise OrtzoError(f"device {nodes.index(node)}: {reply.error.reason.strip().splitlines()[-1]}")
            continue
        c = reply.content[KEY]
        if "need" in c:  # it lost its replica: from its own position next round
            position[node] = int(c["need"]) or None
            continue
        position[node] = len(co.log)
        answered[nodes.index(node)] = c
    return answered


def _bytes(messages: list[Message]) -> int:
    """What the messages take on the wire: their protobuf encoding, metadata included."""
    return sum(message_to_proto(m).ByteSize() for m in messages)
