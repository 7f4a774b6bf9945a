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
    if kind.startswith("rademacher"):
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
    "rademacher-counter": "968ccbe7df44746f4fc3c7139fd520d26be1fa1b088dbf602d963ad6f7f28729",
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
    with pytest.raises(ValueError, match="unknown direction kind 'uniform'; choose one of rademacher, rademacher-counter, gaussian"):
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


MASK = (1 << 64) - 1


def _splitmix(x: int) -> int:
    """SplitMix64's finalizer in Python integers: the spec, independent of NumPy's arithmetic."""
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9 & MASK
    x = (x ^ (x >> 27)) * 0x94D049BB133111EB & MASK
    return x ^ (x >> 31)


def _counter_z(seed: int, buffer: int, i: int) -> float:
    """Element i of buffer `buffer` under `seed`, as the CUDA kernel computes it: chunk key from
    (seed, buffer, chunk), then bit i % 64 of word (i % CHUNK) // 64."""
    g = 0x9E3779B97F4A7C15
    chunk, local = divmod(i, CHUNK)
    key = _splitmix((_splitmix((_splitmix((seed + g) & MASK) + buffer + g) & MASK) + chunk + g) & MASK)
    word = _splitmix((key + (local // 64 + 1) * g) & MASK)
    return -1.0 if word >> (i % 64) & 1 else 1.0


def test_counter_directions_follow_their_spec():
    """The values a step log's seed stands for on every device: checked element by element
    (both ends of every chunk and random places) against the spec in plain integers."""
    shapes = [(CHUNK + 70_001,), (3, 5), (2 * CHUNK + 3,)]
    seed = 2**32 - 5  # step seeds are 32-bit
    zs = [z.reshape(-1) for z in Directions("rademacher-counter", threads=2).sample(shapes, seed)]
    rng = np.random.default_rng(0)
    for b, z in enumerate(zs):
        idx = {i for i in (0, 63, 64, z.size - 1) if i < z.size} | set(rng.integers(0, z.size, 300).tolist())
        idx |= {c + d for c in range(0, z.size, CHUNK) for d in (-1, 0, 1) if 0 <= c + d < z.size}
        for i in sorted(idx):
            assert z[i] == _counter_z(seed, b, i), (b, i)


def test_counter_directions_depend_on_buffer_and_chunk():
    d = Directions("rademacher-counter", threads=1)
    a, b = d.sample([(CHUNK * 2,), (CHUNK * 2,)], seed=7)
    assert np.mean(a == b) < 0.55  # another buffer index: another stream
    assert np.mean(a[:CHUNK] == a[CHUNK:]) < 0.55  # another chunk: another stream


def _gpu() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


@pytest.mark.skipif(not _gpu(), reason="needs CuPy and a CUDA GPU")
def test_device_kernel_equals_cpu_bit_for_bit():
    from ortzo.optim.cuda import CudaDirections

    shapes = [(CHUNK + 70_001,), (3, 5), (0,), (2 * CHUNK + 3,)]
    for seed in (0, 42, 2**32 - 1):
        cpu = Directions("rademacher-counter", threads=2).sample(shapes, seed)
        gpu = CudaDirections().sample(shapes, seed)
        for c, g in zip(cpu, gpu):
            np.testing.assert_array_equal(c, g)


@pytest.mark.skipif(not _gpu(), reason="needs CuPy and a CUDA GPU")
def test_device_steps_replay_on_the_cpu_bit_for_bit():
    """A step log written on the GPU rebuilds the same weights on the CPU."""
    import cupy as cp

    from ortzo.optim.cuda import CudaDirections
    from ortzo.optim.mezo import decay_mask, mezo_step, replay

    rng = np.random.default_rng(1)
    w0 = [rng.standard_normal(s).astype(np.float32) for s in ((CHUNK + 5,), (7, 3), (11,))]
    dev = [cp.asarray(w) for w in w0]
    target = [cp.asarray(rng.standard_normal(w.shape).astype(np.float32)) for w in w0]
    loss = lambda: float(sum(cp.sum((d - t) ** 2) for d, t in zip(dev, target)))  # noqa: E731
    records = [mezo_step(dev, loss, step=k, seed=100 + k, eps=1e-3, lr=1e-4, directions=CudaDirections(),
                         n_directions=1 + k % 2, weight_decay=0.1, decay=decay_mask(w0)) for k in range(6)]
    host = [w.copy() for w in w0]
    replay(host, records, Directions("rademacher-counter", threads=2), decay_mask(host))
    for h, d in zip(host, dev):
        np.testing.assert_array_equal(h, cp.asnumpy(d))


def test_device_kernel_source_computes_the_cpu_values(tmp_path):
    """The CUDA kernel's own source, compiled as C for the host (one thread walking the grid),
    adds exactly what the CPU generator adds: its arithmetic is checked where no GPU is."""
    import ctypes
    import shutil
    import subprocess

    from ortzo.optim import cuda

    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler")
    prelude = ("#define __device__\n#define __forceinline__ static inline\n#define __global__\n"
               "static struct { unsigned x; } blockIdx = {0}, threadIdx = {0}, blockDim = {1}, gridDim = {1};\n")
    src = tmp_path / "kernel.c"
    src.write_text(prelude + cuda.kernel_source().replace('extern "C" ', ""))
    lib = tmp_path / "kernel.so"
    subprocess.run([cc, "-O1", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True)
    kernel = ctypes.CDLL(str(lib)).add_counter
    shapes, seed, scales = [(CHUNK + 70_001,), (3, 5), (0,), (2 * CHUNK + 3,)], 2**32 - 7, [1e-3, -2.5, 1.0, 0.75]
    rng = np.random.default_rng(3)
    w0 = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    host = [w.copy() for w in w0]
    ptrs = np.array([w.ctypes.data for w in host], np.uint64)
    starts = np.concatenate([[0], np.cumsum([w.size for w in host])[:-1]]).astype(np.int64)
    kernel(ctypes.c_void_p(ptrs.ctypes.data), ctypes.c_void_p(starts.ctypes.data),
           ctypes.c_void_p(np.array(scales, np.float32).ctypes.data), ctypes.c_int(len(host)),
           ctypes.c_longlong(sum(w.size for w in host)), ctypes.c_ulonglong(seed))
    want = [w.copy() for w in w0]
    Directions("rademacher-counter", threads=2).add(want, seed, scales)
    for h, w in zip(host, want):
        np.testing.assert_array_equal(h, w)
