"""The weight store: every parameter in one aligned NumPy buffer, read from the flat file.

The arrays it hands out are views into that buffer. The ORT session binds them once, so an
in-place change here is what the next forward computes with: no copy, no re-binding.
"""
from __future__ import annotations

import hashlib
from fnmatch import fnmatch
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

import numpy as np

from ..errors import OrtzoError
from ..files import READ_BLOCK, atomic_open, sha256_file
from .manifest import ALIGN, Manifest

PARAMS = ("all", "vectors")  # what `select` chooses among: every parameter, or the one-dimensional ones


class Resident(Protocol):
    """A copy of the store's buffer elsewhere that training changes (device memory)."""

    def download(self) -> None:
        """Copy the live weights into the store's buffer."""


class WeightStore:
    """`arrays` are what the session reads. fp16 parameters that train get fp32 `masters`
    (MeZO's +eps/-2eps/+eps round trip does not restore fp16 values, and 1e-6 updates vanish
    in fp16); `sync` rounds the masters into the fp16 arrays before a forward."""

    def __init__(self, manifest: Manifest, buffer: np.ndarray) -> None:
        self.manifest = manifest
        self.buffer = buffer
        self.arrays: dict[str, np.ndarray] = {
            p.name: buffer[p.offset:p.offset + p.nbytes].view(p.dtype).reshape(p.shape)
            for p in manifest.parameters
        }
        self.masters: dict[str, np.ndarray] = {}
        self.flipped: set[str] = set()
        self.resident: Resident | None = None  # where the live weights are when not here (a GPU)

    def to_torch_layout(self) -> None:
        """Rewrite, in place, each parameter stored transposed ([in, out], for ORT's MatMul) in
        PyTorch's layout ([out, in], contiguous); `arrays` then hold that layout. For PyTorch
        engines: a transposed view would slow their matmuls by a quarter (measured on
        SmolLM2), and a second copy would double the weights' memory. `save` still writes the
        folder's layout. The ORT session must not read a store in this layout."""
        for p in self.manifest.parameters:
            if p.transposed and p.name not in self.flipped:
                torch_layout = np.ascontiguousarray(self.arrays[p.name].T)  # one parameter's copy, briefly
                region = self.buffer[p.offset:p.offset + p.nbytes].view(p.dtype).reshape(torch_layout.shape)
                region[...] = torch_layout
                self.arrays[p.name] = region
                self.flipped.add(p.name)

    def trainable(self, names: Sequence[str]) -> list[np.ndarray]:
        """The float32 buffers an optimizer changes: the arrays themselves, or fp32 masters."""
        out = []
        for n in names:
            a = self.arrays[n]
            if a.dtype != np.float32 and n not in self.masters:
                self.masters[n] = a.astype(np.float32)
            out.append(self.masters.get(n, a))
        return out

    def sync(self) -> None:
        for n, m in self.masters.items():
            np.copyto(self.arrays[n], m, casting="same_kind")

    def save_masters(self, path: str | Path) -> str:
        """The fp32 masters, concatenated in creation order, atomically; returns the sha256."""
        return _write_hashed(path, (memoryview(m).cast("B") for m in self.masters.values()))

    def load_masters(self, path: str | Path, names: Sequence[str], sha256: str) -> None:
        data = Path(path).read_bytes()
        if hashlib.sha256(data).hexdigest() != sha256:
            raise OrtzoError(f"checksum mismatch for {path}: the master weights are corrupt")
        pos = 0
        for n in names:
            shape = self.arrays[n].shape
            m = np.frombuffer(data, np.float32, count=int(np.prod(shape)), offset=pos).reshape(shape).copy()
            self.masters[n] = m
            pos += m.nbytes
        self.sync()

    @classmethod
    def load(cls, folder: str | Path, manifest: Manifest, weights: str | Path | None = None,
             sha256: str | None = None) -> WeightStore:
        """Read the folder's weight file, checked against the manifest's sha256, or `weights` (a
        checkpoint's, a saved one), checked against `sha256` when given: a file this model saved
        after fine-tuning has its own hash, not the export's."""
        path = Path(weights) if weights is not None else Path(folder) / manifest.weights
        expected = manifest.weights_sha256 if weights is None else sha256
        if not path.is_file():
            raise OrtzoError(f"weight file not found: {path}")
        size = path.stat().st_size
        if size != manifest.weights_bytes:
            raise OrtzoError(f"weight file {path} has {size} bytes, manifest says {manifest.weights_bytes}")
        buffer = _aligned_empty(size)
        digest = _read_into(path, buffer)
        if expected is not None and digest != expected:
            raise OrtzoError(f"checksum mismatch for {path}: the weight file is corrupt or not this model's")
        return cls(manifest, buffer)

    def reload(self, path: str | Path, sha256: str | None = None) -> None:
        """Read another weight file of this model into the buffer the sessions bind, in place.
        The file is checked whole first, so a corrupt one leaves the weights untouched."""
        path = Path(path)
        if not path.is_file():
            raise OrtzoError(f"weight file not found: {path}")
        if path.stat().st_size != self.manifest.weights_bytes:
            raise OrtzoError(f"weight file {path} has {path.stat().st_size} bytes, manifest says "
                             f"{self.manifest.weights_bytes}")
        if sha256 is not None and sha256_file(path) != sha256:
            raise OrtzoError(f"checksum mismatch for {path}: the weight file is corrupt or not the one saved")
        if self.flipped:
            raise OrtzoError("reload needs the folder's layout: this store is in PyTorch's")
        _read_into(path, self.buffer)
        for n, m in self.masters.items():
            m[...] = self.arrays[n]

    def save(self, path: str | Path) -> str:
        """Write the whole buffer atomically in the folder's layout (masters rounded in first,
        flipped parameters transposed back on the way out); returns its sha256."""
        if self.resident is not None:
            self.resident.download()
        self.sync()
        return _write_hashed(path, self._blocks())

    def _blocks(self) -> Iterator[memoryview]:
        view, pos = memoryview(self.buffer), 0
        for p in sorted((self.manifest.param(n) for n in self.flipped), key=lambda p: p.offset):
            yield from _chunks(view[pos:p.offset])
            file_layout = self.arrays[p.name].T
            rows = max(1, READ_BLOCK // (file_layout.shape[1] * file_layout.itemsize))
            for i in range(0, len(file_layout), rows):
                yield memoryview(np.ascontiguousarray(file_layout[i:i + rows])).cast("B")
            pos = p.offset + p.nbytes
        yield from _chunks(view[pos:])

    def select(self, include: Sequence[str] = ("*",), exclude: Sequence[str] = (), vectors: bool = False) -> list[str]:
        """Names of the parameters that match an include pattern and no exclude pattern; with `vectors`,
        only the one-dimensional ones (norm scales, biases): a family-independent small subset."""
        names = [n for n, a in self.arrays.items()
                 if any(fnmatch(n, p) for p in include) and not any(fnmatch(n, p) for p in exclude)
                 and (not vectors or a.ndim == 1)]
        if not names:
            raise OrtzoError(f"no {'one-dimensional ' * vectors}parameter matches include={list(include)} "
                             f"exclude={list(exclude)}")
        return names


def _read_into(path: Path, buffer: np.ndarray) -> str:
    """Fill `buffer` from `path`; the sha256 of what was read."""
    h, view, size = hashlib.sha256(), memoryview(buffer), buffer.size
    with open(path, "rb") as f:
        pos = 0
        while pos < size:
            n = f.readinto(view[pos:pos + READ_BLOCK])
            if not n:
                raise OrtzoError(f"weight file {path} ended early at byte {pos}")
            h.update(view[pos:pos + n])
            pos += n
    return h.hexdigest()


def _chunks(view: memoryview) -> Iterator[memoryview]:
    return (view[pos:pos + READ_BLOCK] for pos in range(0, len(view), READ_BLOCK))


def _write_hashed(path: str | Path, blocks: Iterable[memoryview]) -> str:
    h = hashlib.sha256()
    with atomic_open(path, "wb") as f:
        for block in blocks:
            h.update(block)
            f.write(block)
    return h.hexdigest()


def _aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(nbytes + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + nbytes]
