"""A run folder: what `ortzo finetune --out` writes, and the lock that makes one process its
only writer for the life of a run.

    config.json      the run configuration, and what it was recorded against
    steps.jsonl      one line per step (the run itself, given the initial weights)
    metrics.jsonl    one line per evaluation
    checkpoints/     step-N/ weight files
    curve.png        accuracy vs steps and time
    .lock            held (flock) by the process that runs or resumes it

A folder holds a run once config.json exists. Readers (`ortzo eval RUN`) take no lock and
write nothing.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from ..errors import OrtzoError
from ..files import TMP_SUFFIX, write_json
from .checkpoint import DIR as CHECKPOINTS

CONFIG = "config.json"
STEPS = "steps.jsonl"
METRICS = "metrics.jsonl"
CURVE = "curve.png"
LOCK = ".lock"


class RunFolder:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.config, self.steps, self.metrics = self.path / CONFIG, self.path / STEPS, self.path / METRICS
        self.curve = self.path / CURVE

    def holds_run(self) -> bool:
        return self.config.is_file()

    @contextmanager
    def locked(self, create: bool = False) -> Iterator[RunFolder]:
        """Hold the folder's exclusive lock (created if `create`). If what runs inside fails
        before the run's config.json exists, the folder is left as it was found."""
        created = False
        if not self.path.is_dir():
            if self.path.exists():
                raise OrtzoError(f"{self.path} is a file, not a run folder")
            if not create:
                raise OrtzoError(f"run folder not found: {self.path}")
            self.path.mkdir(parents=True)
            created = True
        had_lock = (self.path / LOCK).exists()
        lock = FileLock(self.path / LOCK, timeout=0)
        try:
            lock.acquire()
        except Timeout:
            raise OrtzoError(f"run folder {self.path} is in use by another ortzo process; "
                             "wait for it to finish or choose another --out") from None
        try:
            yield self
        except BaseException:
            if not self.holds_run():
                self.clean_stale()
                if not had_lock:
                    (self.path / LOCK).unlink(missing_ok=True)
                if created:
                    shutil.rmtree(self.path, ignore_errors=True)
            raise
        finally:
            lock.release()

    def check_new(self) -> None:
        """A new run needs a folder without a run and without anything of the user's."""
        if self.holds_run():
            raise OrtzoError(f"{self.path} already holds a run; pass --resume to continue it or choose another --out")
        foreign = sorted(p.name for p in self.path.iterdir() if p.name != LOCK and not _stale(p))
        if foreign:
            raise OrtzoError(f"run folder {self.path} is not empty (it has {', '.join(foreign)}); "
                             "choose another --out")

    def clean_stale(self) -> None:
        """Remove the temporary files a killed writer left (only the lock holder may)."""
        for folder in (self.path, self.path / CHECKPOINTS):
            if folder.is_dir():
                for p in folder.iterdir():
                    if _stale(p):
                        shutil.rmtree(p) if p.is_dir() else p.unlink()

    def read_config(self) -> dict[str, Any]:
        if not self.holds_run():
            raise OrtzoError(f"{self.path} holds no run (no {CONFIG})")
        try:
            d = json.loads(self.config.read_text(encoding="utf-8"))
            if not isinstance(d, dict) or not isinstance(d.get("recorded"), dict):
                raise ValueError("no 'recorded' section")
        except (ValueError, UnicodeDecodeError) as e:
            raise OrtzoError(f"corrupt run config {self.config}: {e}") from None
        return d

    def write_config(self, d: dict[str, Any]) -> None:
        write_json(self.config, d)


def _stale(p: Path) -> bool:
    return p.name.startswith(".") and p.name.endswith(TMP_SUFFIX)
