"""The MeZO step (Malladi et al., 2023) as a function of (buffers, loss, eps, lr, seed).

It knows nothing about ONNX: `buffers` are float32 arrays the loss function reads, so the
same code drives a PyTorch model's parameters (through `tensor.numpy()` views) or ORT inputs.

For one direction z (regenerated from the seed, never stored):
    w += eps z; L+ = loss();  w -= 2 eps z; L- = loss();  g = (L+ - L-) / (2 eps)
    w += (eps - lr g) z          # restore and update fused in one pass
With q > 1 directions every direction is evaluated at the same w, each is restored, then all
updates are applied. A `StepRecord` holds what `replay` needs to repeat the exact float
operations, so replaying records from the initial weights rebuilds them bit for bit.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from collections.abc import Callable, Sequence

import numpy as np

from .directions import Directions

LossFn = Callable[[], float]


@dataclass(frozen=True)
class StepRecord:
    step: int
    seed: int
    grads: tuple[float, ...]  # projected gradient per direction, after clipping
    lr: float
    eps: float
    weight_decay: float
    loss_plus: tuple[float, ...]
    loss_minus: tuple[float, ...]

    @property
    def loss(self) -> float:
        """The step's loss estimate: mean of L+ and L- over directions."""
        return float(np.mean(self.loss_plus + self.loss_minus))

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict) -> StepRecord:
        return cls(int(d["step"]), int(d["seed"]), tuple(map(float, d["grads"])), float(d["lr"]),
                   float(d["eps"]), float(d["weight_decay"]), tuple(map(float, d["loss_plus"])),
                   tuple(map(float, d["loss_minus"])))


def direction_seed(seed: int, direction: int) -> int:
    """Seed of direction i of a step; direction 0 uses the step seed itself."""
    return seed if direction == 0 else int(np.random.SeedSequence([seed, direction]).generate_state(1)[0])


def mezo_step(
    buffers: Sequence[np.ndarray],
    loss_fn: LossFn,
    *,
    step: int,
    seed: int,
    eps: float,
    lr: float,
    directions: Directions,
    n_directions: int = 1,
    clip: float | None = None,
    weight_decay: float = 0.0,
    decay: Sequence[bool] | None = None,
) -> StepRecord:
    """One SPSA step in place on `buffers`. `decay[i]` says whether buffer i gets weight decay."""
    grads, lplus, lminus = [], [], []
    for i in range(n_directions):
        s = direction_seed(seed, i)
        directions.add(buffers, s, eps)
        lp = float(loss_fn())
        directions.add(buffers, s, -2 * eps)
        lm = float(loss_fn())
        if not (math.isfinite(lp) and math.isfinite(lm)):
            directions.add(buffers, s, eps)
            raise FloatingPointError(f"non-finite loss at step {step}: L+={lp}, L-={lm}")
        g = (lp - lm) / (2 * eps)
        if clip is not None:
            g = max(-clip, min(clip, g))
        grads.append(g)
        lplus.append(lp)
        lminus.append(lm)
        if n_directions == 1:
            directions.add(buffers, s, eps - lr * g)
        else:
            directions.add(buffers, s, eps)
    record = StepRecord(step, seed, tuple(grads), lr, eps, weight_decay, tuple(lplus), tuple(lminus))
    if n_directions > 1:
        _apply_updates(buffers, record, directions)
    _apply_decay(buffers, record, decay)
    return record


def replay(buffers: Sequence[np.ndarray], records: Sequence[StepRecord], directions: Directions,
           decay: Sequence[bool] | None = None) -> None:
    """Repeat the steps' weight arithmetic without any loss evaluation."""
    for r in records:
        q = len(r.grads)
        for i, g in enumerate(r.grads):
            s = direction_seed(r.seed, i)
            directions.add(buffers, s, r.eps)
            directions.add(buffers, s, -2 * r.eps)
            directions.add(buffers, s, r.eps - r.lr * g if q == 1 else r.eps)
        if q > 1:
            _apply_updates(buffers, r, directions)
        _apply_decay(buffers, r, decay)


def _apply_updates(buffers: Sequence[np.ndarray], r: StepRecord, directions: Directions) -> None:
    q = len(r.grads)
    for i, g in enumerate(r.grads):
        directions.add(buffers, direction_seed(r.seed, i), -r.lr * g / q)


def _apply_decay(buffers: Sequence[np.ndarray], r: StepRecord, decay: Sequence[bool] | None) -> None:
    if not r.weight_decay:
        return
    factor = np.float32(1.0 - r.lr * r.weight_decay)
    for b, d in zip(buffers, decay if decay is not None else [True] * len(buffers)):
        if d:
            b *= factor


def lr_at(step: int, total: int, lr: float, schedule: str) -> float:
    """Learning rate at 0-based `step` of `total`: "constant" or "linear" decay to zero."""
    if schedule == "constant":
        return lr
    if schedule == "linear":
        return lr * max(0.0, 1.0 - step / max(1, total))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose constant or linear")


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step `step` of a run: a pure function, so a resumed run draws the same z."""
    return int(np.random.SeedSequence([run_seed, step]).generate_state(1)[0])
