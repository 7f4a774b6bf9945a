"""The flat weight file, written one tensor at a time and resumable: each tensor 64-byte
aligned, in C order, cast and transposed block by block, the file's sha256 kept as it grows.

A journal beside the file records each tensor once its bytes are flushed; a writer opened on
a file with a journal (an export killed half way) truncates the file to the last recorded
tensor, re-hashes what is there and goes on from the next one. A 7B model's 27 GB are minutes
of writing that a crash should not cost again."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import IO, Any

import numpy as np

from ..manifest import Parameter, aligned

BLOCK_BYTES = 1 << 24


class FlatWriter:
    """Appends tensors to `path`; `journal` (None: not resumable) lists those written."""

    def __init__(self, path: Path, journal: Path | None = None):
        self._journal = journal
        self.written: dict[str, Parameter] = {}
        self._h = hashlib.sha256()
        self.size = 0
        if journal is not None and journal.is_file() and path.is_file():
            have = path.stat().st_size
            for line in journal.read_text().splitlines():
                try:
                    p = Parameter.from_json(json.loads(line))
                    if p.offset + p.nbytes > have:
                        break
                except (ValueError, TypeError, KeyError):
                    break  # a line cut by the crash: what follows it is rewritten
                self.written[p.name] = p
            self.size = max((p.offset + p.nbytes for p in self.written.values()), default=0)
            self._f: IO[bytes] = open(path, "r+b")
            self._f.truncate(self.size)
            _hash_prefix(self._f, self.size, self._h)
            self._f.seek(self.size)
            self._rewrite_journal()
        else:
            self._f = open(path, "wb")
            if journal is not None:
                journal.write_text("")

    def add(self, name: str, arr: np.ndarray, dtype: str, transposed: bool = False) -> Parameter:
        """Write `arr` (its transpose if `transposed`) as `dtype` at the next aligned offset."""
        start = aligned(self.size)
        pad = b"\0" * (start - self.size)
        self._f.write(pad)
        self._h.update(pad)
        view = arr.T if transposed else arr
        self.size = start + _write(self._f, self._h, view, dtype)
        p = Parameter(name, tuple(view.shape), dtype, start, transposed)
        self.written[name] = p
        if self._journal is not None:
            self._f.flush()
            os.fsync(self._f.fileno())
            with open(self._journal, "a") as j:
                j.write(json.dumps(p.to_json()) + "\n")
        return p

    def close(self) -> str:
        """Flush and close; returns the file's sha256. The journal goes: the file is whole."""
        self._f.close()
        if self._journal is not None:
            self._journal.unlink(missing_ok=True)
        return self._h.hexdigest()

    def _rewrite_journal(self) -> None:
        assert self._journal is not None
        self._journal.write_text("".join(json.dumps(p.to_json()) + "\n" for p in self.written.values()))


def _hash_prefix(f: IO[bytes], size: int, h: Any) -> None:
    f.seek(0)
    left = size
    while left:
        block = f.read(min(BLOCK_BYTES, left))
        h.update(block)
        left -= len(block)


def _write(f: IO[bytes], h: Any, arr: np.ndarray, dtype: str) -> int:
    """Write `arr` as C-ordered `dtype` bytes, a block of rows at a time, so that a transposed
    or cast copy of a large tensor (an untied lm_head) never exists whole. Returns the bytes."""
    rows = arr.reshape(len(arr), -1) if arr.ndim > 1 else arr.reshape(1, -1)
    step = max(1, BLOCK_BYTES // max(1, rows.shape[1] * rows.itemsize))
    for i in range(0, len(rows), step):
        data = memoryview(np.ascontiguousarray(rows[i:i + step], dtype=dtype)).cast("B")
        f.write(data)
        h.update(data)
    return rows.size * np.dtype(dtype).itemsize
