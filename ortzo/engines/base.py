"""The interface every engine offers the recipes, and the step records they log.

An engine trains the weights of a `WeightStore` in place (the ORT session binds the store's
arrays; the PyTorch engines' parameters are views of them), so checkpoints, `ortzo eval` and
the run folder are the same for all engines. It is built over a store (the model's weights or
a checkpoint's) and the training batch of each step, and `replay` brings it from the
checkpoint's step to a later one: MeZO repeats its logged arithmetic, backprop recomputes.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from ..model.weights import WeightStore
from ..optim.mezo import StepRecord
from ..tasks.batches import Batch

ENGINES = ("ort", "torch-bp", "torch-mezo")
BatchAt = Callable[[int], Batch]  # the training batch of step n
Adapt = Callable[[float], float]  # a step's projected gradient -> the factor of its lr (optim/meazo.py)


@dataclass(frozen=True)
class BackpropRecord:
    """A backprop step: what it cost and the lr it used (its update is recomputed, not logged)."""

    step: int
    loss: float
    lr: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BackpropRecord:
        return cls(int(d["step"]), float(d["loss"]), float(d["lr"]))


Record = StepRecord | BackpropRecord


@dataclass(frozen=True)
class Saved:
    """A checkpoint an engine starts from: its folder and metadata (for the optimizer state
    an engine keeps besides the weights)."""

    folder: Path
    meta: dict[str, Any]


def record_type(engine: str) -> type[StepRecord] | type[BackpropRecord]:
    """The kind of record an engine's step log holds."""
    return BackpropRecord if engine == "torch-bp" else StepRecord


class Engine(Protocol):
    store: WeightStore

    def score(self, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Candidate log-probabilities [N, K], as the scoring head defines them."""

    def step(self, step: int, lr: float, adapt: Adapt | None = None) -> Record:
        """Train on step `step`'s batch at learning rate `lr` (the recipe's schedule picks it),
        times `adapt`(the step's projected gradient) where given (the ort engine's MeZO only);
        FloatingPointError (weights unchanged) on a non-finite loss."""

    def replay(self, records: Sequence[Record]) -> None:
        """Bring the weights (and optimizer state) through the logged steps `records`."""

    def save_state(self, folder: Path) -> dict[str, Any]:
        """Write what a checkpoint needs besides the weights into `folder`; its metadata."""
