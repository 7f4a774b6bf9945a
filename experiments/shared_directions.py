"""A perturbation space where the vectors' gradient is dense: one direction per hidden channel,
shared by every tensor (SmolLM2's 61 vectors are all 576 wide), so MeZO searches 576 directions
instead of 35,136. Each step adds scale x z to every tensor, z one 576-wide Rademacher draw of the
step's seed. Its expected step is -lr G_c on every tensor's channel c, G_c the sum over tensors of
the gradient at channel c. On the first batches |G| is 3.77 against the full gradient's 3.90.
A diagnostic for the next lever, not a product path: `ortzo eval` of such a run replays it
with full directions, so compare the run's own metrics.

    python experiments/shared_directions.py OUT MODEL [finetune options...]
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

import numpy as np

from ortzo.cli import main
from ortzo.engines import ort
from ortzo.optim.directions import Directions


class SharedDirections:
    """One z for every buffer: buffers[b] += scale[b] * z(seed), all buffers of z's shape."""

    def __init__(self, directions: Directions) -> None:
        self.directions = directions

    def add(self, buffers: Sequence[np.ndarray], seed: int, scale: float | Sequence[float]) -> None:
        per = scale if isinstance(scale, Sequence) else [scale] * len(buffers)
        z = self.directions.sample([buffers[0].shape], seed)[0]
        for b, s in zip(buffers, per, strict=True):
            b += np.float32(s) * z


def trainable_buffers(session, names, kind, threads=0):
    buffers, directions = original(session, names, kind, threads)
    if len({b.shape for b in buffers}) != 1:
        raise SystemExit("shared directions need every trained buffer of one shape (--params vectors)")
    return buffers, SharedDirections(directions)


if __name__ == "__main__":
    original, ort.trainable_buffers = ort.trainable_buffers, trainable_buffers
    sys.exit(main(["finetune", "--out", sys.argv[1], *sys.argv[2:]]))
