"""One device's copy of the fleet's model: the run's ORT engine over its own training examples.

Its weights are always the model's plus the global step log replayed, in order. A probe (a
round's local MeZO steps) moves them, so the trained tensors are copied before and written
back after, bit for bit: a device that probed and one that did not then replay the same
records into the same bytes. The copy costs the trained tensors once (0.14 MiB for the default
recipe's vectors; a full-parameter run doubles its weights, which is why fleets train vectors
or LoRA). Which steps and examples are the device's is the fleet's plan (plan.py).
"""
from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from ..config import RunConfig
from ..engines import open_engine
from ..errors import OrtzoError
from ..optim.mezo import StepRecord
from ..recipes.setup import Setup, prepare
from ..tasks.task import load_task
from .plan import Fleet, shards


class Replica:
    """Device `device` of `fleet` (its shard of the run's training examples), or with None the
    server's copy, which holds them all and evaluates."""

    def __init__(self, cfg: RunConfig, fleet: Fleet, device: int | None) -> None:
        if cfg.engine != "ort":
            raise OrtzoError(f"a fleet trains with --engine ort (seeds and projected gradients on the wire), "
                             f"not {cfg.engine}")
        setup = prepare(cfg, load_task(cfg.task, cfg.template))
        if device is not None:  # its shard, and its steps forward its share of the batch
            train = setup.splits.train
            parts = shards([e[setup.task.label_field] for e in train], fleet.clients, fleet.alpha, cfg.seed)
            cfg = cfg.model_copy(update={"batch_size": fleet.shares(cfg.batch_size, list(map(len, parts)))[device]})
            setup = replace(setup, cfg=cfg, splits=replace(setup.splits, train=[train[i] for i in parts[device]]))
        store = setup.load_store()
        self.setup: Setup = setup.with_scales(store)
        self.fleet = fleet
        self.engine = open_engine(cfg, setup.model_dir, store, self.setup.trained(store), setup.target, self._batch,
                                  None, self.setup.scales)
        if self.engine.session.device is not None:
            raise OrtzoError("a fleet's devices train on the host (a CUDA target is not supported yet)")
        self.replayed = 0  # records of the global log these weights hold

    @property
    def examples(self) -> int:
        """Training examples this replica holds: what its estimates are weighted by."""
        return len(self.setup.splits.train)

    def _batch(self, slot: int):
        return self.setup.train_batch(self.fleet.local_batch(slot))

    def catch_up(self, records: Sequence[StepRecord]) -> None:
        """Replay the global log's next records."""
        self.engine.replay(records)
        self.replayed += len(records)

    def probe(self, slots: Sequence[int], lr: float) -> list[StepRecord]:
        """MeZO steps at `slots` on this device's batches, the weights left as they were."""
        kept = [b.copy() for b in self.engine.buffers]
        try:
            return [self.engine.step(slot, lr) for slot in slots]
        finally:
            for b, k in zip(self.engine.buffers, kept, strict=True):
                np.copyto(b, k)

    def sha256(self) -> str:
        """Of the trained tensors, in order: equal on two devices iff they hold the same weights."""
        h = hashlib.sha256()
        for b in self.engine.buffers:
            h.update(np.ascontiguousarray(b).data)
        return h.hexdigest()
