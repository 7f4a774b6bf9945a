"""The FZOO step (Dang et al., "FZOO: Fast Zeroth-Order Optimizer for Fine-Tuning Large
Language Models towards Adam-Scale Speed", arXiv 2506.09034) as a function of (buffers, loss,
eps, lr, seed), like `mezo.mezo_step`.

N one-sided directions share one base loss, so a step costs N + 1 forwards for N estimates
(MeZO: 2 per estimate), and the update is divided by the spread of the perturbed losses,
which makes it scale-free (a zeroth-order normalized SGD: large steps where the loss is flat,
small ones where it is steep):
    L0 = loss();  for each z_i: w += eps z_i; L_i = loss(); w -= eps z_i;  g_i = (L_i - L0) / eps
    sigma = the sample standard deviation of L_1..L_N
    w <- (1 - lr wd) w - lr / (N sigma) sum_i g_i z_i
So `lr` is a step length per normalized direction, far smaller than MeZO's lr (roughly
MeZO's lr x |g| x eps). The record holds the g_i and sigma (`norm`): replaying it repeats the
exact float operations, as MeZO's does. Knows nothing about ONNX.
"""
from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

import numpy as np

from .directions import Directions
from .mezo import LossFn, StepRecord, direction_seed, zero_step

ESTIMATOR = "fzoo"


def fzoo_step(
    buffers: Sequence[np.ndarray],
    loss_fn: LossFn,
    *,
    step: int,
    seed: int,
    eps: float,
    lr: float,
    directions: Directions,
    n_directions: int = 8,
    weight_decay: float = 0.0,
    decay: Sequence[bool] | None = None,
) -> StepRecord:
    """One FZOO step in place on `buffers` (N = `n_directions` >= 2: the spread needs two). A
    step that fails (a non-finite loss raises FloatingPointError; `loss_fn` may raise anything)
    is finished as mezo.zero_step's record: the weights come back as its replay leaves them."""
    if n_directions < 2:
        raise ValueError(f"FZOO needs at least 2 directions a step, got {n_directions}")
    ops, done = perturbations(seed, n_directions, eps), 0
    losses = []
    try:
        base = float(loss_fn())
        for _ in range(n_directions):
            directions.add(buffers, *ops[done])
            done += 1
            losses.append(float(loss_fn()))
            directions.add(buffers, *ops[done])
            done += 1
        if not all(map(math.isfinite, [base, *losses])):
            raise FloatingPointError(f"non-finite loss at step {step}: L0={base}, L_i={losses}")
    except BaseException:
        for op in ops[done:]:
            directions.add(buffers, *op)
        _update(buffers, zero_step(step, seed, n_directions, eps, weight_decay, ESTIMATOR), directions, decay)
        raise
    sigma = statistics.stdev(losses)
    record = StepRecord(step, seed, tuple((li - base) / eps for li in losses), lr, eps, weight_decay,
                        tuple(losses), (base,), ESTIMATOR, sigma if sigma > 0 else 1.0)
    _update(buffers, record, directions, decay)
    return record


def perturbations(seed: int, n_directions: int, eps: float) -> list[tuple[int, float]]:
    """The (direction seed, scale) additions an FZOO step makes before its update, in order:
    w + eps z_i, then w again, for each direction."""
    seeds = [direction_seed(seed, i) for i in range(n_directions)]
    return [op for s in seeds for op in ((s, eps), (s, -eps))]


def replay_step(buffers: Sequence[np.ndarray], r: StepRecord, directions: Directions,
                decay: Sequence[bool] | None = None) -> None:
    """The step's weight arithmetic without its losses: each direction's +eps and -eps, then
    the update."""
    for op in perturbations(r.seed, len(r.grads), r.eps):
        directions.add(buffers, *op)
    _update(buffers, r, directions, decay)


def _update(buffers: Sequence[np.ndarray], r: StepRecord, directions: Directions,
            decay: Sequence[bool] | None) -> None:
    f = np.float32(1.0 - r.lr * r.weight_decay)
    if r.weight_decay:
        for b, d in zip(buffers, decay if decay is not None else [True] * len(buffers), strict=True):
            if d:
                b *= f
    n = len(r.grads)
    for i, g in enumerate(r.grads):
        directions.add(buffers, direction_seed(r.seed, i), -r.lr * g / (n * r.norm))
