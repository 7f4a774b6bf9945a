"""The MeZO step (Malladi et al., 2023) as a function of (buffers, loss, eps, lr, seed).

It knows nothing about ONNX: `buffers` are float32 arrays the loss function reads, so the
same code drives a PyTorch model's parameters (through `tensor.numpy()` views) or ORT inputs.

For one direction z (regenerated from the seed, never stored):
    w += eps z; L+ = loss();  w -= 2 eps z; L- = loss();  g = (L+ - L-) / (2 eps)
    w <- (1 - lr wd) w - lr g z       # the restore of w - eps z fused into the update
With q > 1 directions every direction is evaluated at the same w and restored, then
    w <- (1 - lr wd) w - (lr / q) sum_i g_i z_i.
Weight decay multiplies the weights before the step's update (MeZO's trainer:
`param - lr * (g * z + wd * param)`) and applies only where `decay` says.

A `StepRecord` holds what `replay` needs to repeat the exact float operations, so replaying
records from the initial weights rebuilds them bit for bit.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace

import numpy as np

from .directions import Directions

LossFn = Callable[[], float]
# Bounds far past any recipe (lr 1e-6 to 1e-3, eps 1e-3; a test pushes LoRA's B off zero at lr 20):
# beyond them a step wrecks the weights (lr 1e30 did, and the log kept the step, so a resume with a
# smaller lr replayed it), and eps beyond 1 drowns the weights in their perturbation.
LR_MAX = 1e3
EPS_MAX = 1.0


@dataclass(frozen=True)
class StepRecord:
    """One step of a zeroth-order estimator: "mezo" (two-sided, here) or "fzoo" (one-sided
    with a shared base loss, optim/fzoo.py, which logs L(w) as its only `loss_minus` and the
    spread it divides the update by as `norm`)."""

    step: int
    seed: int
    grads: tuple[float, ...]  # projected gradient per direction, after clipping
    lr: float
    eps: float
    weight_decay: float
    loss_plus: tuple[float, ...]
    loss_minus: tuple[float, ...]
    estimator: str = "mezo"
    norm: float = 1.0

    @property
    def loss(self) -> float:
        """The step's loss estimate: mean of L+ and L- over directions (FZOO: L(w) itself)."""
        if self.estimator == "fzoo":
            return self.loss_minus[0]
        return float(np.mean(self.loss_plus + self.loss_minus))

    @property
    def grad(self) -> float:
        """The mean projected gradient over the step's directions: what an adaptive step size sees."""
        return float(np.mean(self.grads))

    def to_json(self) -> dict:
        """As JSON takes it: a failed step's missing losses (NaN) as null."""
        d = asdict(self)
        for key in ("loss_plus", "loss_minus"):
            d[key] = [x if math.isfinite(x) else None for x in d[key]]
        return d

    @classmethod
    def from_json(cls, d: dict) -> StepRecord:
        def losses(xs: list) -> tuple[float, ...]:
            return tuple(math.nan if x is None else float(x) for x in xs)

        return cls(int(d["step"]), int(d["seed"]), tuple(map(float, d["grads"])), float(d["lr"]),
                   float(d["eps"]), float(d["weight_decay"]), losses(d["loss_plus"]), losses(d["loss_minus"]),
                   str(d.get("estimator", "mezo")), float(d.get("norm", 1.0)))


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
    adapt: Callable[[float], float] | None = None,
) -> StepRecord:
    """One SPSA step in place on `buffers`. `decay[i]` says whether buffer i gets weight decay
    (default: all). `adapt` maps the step's mean projected gradient to a factor of its lr (an
    adaptive step size, optim/meazo.py); the record holds the lr applied. A step that fails (a
    non-finite loss raises FloatingPointError; `loss_fn` may raise anything) is finished as
    `zero_step`'s record: the weights come back as its replay leaves them, and the error is raised."""
    if clip is not None and not clip > 0:
        raise ValueError(f"clip must be positive, got {clip}")
    ops, done = perturbations(seed, n_directions, eps), 0
    grads, lplus, lminus = [], [], []

    def probe() -> float:
        nonlocal done
        directions.add(buffers, *ops[done])
        done += 1
        return float(loss_fn())

    try:
        for _ in range(n_directions):
            lp, lm = probe(), probe()
            if not (math.isfinite(lp) and math.isfinite(lm)):
                raise FloatingPointError(f"non-finite loss at step {step}: L+={lp}, L-={lm}")
            g = (lp - lm) / (2 * eps)
            if clip is not None:
                g = max(-clip, min(clip, g))
            grads.append(g)
            lplus.append(lp)
            lminus.append(lm)
            if n_directions > 1:
                directions.add(buffers, *ops[done])
                done += 1
    except BaseException:
        for op in ops[done:]:
            directions.add(buffers, *op)
        _update(buffers, zero_step(step, seed, n_directions, eps, weight_decay), directions, decay)
        raise
    record = StepRecord(step, seed, tuple(grads), lr, eps, weight_decay, tuple(lplus), tuple(lminus))
    if adapt is not None:
        record = replace(record, lr=lr * adapt(record.grad))
    _update(buffers, record, directions, decay)
    return record


def perturbations(seed: int, n_directions: int, eps: float) -> list[tuple[int, float]]:
    """The (direction seed, scale) additions a MeZO step makes before its update, in order:
    w + eps z, w - eps z, and with several directions w again after each."""
    ops = []
    for i in range(n_directions):
        s = direction_seed(seed, i)
        ops += [(s, eps), (s, -2 * eps)] + ([(s, eps)] if n_directions > 1 else [])
    return ops


def zero_step(step: int, seed: int, n_directions: int, eps: float, weight_decay: float,
              estimator: str = "mezo") -> StepRecord:
    """The record of a step that failed: its perturbations without an update (lr 0, no losses).
    A failed step leaves the weights as this record's replay does, so a log that holds it
    still replays to the weights bit for bit."""
    nan = (math.nan,) * n_directions
    return StepRecord(step, seed, (0.0,) * n_directions, 0.0, eps, weight_decay, nan,
                      (math.nan,) if estimator == "fzoo" else nan, estimator)


def replay(buffers: Sequence[np.ndarray], records: Sequence[StepRecord], directions: Directions,
           decay: Sequence[bool] | None = None) -> None:
    """Repeat the steps' weight arithmetic without any loss evaluation (each record's estimator's)."""
    from .fzoo import replay_step  # fzoo builds on this module's records

    for r in records:
        if r.estimator == "fzoo":
            replay_step(buffers, r, directions, decay)
            continue
        for op in perturbations(r.seed, len(r.grads), r.eps):
            directions.add(buffers, *op)
        _update(buffers, r, directions, decay)


def _update(buffers: Sequence[np.ndarray], r: StepRecord, directions: Directions,
            decay: Sequence[bool] | None) -> None:
    """w <- f w - (lr / q) sum_i g_i z_i with f = 1 - lr wd on decayed buffers. With q = 1 the
    buffers still hold w - eps z: scaling them by f and adding (f eps - lr g) z gives the same."""
    f = 1.0 - r.lr * r.weight_decay
    decayed = [bool(r.weight_decay) and d for d in (decay if decay is not None else [True] * len(buffers))]
    for b, d in zip(buffers, decayed, strict=True):
        if d:
            b *= np.float32(f)
    q = len(r.grads)
    if q == 1:
        g = r.grads[0]
        directions.add(buffers, r.seed, [(f * r.eps if d else r.eps) - r.lr * g for d in decayed])
    else:
        for i, g in enumerate(r.grads):
            directions.add(buffers, direction_seed(r.seed, i), -r.lr * g / q)


def decay_mask(buffers: Sequence[np.ndarray]) -> list[bool]:
    """Weight decay on matrices only, not on norms or biases (as MeZO does)."""
    return [b.ndim >= 2 for b in buffers]


WSD_DECAY = 1 / 3  # the share of a "wsd" schedule that decays
SCHEDULES = ("constant", "linear", "wsd")


def lr_at(done: float, total: float, lr: float, schedule: str) -> float:
    """Learning rate after `done` of a schedule spanning `total` (steps, or seconds of steps):
    "constant"; "linear" decay to zero at `total`; or "wsd", constant and then linear to zero
    over the last WSD_DECAY of `total` (warmup-stable-decay without the warmup: Hu et al. 2024,
    MiniCPM; Hagele et al. 2024, arXiv 2405.18392). Zero after `total`.

    Why wsd: MeZO's loss falls at the constant lr until its noise floor (the lr times the
    batch gradient's variance), then only a smaller lr lowers it; decaying from the start
    slows the first part, which is most of the gain."""
    if schedule == "constant":
        return lr
    total = max(1e-9, total)
    if schedule == "linear":
        return lr * max(0.0, 1.0 - done / total)
    if schedule == "wsd":
        return lr * min(1.0, max(0.0, (total - done) / (WSD_DECAY * total)))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose constant, linear or wsd")


def scheduled_lr(lr: float, schedule: str, steps_done: int, steps_total: int | None,
                 seconds_done: float = 0.0, seconds_total: float | None = None) -> float:
    """The lr of the next step: the lower of the schedule over its steps and over its seconds
    of steps (whichever span is nearer its end), so the lr reaches 0 when a run ends, by steps
    or by time. A span that is None does not bound it."""
    spans = [(steps_done, steps_total), (seconds_done, seconds_total)]
    return min([lr] + [lr_at(done, total, lr, schedule) for done, total in spans if total is not None])


def step_seed(run_seed: int, step: int) -> int:
    """The seed of step `step` of a run: a pure function, so a resumed run draws the same z."""
    return int(np.random.SeedSequence([run_seed, step]).generate_state(1)[0])
