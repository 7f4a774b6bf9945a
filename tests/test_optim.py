"""The optimizer's arithmetic against values each test computes itself (NumPy only, seconds).

The directions come from a stand-in whose z the test draws and keeps, and the expected
update is written out here from MeZO's formulas in float64:
    g_i = (L(w + eps z_i) - L(w - eps z_i)) / (2 eps), clipped
    w'  = (1 - lr wd) w - (lr / q) sum_i g_i z_i      (decay only where the mask says)
so a wrong sign, factor, seed or mask in ortzo.optim changes a number these tests compare.
"""
from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import pytest

from ortzo.optim.directions import KINDS, Directions
from ortzo.optim.mezo import StepRecord, decay_mask, direction_seed, lr_at, mezo_step, replay, step_seed

SHAPES = [(4, 5), (3,), (2, 3)]


class KeptDirections:
    """Directions whose z the test knows: a fresh N(0, 1) draw per seed, remembered."""

    def __init__(self, shapes: Sequence[tuple[int, ...]], seed: int = 0) -> None:
        self.rng, self.shapes, self.z = np.random.default_rng(seed), shapes, {}

    def __call__(self, seed: int) -> list[np.ndarray]:
        if seed not in self.z:
            self.z[seed] = [self.rng.standard_normal(s).astype(np.float32) for s in self.shapes]
        return self.z[seed]

    def add(self, buffers, seed, scale) -> None:
        scales = list(scale) if isinstance(scale, (list, tuple)) else [scale] * len(buffers)
        for b, z, s in zip(buffers, self(seed), scales, strict=True):
            b += np.float32(s) * z


def _problem(seed: int = 0):
    """L(w) = sum_b c_b . w_b + 0.5 |w_b|^2 / b: smooth, with a known value at any w."""
    rng = np.random.default_rng(seed)
    w = [rng.normal(size=s).astype(np.float32) for s in SHAPES]
    c = [rng.normal(size=s) for s in SHAPES]

    def loss_at(ws) -> float:
        return float(sum(np.sum(ci * wi) + 0.5 * np.sum(np.asarray(wi, np.float64) ** 2) / (i + 1)
                         for i, (ci, wi) in enumerate(zip(c, ws))))
    return w, c, loss_at


def _expected(w0, zs, loss_at, eps, lr, wd=0.0, mask=None, clip=None):
    """(projected gradients, updated weights) from the formulas, in float64."""
    mask = mask if mask is not None else [True] * len(w0)
    grads = []
    for z in zs:
        plus = loss_at([a + eps * zb.astype(np.float64) for a, zb in zip(w0, z)])
        minus = loss_at([a - eps * zb.astype(np.float64) for a, zb in zip(w0, z)])
        g = (plus - minus) / (2 * eps)
        grads.append(g if clip is None else min(clip, max(-clip, g)))
    new = []
    for b, (a, m) in enumerate(zip(w0, mask)):
        step = sum(g * z[b].astype(np.float64) for g, z in zip(grads, zs)) / len(zs)
        new.append((1 - lr * wd if m else 1.0) * a.astype(np.float64) - lr * step)
    return grads, new


@pytest.mark.parametrize("q", [1, 3])
@pytest.mark.parametrize("wd,mask", [(0.0, None), (0.5, None), (0.5, [True, False, True]), (0.5, [False, True, False])])
def test_step_updates_weights_by_mezos_formula(q, wd, mask):
    w, _, loss_at = _problem()
    w0 = [a.copy() for a in w]
    d = KeptDirections(SHAPES)
    eps, lr = 1e-2, 0.05
    decay = {"weight_decay": wd, "decay": mask} if wd else {}  # none given: no decay
    rec = mezo_step(w, lambda: loss_at(w), step=7, seed=99, eps=eps, lr=lr, directions=d, n_directions=q, **decay)
    assert len(d.z) == q, "each direction of a step has its own seed"
    zs = [d(direction_seed(99, i)) for i in range(q)]
    grads, want = _expected(w0, zs, loss_at, eps, lr, wd, mask)
    np.testing.assert_allclose(rec.grads, grads, rtol=1e-3)
    for got, expect in zip(w, want):
        np.testing.assert_allclose(got, expect, rtol=0, atol=2e-5)
    assert rec.step == 7 and rec.seed == 99 and rec.lr == lr and rec.eps == eps and rec.weight_decay == wd


def test_meazo_scale_is_the_root_of_the_bias_corrected_moment():
    """Closed forms, not the module's loop: the first step's moment is g^2 itself (a step of
    lr sign(g)); after a, the moment of b is (beta a^2 + b^2) / (1 + beta)."""
    from ortzo.optim.meazo import BETA, scale_after

    assert scale_after([])(-4.0) == pytest.approx(1 / 4)
    assert scale_after([3.0])(-1.0) == pytest.approx(1 / np.sqrt((BETA * 9 + 1) / (1 + BETA)))
    assert scale_after([3.0], beta=0.5)(1.0) == pytest.approx(1 / np.sqrt((0.5 * 9 + 1) / 1.5))
    assert np.isfinite(scale_after([0.0, 0.0])(0.0))


def test_an_adaptive_step_applies_and_records_its_scaled_lr():
    w, _, loss_at = _problem(2)
    w0 = [a.copy() for a in w]
    d = KeptDirections(SHAPES, seed=2)
    eps, lr = 1e-2, 0.05
    rec = mezo_step(w, lambda: loss_at(w), step=0, seed=3, eps=eps, lr=lr, directions=d, n_directions=2,
                    adapt=lambda g: 0.5 / abs(g))
    grads, _ = _expected(w0, [d(direction_seed(3, i)) for i in range(2)], loss_at, eps, lr)
    scaled = lr * 0.5 / abs(np.mean(grads))
    assert rec.lr == pytest.approx(scaled, rel=1e-3)
    _, want = _expected(w0, [d(direction_seed(3, i)) for i in range(2)], loss_at, eps, scaled)
    for got, expect in zip(w, want):
        np.testing.assert_allclose(got, expect, rtol=0, atol=2e-5)
    fresh, _, _ = _problem(2)
    replay(fresh, [rec], d)  # the record alone replays it
    for a, b in zip(fresh, w):
        np.testing.assert_array_equal(a, b)


def test_step_records_both_losses_and_their_mean():
    w, _, loss_at = _problem(1)
    w0 = [a.copy() for a in w]
    d = KeptDirections(SHAPES, seed=1)
    eps = 1e-2
    rec = mezo_step(w, lambda: loss_at(w), step=0, seed=5, eps=eps, lr=0.0, directions=d, n_directions=2)
    for i in range(2):
        z = d(direction_seed(5, i))
        assert rec.loss_plus[i] == pytest.approx(loss_at([a + eps * zb for a, zb in zip(w0, z)]), rel=1e-5)
        assert rec.loss_minus[i] == pytest.approx(loss_at([a - eps * zb for a, zb in zip(w0, z)]), rel=1e-5)
    assert rec.loss == pytest.approx((sum(rec.loss_plus) + sum(rec.loss_minus)) / 4)
    for a, b in zip(w, w0):  # lr 0: the weights come back
        np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("c,clip,want", [(0.8, 0.5, 0.5), (-0.8, 0.5, -0.5), (0.3, 0.5, 0.3), (-0.3, 0.5, -0.3)])
def test_clip_bounds_the_projected_gradient_and_the_update_uses_it(c, clip, want):
    """L(w) = c w with z = 1: g = c exactly, clipped to [-clip, clip]."""
    w = [np.zeros(1, np.float32)]
    d = KeptDirections([(1,)])
    d.z[3] = [np.ones(1, np.float32)]
    rec = mezo_step(w, lambda: c * float(w[0][0]), step=0, seed=3, eps=0.25, lr=0.1, directions=d, clip=clip)
    assert rec.grads[0] == pytest.approx(want, abs=1e-6)
    assert w[0][0] == pytest.approx(-0.1 * want, abs=1e-6)


@pytest.mark.parametrize("clip", [0.0, -1.0])
def test_non_positive_clip_is_refused(clip):
    w, _, loss_at = _problem()
    with pytest.raises(ValueError, match="clip"):
        mezo_step(w, lambda: loss_at(w), step=0, seed=0, eps=1e-3, lr=0.1, directions=KeptDirections(SHAPES), clip=clip)


class Failure(Exception):
    """What a user's loss function raised."""


def _failing(loss_at, w, at: int, how: str):
    """A loss function whose call number `at` (0-based) returns NaN or raises."""
    calls = []

    def loss_fn():
        calls.append(1)
        if len(calls) == at + 1:
            if how == "raise":
                raise Failure("the user's loss broke")
            return float("nan")
        return loss_at(w)
    return loss_fn


@pytest.mark.parametrize("q, at", [(1, 0), (1, 1), (3, 4), (3, 5)])  # at L+ or L- of the first or third direction
@pytest.mark.parametrize("how", ["nan", "raise"])
def test_a_failed_step_leaves_exactly_the_arithmetic_of_a_zero_step(q, at, how):
    """Whatever fails, and where, the step goes on with its perturbations (no more losses) and
    no update: the weights are w + eps z - 2 eps z (+ eps z per direction, or the update's eps z
    with one), as this test computes them in float32, and replaying the zero-step record from w
    gives the same bytes; the error reaches the caller."""
    from ortzo.optim.mezo import zero_step

    w, _, loss_at = _problem()
    w0, d, eps = [a.copy() for a in w], KeptDirections(SHAPES), 1e-2
    with pytest.raises(FloatingPointError if how == "nan" else Failure):
        mezo_step(w, _failing(loss_at, w, at, how), step=4, seed=1, eps=eps, lr=0.1, directions=d, n_directions=q)
    expected = [a.copy() for a in w0]
    for i in range(q):
        z = d(direction_seed(1, i))
        for scale in (eps, -2 * eps, eps):
            for e, zb in zip(expected, z):
                e += np.float32(scale) * zb
    for a, b in zip(w, expected):
        np.testing.assert_array_equal(a, b)
    replayed = [a.copy() for a in w0]
    replay(replayed, [zero_step(4, 1, q, eps, 0.0)], d)
    for a, b in zip(replayed, expected):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("at, how", [(0, "raise"), (2, "nan"), (3, "raise")])  # L(w), or a direction's loss
def test_a_failed_fzoo_step_leaves_exactly_the_arithmetic_of_a_zero_step(at, how):
    from ortzo.optim.fzoo import fzoo_step
    from ortzo.optim.mezo import zero_step

    w, _, loss_at = _problem()
    w0, d, eps = [a.copy() for a in w], KeptDirections(SHAPES), 1e-3
    with pytest.raises(FloatingPointError if how == "nan" else Failure):
        fzoo_step(w, _failing(loss_at, w, at, how), step=0, seed=1, eps=eps, lr=1e-3, directions=d, n_directions=3)
    expected = [a.copy() for a in w0]
    for i in range(3):
        for scale in (eps, -eps):
            for e, zb in zip(expected, d(direction_seed(1, i))):
                e += np.float32(scale) * zb
    for a, b in zip(w, expected):
        np.testing.assert_array_equal(a, b)
    replayed = [a.copy() for a in w0]
    replay(replayed, [zero_step(0, 1, 3, eps, 0.0, "fzoo")], d)
    for a, b in zip(replayed, expected):
        np.testing.assert_array_equal(a, b)


def test_a_zero_steps_missing_losses_are_json_null_and_come_back_as_nan():
    from ortzo.optim.mezo import zero_step

    record = zero_step(3, 7, 2, 1e-3, 0.0)
    text = json.dumps(record.to_json(), allow_nan=False)  # valid JSON: no NaN literal
    back = StepRecord.from_json(json.loads(text))
    assert back.grads == (0.0, 0.0) and back.lr == 0.0 and all(np.isnan(back.loss_plus + back.loss_minus))


def test_decay_mask_is_matrices_only_and_must_fit_the_buffers():
    assert decay_mask([np.zeros((2, 2)), np.zeros(3), np.zeros((1, 2, 3))]) == [True, False, True]
    w, _, loss_at = _problem()
    with pytest.raises(ValueError):
        mezo_step(w, lambda: loss_at(w), step=0, seed=0, eps=1e-3, lr=0.1, directions=KeptDirections(SHAPES),
                  weight_decay=0.1, decay=[True])


def test_linear_schedule_decays_to_zero_at_its_length_and_stays_there():
    assert [lr_at(t, 4, 0.8, "linear") for t in range(6)] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.0, 0.0])
    assert [lr_at(t, 1, 0.8, "linear") for t in range(2)] == pytest.approx([0.8, 0.0])
    assert [lr_at(t, 0.5, 0.8, "linear") for t in (0.125, 0.25, 0.75)] == pytest.approx([0.6, 0.4, 0.0])  # seconds
    assert [lr_at(t, 4, 0.8, "constant") for t in (0, 3, 9)] == [0.8, 0.8, 0.8]
    # wsd over 9 steps: constant for 6, then 3 to zero: 3/3, 2/3, 1/3 of the lr, then 0
    assert [lr_at(t, 9, 0.9, "wsd") for t in range(11)] == pytest.approx([0.9] * 7 + [0.6, 0.3, 0.0, 0.0])
    with pytest.raises(ValueError, match="unknown lr schedule 'cosine'"):
        lr_at(0, 4, 0.8, "cosine")


def test_seeds_are_pure_and_distinct():
    assert step_seed(0, 5) == step_seed(0, 5)
    seeds = {step_seed(r, s) for r in range(3) for s in range(100)}
    assert len(seeds) == 300
    assert direction_seed(17, 0) == 17
    assert len({direction_seed(17, i) for i in range(8)}) == 8
    # fixed across versions, or old step logs would replay other directions
    assert (step_seed(0, 0), step_seed(7, 123)) == (2968811710, 682066301)
    assert (direction_seed(5, 1), direction_seed(5, 2)) == (3796490668, 3226123765)


def test_record_survives_json():
    r = StepRecord(3, 2**63 + 5, (0.1, -2.5), 1e-5, 1e-3, 0.01, (0.7, 0.6), (0.65, 0.61))
    back = StepRecord.from_json(json.loads(json.dumps(r.to_json())))
    assert back == r


def _run(kind, q, wd, clip, steps=25, threads=2):
    w, _, loss_at = _problem()
    d = Directions(kind, threads=threads)
    mask = [True, False, True]
    records = [mezo_step(w, lambda: loss_at(w), step=t, seed=1000 + t, eps=1e-3, lr=lr_at(t, steps, 0.01, "linear"),
                         directions=d, n_directions=q, clip=clip, weight_decay=wd, decay=mask)
               for t in range(steps)]
    return w, records, mask


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("q,wd,clip", [(1, 0.0, None), (1, 0.3, 5.0), (2, 0.0, None), (3, 0.1, 0.5)])
def test_replay_rebuilds_weights_bit_exactly(kind, q, wd, clip):
    w, records, mask = _run(kind, q, wd, clip)
    fresh, _, _ = _problem()
    replay(fresh, records, Directions(kind, threads=1), decay=mask)
    for a, b in zip(w, fresh):
        np.testing.assert_array_equal(a, b)


def test_replay_in_two_parts_equals_one():
    w, records, mask = _run("rademacher", 1, 0.2, None, steps=10)
    one, _, _ = _problem()
    two, _, _ = _problem()
    d = Directions("rademacher", threads=1)
    replay(one, records, d, decay=mask)
    replay(two, records[:4], d, decay=mask)
    replay(two, records[4:], d, decay=mask)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", ["rademacher", "rademacher-counter", "gaussian"])
def test_loss_falls_on_a_learnable_problem(kind):
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(64, 20)).astype(np.float32), rng.normal(size=64).astype(np.float32)
    w = [np.zeros((4, 5), np.float32), np.zeros(3, np.float32)]

    def loss_fn():
        return float(np.mean((a @ w[0].ravel() - b) ** 2) + np.sum((w[1] - 1.0) ** 2))
    start = loss_fn()
    d = Directions(kind)
    for t in range(400):
        mezo_step(w, loss_fn, step=t, seed=t, eps=1e-3, lr=2e-3, directions=d)
    assert loss_fn() < 0.3 * start


def test_fzoo_step_is_the_normalized_one_sided_update_the_test_computes():
    """L0 = L(w); L_i = L(w + eps z_i); w1 = f w - lr / (N sigma) sum_i (L_i - L0) / eps z_i,
    sigma the sample standard deviation of the L_i (Dang et al. 2025), computed here in float64
    from the directions sampled by seed."""
    from ortzo.optim.fzoo import fzoo_step

    w, _, loss_at = _problem(3)
    w0 = [a.copy() for a in w]
    d, n, eps, lr, wd, mask = Directions("rademacher-counter", threads=1), 5, 1e-2, 1e-3, 0.5, [True, False, True]
    r = fzoo_step(w, lambda: loss_at(w), step=0, seed=77, eps=eps, lr=lr, directions=d, n_directions=n,
                  weight_decay=wd, decay=mask)
    zs = [d.sample([a.shape for a in w0], direction_seed(77, i)) for i in range(n)]
    base = loss_at(w0)
    losses = np.array([loss_at([a + eps * zi for a, zi in zip(w0, z)]) for z in zs])
    sigma = losses.std(ddof=1)
    assert r.loss == pytest.approx(base) and r.norm == pytest.approx(sigma, rel=1e-6)
    np.testing.assert_allclose(r.grads, (losses - base) / eps, rtol=1e-4)
    for b, (a, m) in enumerate(zip(w0, mask)):
        want = (1 - lr * wd if m else 1.0) * a.astype(np.float64)
        want -= lr / (n * sigma) * sum((li - base) / eps * z[b] for li, z in zip(losses, zs))
        np.testing.assert_allclose(w[b], want, rtol=0, atol=2e-5)
    assert not np.allclose(w[0], w0[0])


def test_fzoo_steps_replay_bit_exactly_and_learn():
    from ortzo.optim.fzoo import fzoo_step

    w, _, loss_at = _problem(4)
    start = loss_at(w)
    d = Directions("rademacher", threads=2)
    records = [fzoo_step(w, lambda: loss_at(w), step=t, seed=500 + t, eps=1e-3, lr=3e-4, directions=d,
                         n_directions=4, weight_decay=0.1, decay=[True, False, True]) for t in range(30)]
    assert loss_at(w) < start - 20  # from 15.9 to about -14 (the minimum is below)
    back = StepRecord.from_json(json.loads(json.dumps(records[3].to_json())))
    assert back == records[3] and back.estimator == "fzoo"
    fresh, _, _ = _problem(4)
    replay(fresh, records, Directions("rademacher", threads=1), decay=[True, False, True])
    for a, b in zip(w, fresh):
        np.testing.assert_array_equal(a, b)


def test_fzoo_refuses_one_direction():
    from ortzo.optim.fzoo import fzoo_step

    w, _, _ = _problem()
    with pytest.raises(ValueError, match="at least 2 directions"):
        fzoo_step(w, lambda: 1.0, step=0, seed=1, eps=1e-3, lr=1e-3, directions=Directions(), n_directions=1)
