"""A fixed diagonal preconditioner for zeroth-order steps: each buffer's directions scaled by a
factor of its own.

With directions u = S z (S diagonal: one factor s_b for all of buffer b), SPSA's projected
gradient is (L(w + eps u) - L(w - eps u)) / (2 eps) ~ u.g, and the step -lr (u.g) u has the
expectation -lr S^2 g: SGD preconditioned by S^2 (the diagonal scaling of the directions studied
as "preconditioned" ZO, e.g. HiZOO, Zhao et al., ICLR 2025, arXiv 2402.15173, which fits S to a
diagonal Hessian estimate). Why: MeZO is zeroth-order SGD, and SGD with true gradients stops on
SmolLM2's vectors where MeZO does (0.83 on SST-2) while AdamW, whose step differs per tensor,
reaches 0.88: their gradients' rms differs 27x between tensors (docs/ablation-sst2.md), so one lr
is too large for the first layers' norms and too small for the rest.

The factors are fixed at a run's start and recorded with it, so a step log replays exactly
(`ScaledDirections` wraps any generator: the NumPy one or the CUDA kernel). Knows nothing about
ONNX. Measured on SST-2's vectors (docs/ablation-sst2.md): `weight-rms`, and oracles of Adam's
own scale, were level with unscaled MeZO. With true gradients a fixed per-coordinate scale
recovers most of AdamW's lead, but in ~900 zeroth-order steps only the few massive-activation
channels, which carry most of the gradient, move, whatever the scale.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

SCALES = ("none", "weight-rms")
Scale = float | np.ndarray  # one factor for a whole buffer, or one per coordinate
FLOOR = 0.1  # a buffer's rms counts as at least this share of the mean: a zero-initialized bias still trains


class AddsDirections(Protocol):
    def add(self, buffers: Sequence[np.ndarray], seed: int, scale: float | Sequence[float]) -> None: ...


class ScaledDirections:
    """Another generator's directions with buffer b's values times `scales[b]`: one factor for
    the whole buffer, or an array of its shape (one factor per coordinate; then each add
    draws z into a scratch copy of the buffers first)."""

    def __init__(self, directions: AddsDirections, scales: Sequence[Scale]) -> None:
        self.directions = directions
        self.scales = [s.astype(np.float32) if isinstance(s, np.ndarray) else float(s) for s in scales]
        self._per_coordinate = any(isinstance(s, np.ndarray) for s in self.scales)

    def add(self, buffers: Sequence[np.ndarray], seed: int, scale: float | Sequence[float]) -> None:
        """buffers[b] += scale[b] * scales[b] * z(seed)[b], in place."""
        per = scale if isinstance(scale, Sequence) else [scale] * len(buffers)
        if not len(per) == len(self.scales) == len(buffers):
            raise ValueError(f"{len(buffers)} buffers for {len(self.scales)} direction scales")
        if not self._per_coordinate:
            self.directions.add(buffers, seed, [float(p) * s for p, s in zip(per, self.scales)])
            return
        z = [np.zeros_like(b) for b in buffers]
        self.directions.add(z, seed, 1.0)
        for b, zb, p, s in zip(buffers, z, per, self.scales):
            zb *= s
            zb *= np.float32(p)
            b += zb


def weight_rms_scales(buffers: Sequence[np.ndarray]) -> list[float]:
    """s_b = sqrt(rms(w_b) / m): each buffer's step grows with the size of its weights, where m,
    the mean rms over coordinates, keeps the mean of s^2 over coordinates at 1 (so the lr keeps
    its meaning). Why the rms: on SmolLM2's vectors the weights' rms and the gradient's are
    anti-correlated (log-log r = -0.67; layer 0's input norm: rms 0.04 and the largest
    gradient), so S^2 ~ rms(w) moves toward AdamW's per-tensor step ~ 1 / rms(g) at no cost:
    the 27x spread of the per-tensor update size under one lr falls to ~10x. Its square root,
    not rms(w) itself: S^2 ~ rms(w)^2 would widen the spread to ~200x."""
    sizes = np.array([b.size for b in buffers], np.float64)
    rms = np.array([np.sqrt(np.mean(np.square(b, dtype=np.float64))) for b in buffers])
    mean = float((sizes * rms).sum() / sizes.sum())
    if not mean > 0:
        return [1.0] * len(buffers)
    rms = np.maximum(rms, FLOOR * mean)
    norm = float((sizes * rms).sum() / sizes.sum())
    return [float(np.sqrt(r / norm)) for r in rms]
