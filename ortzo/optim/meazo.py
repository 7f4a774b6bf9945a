"""MEAZO's scalar adaptive step size (Dbouk, Gazagnadou, Reisser, Louizos, "On Adaptivity in
Zeroth-Order Optimization", arXiv 2605.03869): the lr of a step divided by the root of an
exponential moving average of the squared projected gradient, one scalar for every weight.

    g_t = mean of the step's projected gradients (after clipping)
    v_t = beta v_(t-1) + (1 - beta) g_t^2,   v_hat_t = v_t / (1 - beta^t)
    lr_t = lr / (sqrt(v_hat_t) + zeta)

Why one scalar: in high dimensions a zeroth-order gradient has no coordinate-wise structure
for per-coordinate (Adam) moments to exploit, so a global scale recovers ZO-Adam at ZO-SGD's
memory. `v` is a pure function of the logged gradients, so a step log replays and resumes it
exactly (each record holds the lr it applied). Knows nothing about ONNX.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable

BETA = 0.99   # the moment's decay: it averages ~100 steps, a tenth of a typical run
ZETA = 1e-8   # keeps the division finite where every gradient so far was 0


def scale_after(previous: Iterable[float], beta: float = BETA, zeta: float = ZETA) -> Callable[[float], float]:
    """The lr multiplier of the step after the steps whose mean projected gradients are
    `previous`, as a function of that step's own mean projected gradient."""
    v, t = 0.0, 0
    for g in previous:
        v, t = beta * v + (1 - beta) * g * g, t + 1

    def scale(g: float) -> float:
        v_hat = (beta * v + (1 - beta) * g * g) / (1 - beta ** (t + 1))
        return 1.0 / (math.sqrt(v_hat) + zeta)

    return scale
