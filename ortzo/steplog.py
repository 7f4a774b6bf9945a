"""The step log: one JSON line per MeZO step. With the initial weights it is the run."""
from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import OrtzoError
from .files import atomic_open
from .mezo import StepRecord


def read(path: str | Path) -> list[StepRecord]:
    """Records in order. A torn last line (a crash mid-write) is dropped from the file too."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    records = []
    for n, line in enumerate(lines, 1):
        try:
            records.append(StepRecord.from_json(json.loads(line)))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            if n == len(lines):
                truncate(path, records)
                break
            raise OrtzoError(f"{path}:{n}: corrupt step record") from None
    for i, r in enumerate(records):
        if r.step != i:
            raise OrtzoError(f"{path}: step {r.step} found where step {i} was expected")
    return records


def truncate(path: str | Path, records: list[StepRecord]) -> None:
    with atomic_open(path, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json()) + "\n")


class StepLog:
    """Appends records, flushed and fsynced, so a crash loses at most the step in flight."""

    def __init__(self, path: str | Path) -> None:
        self.f = open(path, "a", encoding="utf-8")

    def append(self, r: StepRecord) -> None:
        self.f.write(json.dumps(r.to_json()) + "\n")
        self.f.flush()
        os.fsync(self.f.fileno())

    def close(self) -> None:
        self.f.close()
