"""Initializers stored in an external data file, written one tensor at a time.

A graph with its weights inside cannot pass protobuf's 2 GB, and holding every tensor in one
ModelProto would hold a second copy of the model. So tensors go to a data file beside the graph
as they are made, each aligned so that ORT can memory-map it (tensors of 1 MiB or more start on
64 KiB, every OS's mmap granularity; smaller ones at 64 bytes), and the graph keeps only their
locations. The file's sha256 is kept as it grows.
"""
from __future__ import annotations

import hashlib
from typing import IO, TYPE_CHECKING

import numpy as np

from .manifest import ALIGN

if TYPE_CHECKING:
    import onnx

MAP_ALIGN, MAP_THRESHOLD = 1 << 16, 1 << 20


class DataFile:
    """Appends tensors to the open binary file `f`, which the graph refers to as `location`
    (a name relative to the graph's folder)."""

    def __init__(self, f: IO[bytes], location: str) -> None:
        self._f, self.location = f, location
        self._h = hashlib.sha256()
        self.size = 0

    def add(self, name: str, array: np.ndarray) -> onnx.TensorProto:
        """`array` written at the next aligned offset; the initializer that points at it."""
        from onnx import numpy_helper
        from onnx.external_data_helper import set_external_data

        t = numpy_helper.from_array(np.ascontiguousarray(array), name)
        data = t.raw_data
        align = MAP_ALIGN if len(data) >= MAP_THRESHOLD else ALIGN
        start = -(-self.size // align) * align
        self._write(b"\0" * (start - self.size))
        self._write(data)
        set_external_data(t, self.location, start, len(data))
        t.ClearField("raw_data")
        return t

    @property
    def sha256(self) -> str:
        return self._h.hexdigest()

    def _write(self, data: bytes) -> None:
        self._f.write(data)
        self._h.update(data)
        self.size += len(data)
