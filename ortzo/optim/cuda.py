"""Directions on a CUDA device: `Directions("rademacher-counter").add` as one CuPy kernel.

The kernel computes exactly the CPU's values (optim/directions.py: chunk key
`counter_key(seed, buffer, chunk)`, word `counter_word(key, i // 64)`, sign from bit i % 64)
and adds them with the same float32 arithmetic, so a step log written on the GPU replays on
the CPU to the same weights bit for bit, and the other way round. One launch covers every
buffer of a step (a table of their device pointers), so a pass costs one read and one write
of the trained weights and no temporary. Only the counter-based kind exists here: the others
draw from sequential stream generators, which a GPU cannot reproduce element by element.

Needs CuPy (the `cuda` extra); knows nothing about ONNX: the buffers are CuPy float32 arrays.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import numpy as np

from ..errors import OrtzoError
from .directions import CHUNK, GAMMA

KIND = "rademacher-counter"
THREADS = 256

_SOURCE = r"""
__device__ __forceinline__ unsigned long long mix(unsigned long long x) {
    x ^= x >> 30; x *= 0xBF58476D1CE4E5B9ULL;
    x ^= x >> 27; x *= 0x94D049BB133111EBULL;
    return x ^ (x >> 31);
}

extern "C" __global__ void add_counter(const unsigned long long* ptrs, const long long* starts, const float* scales,
                                       int n_buffers, long long total, unsigned long long seed) {
    const unsigned long long G = GAMMA_ULL;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < total;
         t += (long long)gridDim.x * blockDim.x) {
        int lo = 0, hi = n_buffers - 1;           /* the buffer holding element t: starts[b] <= t */
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (starts[mid] <= t) lo = mid; else hi = mid - 1;
        }
        unsigned long long i = (unsigned long long)(t - starts[lo]);
        unsigned long long k = mix(mix(mix(seed + G) + (unsigned long long)lo + G) + i / CHUNK_ULL + G);
        unsigned long long x = mix(k + ((i % CHUNK_ULL) / 64ULL + 1ULL) * G);
        float s = scales[lo];
        float* w = (float*)ptrs[lo];
        w[i] = w[i] + (((x >> (i & 63ULL)) & 1ULL) ? -s : s);
    }
}
"""


def kernel_source() -> str:
    """The kernel's CUDA C, constants filled in (a test compiles it for the host too)."""
    return _SOURCE.replace("GAMMA_ULL", f"{int(GAMMA)}ULL").replace("CHUNK_ULL", f"{CHUNK}ULL")


class CudaDirections:
    """Adds scale * z(seed) to CuPy float32 buffers in place, on the device."""

    threads = 1  # the device's parallelism is the kernel's own

    def __init__(self, kind: str = KIND) -> None:
        if kind != KIND:
            raise OrtzoError(f"directions {kind!r} have no device kernel: use --directions {KIND} on a GPU "
                             "(the same +-1 distribution, computed identically on the CPU)")
        self.kind = kind
        self._tables: dict[tuple[int, ...], tuple] = {}

    @cached_property
    def _kernel(self):
        import cupy as cp

        return cp.RawKernel(kernel_source(), "add_counter")

    def add(self, buffers: Sequence, seed: int, scale: float | Sequence[float]) -> None:
        """buffers[b] += scale[b] * z(seed)[b], as `Directions.add` (one scale or one per buffer)."""
        import cupy as cp

        scales = list(scale) if isinstance(scale, Sequence) else [scale] * len(buffers)
        if len(scales) != len(buffers):
            raise ValueError(f"{len(scales)} scales for {len(buffers)} buffers")
        if not buffers:
            return
        ptrs, starts, total = self._table(buffers)
        n_blocks = int(min(-(-total // THREADS), 65535 * 8))
        self._kernel((n_blocks,), (THREADS,),
                     (ptrs, starts, cp.asarray(np.asarray(scales, np.float32)), np.int32(len(buffers)),
                      np.int64(total), np.uint64(seed)))

    def sample(self, shapes: Sequence[tuple[int, ...]], seed: int) -> list[np.ndarray]:
        """z itself, on the host: for tests against the CPU generator."""
        import cupy as cp

        zs = [cp.zeros(s, cp.float32) for s in shapes]
        self.add(zs, seed, 1.0)
        return [cp.asnumpy(z) for z in zs]

    def _table(self, buffers: Sequence) -> tuple:
        """Device arrays of the buffers' pointers and first element numbers, built once per list."""
        import cupy as cp

        key = tuple(b.data.ptr for b in buffers)
        if key not in self._tables:
            for b in buffers:
                if b.dtype != np.float32 or not b.flags.c_contiguous:
                    raise ValueError("directions work on C-contiguous float32 buffers")
            sizes = np.array([b.size for b in buffers], np.int64)
            starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
            self._tables[key] = (cp.asarray(np.array(key, np.uint64)), cp.asarray(starts), int(sizes.sum()))
        return self._tables[key]
