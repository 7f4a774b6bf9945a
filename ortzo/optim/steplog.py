"""The step log: one JSON line per step. For MeZO, with the initial weights it is the run.

Each line is a step record (a MeZO `StepRecord` by default; any record with `step`, `loss`,
`to_json` and `from_json`) plus the seconds the step took, so a resumed run knows the
training time of every step before the interruption, not only of those after it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import jsonl
from ..errors import OrtzoError
from .mezo import StepRecord


@dataclass
class Log:
    records: list[Any] = field(default_factory=list)  # StepRecord, or another engine's record
    seconds: list[float] = field(default_factory=list)
    torn: bytes = b""  # an incomplete last line a crash left; not part of the log

    def __len__(self) -> int:
        return len(self.records)


def read(path: str | Path, kind: Any = StepRecord) -> Log:
    """The complete records of type `kind`, in order; reads only (a torn tail is reported in `torn`)."""
    rows, torn = jsonl.read(path)
    log = Log(torn=torn)
    for n, row in enumerate(rows, 1):
        try:
            record = kind.from_json(row)
        except (KeyError, TypeError, ValueError):
            raise OrtzoError(f"{path}:{n}: corrupt step record") from None
        if record.step != n - 1:
            raise OrtzoError(f"{path}:{n}: step {record.step} found where step {n - 1} was expected")
        log.records.append(record)
        log.seconds.append(float(row.get("seconds", 0.0)))
    return log


class StepLog(jsonl.Writer):
    """Appends records, each fsynced, so a crash loses at most the step in flight."""

    def append_step(self, record: Any, seconds: float) -> None:
        self.append(record.to_json() | {"seconds": seconds})
