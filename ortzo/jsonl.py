"""Append-only JSON Lines logs that a crash cannot corrupt.

A row counts only once its line ends in a newline. The writer writes each line with one
`write` and fsyncs it, so a kill leaves at worst one incomplete last line (a torn tail). A
reader drops a torn tail and reports it, without touching the file; a writer cuts it off
before its first append, so the next line never glues onto a fragment.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .errors import OrtzoError
from .files import fsync_dir


def read(path: str | Path) -> tuple[list[dict[str, Any]], bytes]:
    """(rows of every complete line, the torn tail's bytes or b""). Reads only."""
    path = Path(path)
    if not path.is_file():
        return [], b""
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    rows = []
    for n, line in enumerate(data[:end].splitlines(), 1):
        try:
            row = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            row = None
        if not isinstance(row, dict):
            raise OrtzoError(f"{path}:{n}: corrupt line (not a JSON object); the file was changed by hand?")
        rows.append(row)
    return rows, data[end:]


def torn_note(path: str | Path, torn: bytes) -> str:
    return f"{path}: dropped an incomplete last line of {len(torn)} bytes (a crash mid-write)"


def _write(fd: int, data: bytes) -> None:
    """All of `data`, however many write calls the kernel needs."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class Writer:
    """Appends rows to a JSON Lines file: whole lines, each fsynced before `append` returns.

    Opening cuts off a torn tail (`dropped` holds its bytes). Only the holder of the run
    folder's lock may open one."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        new = not self.path.exists()
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        if new:
            fsync_dir(self.path.parent)
        self.dropped = self._cut_torn_tail()

    def _cut_torn_tail(self) -> bytes:
        size = os.fstat(self.fd).st_size
        if size == 0:
            return b""
        data = os.pread(self.fd, size, 0)
        end = data.rfind(b"\n") + 1
        if end < size:
            os.ftruncate(self.fd, end)
            os.fsync(self.fd)
        return data[end:]

    def append(self, row: dict[str, Any]) -> None:
        data = (json.dumps(row) + "\n").encode()
        size = os.fstat(self.fd).st_size
        try:
            _write(self.fd, data)
            os.fsync(self.fd)
        except OSError:  # a full disk: leave no fragment for the next append to glue onto
            os.ftruncate(self.fd, size)
            raise

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
