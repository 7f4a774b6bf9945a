"""A frozen base's matrices read back as float arrays in PyTorch's layout: the PyTorch baselines
(`--engine torch-bp`) rebuild the model from them and train the same vectors and LoRA that ortzo
trains over the base, so the comparison runs on one CLI, one metrics format and one start.

Quantized matrices come back as MatMulNBits computes them from the stored bytes ((q - zero
point) x the block's scale, low nibble first); fp32 ones as stored. One tensor at a time, read
with pread from the base's data file. Needs onnx (the `onnx` extra).
"""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ..errors import OrtzoError
from .manifest import Manifest


def dequantize(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, bits: int, k: int,
               n: int) -> np.ndarray:
    """The matrix [K, N] (as MatMul's B) that MatMulNBits multiplies by: `packed` [N, blocks,
    block * bits / 8] (a table's rows [N, K * bits / 8] too), `scales` [N, blocks], zero points
    none (2^(bits-1)), float [N, blocks], or uint8 packed like q."""
    blocks = scales.shape[-1]
    flat = packed.reshape(n, -1)
    q = np.stack([flat & 15, flat >> 4], -1).reshape(n, blocks, -1) if bits == 4 else flat.reshape(n, blocks, -1)
    if zero_points is None:
        zero = np.full((n, blocks), 2.0 ** (bits - 1), np.float32)
    elif zero_points.dtype == np.float32:
        zero = zero_points.reshape(n, blocks)
    else:
        zp = zero_points.reshape(n, -1)
        zero = (np.stack([zp & 15, zp >> 4], -1).reshape(n, -1) if bits == 4 else zp)[:, :blocks].astype(np.float32)
    w = (q.astype(np.float32) - zero[..., None]) * scales.reshape(n, blocks)[..., None]
    return np.ascontiguousarray(w.reshape(n, -1)[:, :k].T)


def frozen_tensors(folder: str | Path, manifest: Manifest) -> Iterator[tuple[str, np.ndarray]]:
    """(name, value in PyTorch's layout) of every frozen weight of the folder's base."""
    import onnx
    from onnx import helper

    folder = Path(folder)
    graph = onnx.load(str(folder / manifest.graph), load_external_data=False).graph
    where = {t.name: t for t in graph.initializer}
    fd = os.open(folder / manifest.base["data"], os.O_RDONLY)
    try:
        def read(name: str) -> np.ndarray:
            t = where.get(name)
            if t is None or t.data_location != onnx.TensorProto.EXTERNAL:
                raise OrtzoError(f"{folder / manifest.graph} has no stored tensor {name} that its base records: "
                                 "the folder is corrupt")
            info = {e.key: e.value for e in t.external_data}
            n = int(info["length"])
            buf = bytearray(n)
            if os.preadv(fd, [buf], int(info["offset"])) != n:
                raise OrtzoError(f"{folder / manifest.base['data']} ends inside {name}: the frozen base is truncated")
            return np.frombuffer(buf, helper.tensor_dtype_to_np_dtype(t.data_type)).reshape(tuple(t.dims))

        for f in manifest.base["frozen"]:
            if "transposed" not in f:
                raise OrtzoError(f"{folder}'s frozen base predates the PyTorch baselines over it: export it again")
            name, stored = f["name"], f["stored"]
            if stored.startswith("int"):
                bits, (k, n) = int(stored.removeprefix("int")), f["k_n"]
                data = f"{name}/q{bits}" if f"{name}/q{bits}" in where else f"{name}/q{bits}/rows"
                zp = f"{name}/zero_points"
                as_b = dequantize(read(data), read(f"{name}/scales"), read(zp) if zp in where else None, bits, k, n)
                value = as_b.T if f["stored_out_in"] else as_b  # the folder's layout
            else:
                value = read(name).astype(np.float32)
            yield name, np.ascontiguousarray(value.T if f["transposed"] else value)
    finally:
        os.close(fd)
