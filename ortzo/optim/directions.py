"""Random directions z, regenerated from a seed instead of stored.

A direction over a list of buffers is cut into fixed chunks; chunk c of buffer b draws its
values from its own stream keyed by (seed, b, c). So z never exists as one full-size array
(temporary memory is one sub-chunk per thread), and the values do not depend on how many
threads run or in which order the chunks are visited.

Kinds (each has E[z] = 0 and E[z z^T] = I over the seeds):
- "rademacher": +-1 from random bits (classic SPSA). Cheapest to generate.
- "rademacher-counter": the same distribution from a counter-based generator: element i of
  chunk c of buffer b is a pure function of (seed, b, c, i) (`counter_key`, `counter_word`), so a
  GPU kernel computes the same values without any stream state (optim/cuda.py), and a step
  log written on one device replays on any other to the same weights, bit for bit.
- "gaussian": fresh N(0, 1) per element, as in MeZO. Generating normals dominates its cost.
- "gaussian-table": windows of a fixed N(0, 1) table at seeded offsets (the shared noise
  table of Salimans et al., 2017), each element's sign flipped by its own random bit. The
  window alone would give E[z z^T] = the table's autocovariance (eigenvalues 0.72-1.34 over a
  2^16 window); the independent signs make every off-diagonal expectation zero.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property

import numpy as np

KINDS = ("rademacher", "rademacher-counter", "gaussian", "gaussian-table")
DEFAULT_KIND = "rademacher-counter"  # as cheap as "rademacher" and the same on every device
CHUNK = 1 << 20  # elements per random stream
SUB = 1 << 16  # elements per cache-sized piece of work inside a chunk
TABLE_SIZE = 1 << 23  # 32 MiB of float32
TABLE_SEED = 20230527


class Directions:
    """Adds scale * z(seed) to float32 buffers in place, on `threads` threads."""

    def __init__(self, kind: str = DEFAULT_KIND, threads: int | None = None) -> None:
        if kind not in KINDS:
            raise ValueError(f"unknown direction kind {kind!r}; choose one of {', '.join(KINDS)}")
        self.kind = kind
        self.threads = threads or os.cpu_count() or 1
        self._pool = ThreadPoolExecutor(self.threads) if self.threads > 1 else None

    @cached_property
    def _table(self) -> np.ndarray:
        rng = np.random.Generator(np.random.SFC64(TABLE_SEED))
        return rng.standard_normal(TABLE_SIZE, dtype=np.float32)

    def add(self, buffers: Sequence[np.ndarray], seed: int, scale: float | Sequence[float]) -> None:
        """buffers[b] += scale[b] * z(seed)[b], in place (one `scale` for all buffers, or one
        per buffer). Buffers must be C-contiguous float32."""
        flats = [_flat(b) for b in buffers]
        scales = [np.float32(s) for s in (scale if isinstance(scale, Sequence) else [scale] * len(flats))]
        if len(scales) != len(flats):
            raise ValueError(f"{len(scales)} scales for {len(flats)} buffers")
        work = [(b, c) for b, f in enumerate(flats) for c in range(0, f.size, CHUNK)]
        table = self._table if self.kind == "gaussian-table" else None  # built once, outside the threads

        def run(bc: tuple[int, int]) -> None:
            b, c = bc
            self._add_chunk(flats[b][c:c + CHUNK], (seed, b, c // CHUNK), scales[b], table)

        if self._pool is None:
            for bc in work:
                run(bc)
        else:
            list(self._pool.map(run, work))

    def sample(self, shapes: Sequence[tuple[int, ...]], seed: int) -> list[np.ndarray]:
        """z itself, materialized: for tests and for driving a model outside ORT."""
        zs = [np.zeros(s, np.float32) for s in shapes]
        self.add(zs, seed, 1.0)
        return zs

    def _add_chunk(self, out: np.ndarray, key: tuple[int, int, int], scale: np.float32,
                   table: np.ndarray | None) -> None:
        if self.kind != "rademacher-counter":
            rng = np.random.Generator(np.random.SFC64(np.random.SeedSequence(key)))
        n = out.size
        tmp = np.empty(-(-min(SUB, n) // 8) * 8, np.float32)  # whole bytes of bits
        words = tmp.view(np.uint32)
        if self.kind in ("rademacher", "rademacher-counter"):
            # z = +1 for a 0 bit, -1 for a 1 bit; each byte of bits picks its 8 values of
            # +-scale from a table, one gather instead of unpack, shift and sign-flip passes.
            if self.kind == "rademacher":
                signs = np.where(_BYTE_BITS, -scale, scale)
                bits = rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
            else:  # bit i % 64 of word i // 64: little-endian bytes, least significant bit first
                signs = np.where(_BYTE_BITS_LSB, -scale, scale)
                words = counter_word(counter_key(*key), np.arange((n + 63) // 64, dtype=np.uint64))
                bits = words.astype("<u8", copy=False).view(np.uint8)
            rows = tmp.reshape(-1, 8)
            for j in range(0, n, SUB):
                m = min(SUB, n - j)
                k = (m + 7) // 8
                np.take(signs, bits[j // 8:j // 8 + k], axis=0, out=rows[:k])
                out[j:j + m] += tmp[:m]
            return
        if self.kind == "gaussian":
            for j in range(0, n, SUB):
                t = tmp[: min(SUB, n - j)]
                rng.standard_normal(out=t, dtype=np.float32)
                t *= scale
                out[j:j + t.size] += t
            return
        # gaussian-table: the window with each sign flipped by its bit (a 1 bit flips), times `scale`
        offsets = rng.integers(0, TABLE_SIZE - SUB, size=(n + SUB - 1) // SUB)
        bits = rng.integers(0, 256, size=(n + 7) // 8, dtype=np.uint8)
        for k, j in enumerate(range(0, n, SUB)):
            m = min(SUB, n - j)
            np.left_shift(np.unpackbits(bits[j // 8:(j + m + 7) // 8], count=m), 31, out=words[:m], dtype=np.uint32)
            words[:m] ^= table[offsets[k]:offsets[k] + m].view(np.uint32)
            tmp[:m] *= scale
            out[j:j + m] += tmp[:m]


_BYTE_BITS = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1).astype(bool)  # [byte, bit], MSB first
_BYTE_BITS_LSB = _BYTE_BITS[:, ::-1]

# The counter-based generator: SplitMix64 (Steele, Lea and Flood, "Fast splittable
# pseudorandom number generators", OOPSLA 2014), whose n-th output is mix(state + n * GAMMA):
# a pure function of (state, n). optim/cuda.py computes the same in a CUDA kernel.
GAMMA = np.uint64(0x9E3779B97F4A7C15)
_M1, _M2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)


def _mix(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finalizer, a bijection of uint64 (wrapping arithmetic, in place on `x`)."""
    x ^= x >> _S30
    x *= _M1
    x ^= x >> _S27
    x *= _M2
    x ^= x >> _S31
    return x


def counter_key(seed: int, buffer: int, chunk: int) -> np.uint64:
    """The key of chunk `chunk` of buffer `buffer` under `seed`: three chained SplitMix64 steps."""
    k = np.array([seed], np.uint64)
    for part in (buffer, chunk):
        k = _mix(k + GAMMA)
        k += np.uint64(part)
    return _mix(k + GAMMA)[0]


def counter_word(key: np.uint64, index: np.ndarray) -> np.ndarray:
    """64 random bits for each word index (uint64): SplitMix64's output number index + 1."""
    return _mix(key + (index + np.uint64(1)) * GAMMA)


def _flat(a: np.ndarray) -> np.ndarray:
    if a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError("directions work on C-contiguous float32 buffers")
    return a.reshape(-1)
