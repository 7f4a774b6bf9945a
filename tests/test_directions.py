"""Directions are a pure function of the seed: any thread count, chunking or buffer layout."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ortzo.optim import directions as directions_module
from ortzo.optim.directions import CHUNK, KINDS, Directions

SIZES = [(3, 5), (CHUNK + 17,), (2 * CHUNK - 1,), (1,)]


@pytest.mark.parametrize("kind", KINDS)
def test_thread_count_does_not_change_z(kind):
    zs = [Directions(kind, threads=t).sample(SIZES, seed=42) for t in (1, 2, 3)]
    for a, b in zip(zs[0], zs[1]):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(zs[0], zs[2]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("kind", KINDS)
def test_add_is_scale_times_sample(kind):
    d = Directions(kind, threads=2)
    rng = np.random.default_rng(0)
    w = [rng.normal(size=s).astype(np.float32) for s in SIZES]
    w0 = [a.copy() for a in w]
    d.add(w, seed=7, scale=0.25)
    for a, a0, z in zip(w, w0, d.sample(SIZES, seed=7)):
        np.testing.assert_array_equal(a, a0 + np.float32(0.25) * z)


@pytest.mark.parametrize("kind", KINDS)
def test_distribution(kind):
    z = np.concatenate([a.ravel() for a in Directions(kind).sample([(3 * CHUNK,)], seed=1)])
    assert abs(z.mean()) < 0.01 and abs(z.var() - 1) < 0.01
    if kind == "rademacher":
        assert set(np.unique(z)) == {-1.0, 1.0}
    else:  # normal tails: P(|z| > 2) = 0.0455
        assert abs((np.abs(z) > 2).mean() - 0.0455) < 0.002


@pytest.mark.parametrize("kind", KINDS)
def test_directions_of_different_seeds_are_nearly_orthogonal(kind):
    d = Directions(kind)
    a, b = (d.sample([(CHUNK,)], seed=s)[0] for s in (1, 2))
    assert abs(float(a @ b)) / CHUNK < 0.01


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**63 - 1), n=st.integers(1, 3000), kind=st.sampled_from(KINDS))
def test_plus_then_minus_restores_within_rounding(seed, n, kind):
    d = Directions(kind, threads=1)
    w = np.linspace(-1, 1, n, dtype=np.float32)
    w0 = w.copy()
    d.add([w], seed, 1e-3)
    d.add([w], seed, -1e-3)
    np.testing.assert_allclose(w, w0, atol=1e-6)


STREAMS = {  # sha256 of z(seed 42) over buffers of CHUNK + 70001 and 3 x 5 elements
    "rademacher": "742d5b80be7b199571cd7655ddcd79d9bfe8ffb51834f1f2e621e7ca608ec30c",
    "gaussian": "b818066fadaadbf3d7f31a3cefdc39e1ae3838eb681eb26bc2dd4e50b7635c2f",
    "gaussian-table": "f49eb1b09207e6350a82f6d9fa0a3010583cb56a0dd6840e7298588afba7700b",
}


@pytest.mark.parametrize("kind", KINDS)
def test_streams_do_not_change_between_versions(kind):
    """A step log names directions by seed only: if these values change, logs written by
    earlier versions no longer replay to their weights. Change them only on purpose."""
    import hashlib

    zs = Directions(kind, threads=2).sample([(CHUNK + 70_001,), (3, 5)], seed=42)
    assert hashlib.sha256(b"".join(z.tobytes() for z in zs)).hexdigest() == STREAMS[kind]


def test_one_thread_per_core_by_default():
    import os

    assert Directions().threads == os.cpu_count() and Directions(threads=3).threads == 3


def test_unknown_kind_and_bad_buffers():
    with pytest.raises(ValueError, match="unknown direction kind 'uniform'; choose one of rademacher, gaussian"):
        Directions("uniform")
    with pytest.raises(ValueError, match="float32"):
        Directions().add([np.zeros(4)], 0, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_directions_are_isotropic(kind, monkeypatch):
    """E[z z^T] = I over seeds. With a small table the table windows' own autocovariance is
    large (~1/sqrt(64) off the diagonal): only independent per-element signs remove it."""
    monkeypatch.setattr(directions_module, "TABLE_SIZE", 64)
    monkeypatch.setattr(directions_module, "SUB", 16)
    d = Directions(kind, threads=1)
    n, seeds = 16, 20000
    z = np.stack([d.sample([(n,)], seed=s)[0] for s in range(seeds)]).astype(np.float64)
    cov = z.T @ z / seeds
    off = cov[~np.eye(n, dtype=bool)]
    assert np.abs(off).max() < 0.05, np.abs(off).max()
    if kind == "gaussian-table":  # the diagonal is the table's mean square over the window positions
        table = d._table.astype(np.float64)
        want = [np.mean(table[i:i + 64 - 16] ** 2) for i in range(n)]
        np.testing.assert_allclose(np.diag(cov), want, atol=0.06)
    else:
        np.testing.assert_allclose(np.diag(cov), 1.0, atol=0.05)


def test_per_buffer_scales():
    d = Directions("rademacher", threads=1)
    w = [np.zeros(5, np.float32), np.zeros(7, np.float32)]
    d.add(w, seed=3, scale=[2.0, -0.5])
    z = d.sample([(5,), (7,)], seed=3)
    np.testing.assert_array_equal(w[0], 2 * z[0])
    np.testing.assert_array_equal(w[1], -0.5 * z[1])
    with pytest.raises(ValueError, match="scales"):
        d.add(w, seed=3, scale=[1.0])
