"""The server's side of a fleet: the global step log, merged round by round, in a run folder.

A round sends every device the records it has not replayed yet, the slots it steps at and the
round's lr; each device replays, reports the hash of its weights, probes, and sends its
records back with its example count. The coordinator merges the round's records (plan.py:
each slot's estimates averaged, weighted by the devices' example counts, or every record
appended in the order of the devices, whatever order they arrived in), numbers them as the
next steps of the global log and appends them to `steps.jsonl`, fsynced: the run folder is then
an ordinary run (`ortzo eval DIR`, `ortzo bake DIR` replay it) and a restarted server resumes
from it. Replaying the merged log is the arithmetic of the steps one after another, as a single
device would have taken them from slightly older weights (each device probed at the round's
start).

`rounds.csv` has a row a round: the devices that answered, the bytes the messages took each
way, the evaluation (every `eval_every` rounds and the last), and the one sha256 of the
weights every device reported after replaying the round (the run stops if two differ).
"""
from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from ..config import RunConfig
from ..errors import OrtzoError
from ..files import atomic_open
from ..optim import steplog
from ..optim.mezo import StepRecord, scheduled_lr
from ..tasks.objective import evaluate as evaluate_examples
from .plan import Fleet
from .replica import Replica

ROUNDS = "rounds.csv"
COLUMNS = ("round", "clients", "bytes_up", "bytes_down", "eval_accuracy", "weights_sha256", "eval_loss", "steps",
           "seconds")


def encode(records: Sequence[StepRecord]) -> str:
    """Records as compact JSON: what travels."""
    return json.dumps([r.to_json() for r in records], separators=(",", ":"))


def decode(text: str) -> list[StepRecord]:
    try:
        return [StepRecord.from_json(d) for d in json.loads(text)]
    except (ValueError, TypeError, KeyError) as e:
        raise OrtzoError(f"a corrupt step record on the wire: {type(e).__name__}: {e}") from None


def average(records: Sequence[StepRecord], weights: Sequence[float]) -> StepRecord:
    """One slot's estimates from several devices as one: the weighted mean of their projected
    gradients and losses. A weighted mean of losses is the loss of the union of the examples,
    and an SPSA estimate is linear in the loss, so this is the estimate on all of them. The
    records must share what replay uses besides the gradient (seed, lr, eps, decay)."""
    first = records[0]
    for r in records[1:]:
        if (r.seed, r.lr, r.eps, r.weight_decay, r.estimator, len(r.grads)) != (
                first.seed, first.lr, first.eps, first.weight_decay, first.estimator, len(first.grads)):
            raise OrtzoError(f"devices sent different steps for one slot (seed {first.seed} vs {r.seed}, lr "
                             f"{first.lr:g} vs {r.lr:g}): another version of ortzo or of the run's settings")
    w = np.asarray(weights, dtype=np.float64) / float(np.sum(weights))

    def mean(rows: list[tuple[float, ...]]) -> tuple[float, ...]:
        return tuple(float(x) for x in w @ np.asarray(rows, dtype=np.float64))

    return replace(first, grads=mean([r.grads for r in records]), loss_plus=mean([r.loss_plus for r in records]),
                   loss_minus=mean([r.loss_minus for r in records]))


class Coordinator:
    """The global log in the run folder `out` and the server's replica, which replays it,
    evaluates, and is the reference every device's hash is checked against."""

    def __init__(self, cfg: RunConfig, fleet: Fleet, out: Path, replica: Replica) -> None:
        self.cfg, self.fleet, self.out, self.replica = cfg, fleet, out, replica
        self.log = steplog.read(out / "steps.jsonl")
        self.replica.catch_up(self.log.records)
        self.rows = _read_rows(out / ROUNDS)
        self.round = len(self.rows)  # a restarted server goes on after its last finished round
        done = self.rows[-1]["steps"] if self.rows else 0
        if len(self.log) > done:  # it stopped between a round's records and the round's row (which
            # devices answered is not in the log)
            self.finish_round({"round": self.round + 1, "weights_sha256": replica.sha256(), "steps": len(self.log)})

    def lr(self, rnd: int) -> float:
        done = rnd * self.fleet.round_steps
        return scheduled_lr(self.cfg.lr, self.cfg.schedule, done, self.cfg.schedule_steps or self.fleet.steps)

    def merge(self, probes: Mapping[int, Sequence[StepRecord]], examples: Mapping[int, int]) -> list[StepRecord]:
        """The round's records, by device index, as the global log's next steps: each slot's
        averaged (weighted by `examples`, the devices' example counts), or all in device order."""
        at = len(self.log)
        if self.fleet.merge == "append":
            merged = [r for k in sorted(probes) for r in probes[k]]
        else:
            merged = [average([probes[k][j] for k in sorted(probes)], [examples[k] for k in sorted(probes)])
                      for j in range(min((len(p) for p in probes.values()), default=0))]
        return [replace(r, step=at + i) for i, r in enumerate(merged)]

    def commit(self, records: Sequence[StepRecord], seconds: float) -> None:
        """Append the merged records to the log (fsynced) and replay them here."""
        with steplog.StepLog(self.out / "steps.jsonl") as out:
            for r in records:
                out.append_step(r, seconds / max(1, len(records)))
                self.log.records.append(r)
                self.log.seconds.append(seconds / max(1, len(records)))
        self.replica.catch_up(records)

    def evaluate(self, rnd: int) -> dict[str, float]:
        """Accuracy and loss on the run's evaluation examples, on rounds that call for it."""
        if (rnd + 1) % self.fleet.eval_every and rnd + 1 != self.fleet.rounds:
            return {}
        s = self.replica.setup
        r = evaluate_examples(self.replica.engine.score, s.encoder, s.splits.eval, self.cfg.eval_batch_size,
                              desc=f"eval after round {rnd + 1}")
        return {"eval_accuracy": r["accuracy"], "eval_loss": r["loss"]}

    def finish_round(self, row: dict[str, Any]) -> None:
        """Write rounds.csv again with this round's row (atomically: a kill leaves the old file)."""
        self.rows.append(row)
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(self.rows)
        with atomic_open(self.out / ROUNDS, "w") as f:
            f.write(buffer.getvalue())
        self.round += 1


def _read_rows(path: Path) -> list[dict[str, Any]]:
    """The finished rounds' rows, each with its `steps` a number; a file that is not ours is one line."""
    if not path.is_file():
        return []
    try:
        with path.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        for n, row in enumerate(rows, 1):
            if int(row["round"]) != n:
                raise ValueError(f"round {row['round']} where round {n} was expected")
            row["steps"] = int(row["steps"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise OrtzoError(f"corrupt {path}: {type(e).__name__}: {e}") from None
    return rows
