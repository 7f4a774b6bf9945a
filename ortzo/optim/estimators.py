"""The zeroth-order estimators a run can step with, by name: "mezo" (two-sided SPSA,
optim/mezo.py) and "fzoo" (one-sided with a shared base loss and a normalized update,
optim/fzoo.py). Both log `StepRecord`s that `mezo.replay` repeats exactly."""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from .fzoo import fzoo_step
from .mezo import LossFn, StepRecord, mezo_step

ESTIMATORS = ("mezo", "fzoo")


def estimator_step(estimator: str, buffers: Sequence[np.ndarray], loss_fn: LossFn, *, clip: float | None = None,
                   adapt: Callable[[float], float] | None = None, **settings: Any) -> StepRecord:
    """One step of `estimator` in place on `buffers`; `settings` are the step's keyword
    arguments (step, seed, eps, lr, directions, n_directions, weight_decay, decay). FZOO
    normalizes its update itself: it takes no clip and no adaptive step (`adapt`)."""
    if estimator == "fzoo":
        if clip is not None or adapt is not None:
            raise ValueError("FZOO takes no clip and no adaptive step: its update is normalized by the losses' "
                             "spread")
        return fzoo_step(buffers, loss_fn, **settings)
    if estimator != "mezo":
        raise ValueError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    return mezo_step(buffers, loss_fn, clip=clip, adapt=adapt, **settings)
