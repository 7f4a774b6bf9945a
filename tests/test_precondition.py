"""The fixed per-tensor scale of the directions (optim/precondition.py) and the shared-channel
diagnostic (experiments/shared_directions.py): the factors against the test's own arithmetic,
and each MeZO step against SPSA computed by hand on a quadratic whose gradient is known."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from ortzo.optim.directions import Directions
from ortzo.optim.mezo import mezo_step, replay
from ortzo.optim.precondition import ScaledDirections, weight_rms_scales


def test_scaled_directions_add_each_buffers_own_multiple_of_z():
    d = Directions("rademacher-counter", threads=1)
    shapes = [(5,), (3, 4), (7,)]
    z = d.sample(shapes, seed=11)
    out = [np.zeros(s, np.float32) for s in shapes]
    ScaledDirections(d, [0.5, 2.0, 1.5]).add(out, 11, [1.0, -3.0, 0.25])
    for o, zb, f in zip(out, z, (0.5, -6.0, 0.375)):
        np.testing.assert_array_equal(o, np.float32(f) * zb)
    out = [np.zeros(s, np.float32) for s in shapes]
    ScaledDirections(d, [0.5, 2.0, 1.5]).add(out, 11, 2.0)  # one scale for every buffer
    for o, zb, f in zip(out, z, (1.0, 4.0, 3.0)):
        np.testing.assert_array_equal(o, np.float32(f) * zb)
    per = [np.linspace(0.5, 1.5, 5, dtype=np.float32), np.full((3, 4), 2.0, np.float32), np.float32(1.5)]
    out = [np.zeros(s, np.float32) for s in shapes]
    ScaledDirections(d, [per[0], per[1], 1.5]).add(out, 11, [1.0, -3.0, 0.25])  # per coordinate
    for o, zb, s, f in zip(out, z, per, (1.0, -3.0, 0.25)):
        np.testing.assert_allclose(o, zb * s * f, rtol=1e-6)
    with pytest.raises(ValueError, match="2 buffers for 3 direction scales"):
        ScaledDirections(d, [0.5, 2.0, 1.5]).add(out[:2], 11, 1.0)


def test_weight_rms_scales_square_to_the_rms_over_its_mean_with_a_floor():
    w = [np.full(4, 0.5, np.float32), np.full(12, -2.0, np.float32)]
    m = (4 * 0.5 + 12 * 2.0) / 16
    assert weight_rms_scales(w) == pytest.approx([np.sqrt(0.5 / m), np.sqrt(2.0 / m)], rel=1e-12)
    s = np.array(weight_rms_scales(w))
    assert (4 * s[0] ** 2 + 12 * s[1] ** 2) / 16 == pytest.approx(1.0)  # the lr keeps its meaning
    # a zero buffer (a zero-initialized bias) counts as 0.1 of the mean rms, so it still moves
    w = [np.zeros(8, np.float32), np.array([3.0, -3.0, 3.0, -3.0] * 2, np.float32)]
    floor, m = 0.1 * (8 * 0 + 8 * 3) / 16, (8 * 0.15 + 8 * 3) / 16
    assert floor == pytest.approx(0.15)
    assert weight_rms_scales(w) == pytest.approx([np.sqrt(0.15 / m), np.sqrt(3.0 / m)], rel=1e-12)
    assert weight_rms_scales([np.zeros(3, np.float32)]) == [1.0]


EPS, LR, SEED = 1e-2, 0.05, 1234


def _step_on_quadratic(shapes, directions):
    """One MeZO step through `directions` on L(w) = 0.5 sum_b a_b |w_b|^2 + c.w, whose central
    difference is exact: (w0, the stepped buffers, the record, grad L(w0) in float64)."""
    rng = np.random.default_rng(0)
    a = [3.0, 0.5][:len(shapes)]
    w0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    c = [rng.standard_normal(s) for s in shapes]
    buffers = [w.copy() for w in w0]

    def loss() -> float:
        return sum(0.5 * ab * float((b.astype(np.float64) ** 2).sum()) + float((cb * b).sum())
                   for ab, b, cb in zip(a, buffers, c))

    r = mezo_step(buffers, loss, step=0, seed=SEED, eps=EPS, lr=LR, directions=directions)
    return w0, buffers, r, [ab * w.astype(np.float64) + cb for ab, w, cb in zip(a, w0, c)]


def _assert_spsa_along(u, w0, buffers, r, grad):
    """The projected gradient is u.grad L and the update -lr g u."""
    g = sum(float((ub * gb).sum()) for ub, gb in zip(u, grad))
    assert r.grads[0] == pytest.approx(g, rel=2e-4, abs=2e-4)
    for b, w, ub in zip(buffers, w0, u):
        np.testing.assert_allclose(b, w - LR * r.grads[0] * ub, atol=2e-6)


def test_a_scaled_step_is_spsa_along_the_scaled_direction_and_replays():
    shapes, scales = [(6,), (2, 5)], [0.4, 1.7]
    d = Directions("rademacher-counter", threads=1)
    w0, buffers, r, grad = _step_on_quadratic(shapes, ScaledDirections(d, scales))
    _assert_spsa_along([s * zb.astype(np.float64) for s, zb in zip(scales, d.sample(shapes, SEED))],
                       w0, buffers, r, grad)
    again = [w.copy() for w in w0]
    replay(again, [r], ScaledDirections(d, scales))
    for x, y in zip(again, buffers):
        np.testing.assert_array_equal(x, y)
    unscaled = [w.copy() for w in w0]  # the same record without the scales lands elsewhere
    replay(unscaled, [r], d)
    assert not np.array_equal(unscaled[0], buffers[0])


def test_the_shared_channel_diagnostic_steps_along_one_z_for_every_tensor():
    """experiments/shared_directions.py, whose runs the ablation doc quotes: u_b = z for all b."""
    spec = importlib.util.spec_from_file_location(
        "shared_directions", Path(__file__).resolve().parents[1] / "experiments/shared_directions.py")
    shared = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(shared)
    shapes = [(6,), (6,)]
    d = Directions("rademacher-counter", threads=1)
    w0, buffers, r, grad = _step_on_quadratic(shapes, shared.SharedDirections(d))
    z = d.sample([(6,)], SEED)[0].astype(np.float64)
    _assert_spsa_along([z, z], w0, buffers, r, grad)
