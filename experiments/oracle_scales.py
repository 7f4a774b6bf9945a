"""Direction scales no cheap probe could beat, to learn whether any diagonal preconditioner of
MeZO's directions is worth measuring on the device: MeZO on the vectors with scales fixed at
the run's start from quantities only autograd or the activations give.

- `tensor`: Adam's step at the start per tensor, s^2 ~ 1 / sqrt(v), v the mean over the tensor
  of the squared gradient of the first BATCHES training batches (gradient_shares.py's);
- `coordinate`: the same per coordinate, s^2 capped at CAP x its median (the coordinates whose
  first gradients were ~0 would otherwise take steps 300x the median's: pure noise);
- `curvature`: damp the coordinates whose curvature is high, s^2 = min(1, median(h) / h), h the
  mean square of what the scale multiplies (channel_shares.py's), so the other half keeps
  MeZO's step and a larger lr may be stable.

`tensor` and `coordinate` keep the mean of s^2 over coordinates at 1. Needs the torch extra,
which the run's process then holds: compare steps and accuracy, not RSS. The run folder is an
ordinary one whose recorded section holds the oracle's scales (its config says weight-rms):
`ortzo eval` and `--resume` use them.

    python experiments/oracle_scales.py tensor|coordinate|curvature OUT MODEL [finetune options...]
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import replace

import numpy as np

from channel_shares import normalized_input_squares
from gradient_shares import batch_gradients
from ortzo.cli import main
from ortzo.model.weights import WeightStore
from ortzo.recipes.setup import Setup

CAP = 4.0


def oracle(kind: str) -> Callable[[Setup, WeightStore], Setup]:
    def with_scales(setup: Setup, store: WeightStore) -> Setup:
        names = setup.trained(store)
        if kind == "curvature":
            h = normalized_input_squares(setup, names)
            median = np.median(np.concatenate(list(h.values())))
            return replace(setup, scales={n: np.sqrt(np.minimum(1.0, median / h[n])).astype(np.float32)
                                          for n in names})
        grads = batch_gradients(setup, setup.load_store(), names)  # a store of its own: torch re-lays it out
        v = {n: np.mean([g[n].astype(np.float64) ** 2 for g in grads], axis=0) for n in names}
        if kind == "tensor":
            v = {n: np.full(v[n].shape, v[n].mean()) for n in names}
        p = {n: 1 / np.sqrt(v[n] + 1e-16) for n in names}
        cap = CAP * np.median(np.concatenate(list(p.values())))
        p = {n: np.minimum(p[n], cap) for n in names}
        norm = sum(p[n].sum() for n in names) / sum(p[n].size for n in names)
        if kind == "tensor":
            return replace(setup, scales={n: float(np.sqrt(p[n][0] / norm)) for n in names})
        return replace(setup, scales={n: np.sqrt(p[n] / norm).astype(np.float32) for n in names})

    return with_scales


if __name__ == "__main__":
    if len(sys.argv) < 4 or sys.argv[1] not in ("tensor", "coordinate", "curvature"):
        sys.exit(__doc__)
    Setup.with_scales = oracle(sys.argv[1])
    sys.exit(main(["finetune", "--out", sys.argv[2], "--direction-scale", "weight-rms", *sys.argv[3:]]))
